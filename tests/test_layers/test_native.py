"""kw_mm.native: building and switching the C kernels, and whole layers through them
(the kernels by role: test_native_gemm.py, test_native_taps.py, test_native_fused.py;
the library cache: test_native_cache.py)."""
import os
import warnings

import pytest
import torch
from native_helpers import needs_native

from kw_mm import KWConv1d, KWConv2d, KWLinear, native, set_temperature

LAYERS = {
    'dense3x3': (lambda: KWConv2d(8, 16, 3, padding=1), (8, 7, 7)),
    'pointwise': (lambda: KWConv2d(16, 32, 1, stride=2), (16, 7, 7)),
    'pointwise-cell-groups': (lambda: KWConv2d(16, 32, 1, stride=2, cell_in_ratio=0.5,
                                               cell_out_ratio=0.25), (16, 7, 7)),
    'depthwise': (lambda: KWConv2d(16, 16, 3, padding=1, groups=16), (16, 6, 6)),
    'whole-kernels': (lambda: KWConv2d(8, 16, 3, padding=1, budget=2, kernel_partition=False),
                      (8, 6, 6)),
    'conv1d': (lambda: KWConv1d(4, 8, 3, padding=1), (4, 11)),
    'linear': (lambda: KWLinear(24, 12), (24,)),
}


@needs_native
@pytest.mark.parametrize('recompute', [False, True])
@pytest.mark.parametrize('batch', [1, 3])
@pytest.mark.parametrize('name', sorted(LAYERS))
def test_layers_give_the_same_outputs_and_gradients(name, batch, recompute, monkeypatch):
    make, shape = LAYERS[name]
    calls = []
    for home, kernel in ((native.gemm, 'gemm_nn'), (native.gemm, 'gemm_nn_batched'),
                         (native.taps, 'conv2d_taps'), (native.taps, 'conv2d_taps_backward')):
        monkeypatch.setattr(home, kernel, lambda *a, f=getattr(home, kernel), k=kernel,
                            **options: calls.append(k) or f(*a, **options))
    results = []
    for min_macs in (float('inf'), 0):  # torch.matmul, then the C kernels
        monkeypatch.setattr(native.tuning, 'MIN_MACS', min_macs)
        torch.manual_seed(0)
        layer = make().train()
        layer.recompute_kernels = recompute
        set_temperature(layer, 0.3)
        x = torch.randn(batch, *shape, requires_grad=True)
        out = layer(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach(), x.grad] + [p.grad for p in layer.parameters()])
    assert calls, 'the C kernels were not used'
    if name.startswith('pointwise'):  # its products read the mixtures in place, both ways
        assert {'conv2d_taps', 'conv2d_taps_backward'} <= set(calls)
    for fast, ref in zip(*results):
        assert (fast is None) == (ref is None)
        if fast is not None:
            torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv('KW_MM_NATIVE', '0')
    monkeypatch.setattr(native.library, '_loaded', None)
    monkeypatch.setattr(native.tuning, 'MIN_MACS', 0)
    assert not native.available() and 'KW_MM_NATIVE=0' in native.status()
    a, b = torch.randn(6, 5), torch.randn(5, 300)
    torch.testing.assert_close(native.matmul(a, b), a @ b)
    with pytest.raises(RuntimeError, match='not in use'):
        native.gemm_nn(a, b)


def test_missing_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv('CC', str(tmp_path / 'no-such-cc'))
    monkeypatch.setenv('KW_MM_CACHE_DIR', str(tmp_path / 'cache'))
    monkeypatch.delenv('KW_MM_NATIVE', raising=False)
    monkeypatch.setattr(native.library, '_loaded', None)
    monkeypatch.setattr(native.tuning, 'MIN_MACS', 0)
    a, b = torch.randn(6, 5), torch.randn(5, 300)
    with pytest.warns(RuntimeWarning, match='no-such-cc'):
        out = native.matmul(a, b)
    torch.testing.assert_close(out, a @ b)
    assert native.status().startswith('unavailable')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        native.matmul(a, b)  # no second warning


def test_failed_build_leaves_no_file(monkeypatch, tmp_path):
    monkeypatch.setenv('CC', 'false')  # a "compiler" that exits with status 1
    with pytest.raises(RuntimeError, match='exit status 1'):
        native.build(tmp_path)
    assert os.listdir(tmp_path) == []


@needs_native
def test_build_is_cached_by_source_compiler_and_cpu(monkeypatch, tmp_path):
    monkeypatch.delenv('CC', raising=False)
    first = native.build(tmp_path)
    assert native.build(tmp_path) == first  # cached: not rebuilt
    checksums = [native.checksum_path(first).name]
    assert sorted(os.listdir(tmp_path)) == [first.name] + checksums  # no temporary left behind
    assert first.stat().st_mode & 0o055 == 0o055  # readable by all: the cache may be shared
    monkeypatch.setattr(native.library, '_cpu_flags', lambda: 'flags: another cpu')
    second = native.build(tmp_path)  # another CPU: built again beside the first
    checksums.append(native.checksum_path(second).name)
    assert second != first and sorted(os.listdir(tmp_path)) == sorted([first.name, second.name]
                                                                      + checksums)
