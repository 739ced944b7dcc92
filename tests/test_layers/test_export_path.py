"""The batch-agnostic (export) formulation of KW convolutions equals the per-sample
reference for every convolution shape, and is what KW layers run while exporting."""
import pytest
import torch
import torch.nn.functional as F

from kw_mm import KWConv1d, KWConv2d, KWConv3d, set_temperature
from kw_mm.layers.execution.export import batch_agnostic_conv, export_mode, is_exporting

LAYERS = {1: KWConv1d, 2: KWConv2d, 3: KWConv3d}
SIZES = {1: (11, ), 2: (9, 10), 3: (5, 6, 7)}

# (in, out, kernel, stride, padding, dilation, groups): dense, strided, dilated,
# 1×1 (strided), even kernel, 'same'/'valid', grouped, depth-wise, depth-wise ×2
CASES = [
    (8, 12, 3, 1, 1, 1, 1), (8, 12, 3, 2, 1, 1, 1), (8, 12, 3, 1, 2, 2, 1),
    (8, 12, 1, 1, 0, 1, 1), (8, 12, 1, 2, 0, 1, 1), (8, 12, 2, 1, 0, 1, 1),
    (8, 12, 3, 1, 'same', 2, 1), (8, 12, 3, 1, 'valid', 1, 1), (8, 12, 3, 2, 1, 1, 4),
    (8, 8, 3, 1, 1, 1, 8), (8, 8, 5, 2, 2, 1, 8), (8, 16, 3, 1, 1, 1, 8),
]


@pytest.mark.parametrize('ndim', [1, 2, 3])
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('case', CASES, ids=[str(c) for c in CASES])
def test_export_formulation_equals_the_reference(ndim, bias, case):
    in_channels, out_channels, kernel, stride, padding, dilation, groups = case
    torch.manual_seed(0)
    layer = LAYERS[ndim](in_channels, out_channels, kernel, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, budget=1).eval()
    set_temperature(layer, 0.5)  # the attention matters: kernels differ per sample
    if bias:
        torch.nn.init.normal_(layer.bias)
    x = torch.randn(3, in_channels, *SIZES[ndim])
    with torch.no_grad():
        reference = layer.reference_forward(x)
        with export_mode():
            exported = layer(x)
    assert exported.shape == reference.shape
    torch.testing.assert_close(exported, reference, atol=1e-5, rtol=0)


def test_export_formulation_gives_each_sample_its_own_kernel():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    weight = torch.randn(2, 5, 4, 3, 3)
    out = batch_agnostic_conv(x, weight, None, (1, 1), (1, 1), (1, 1), 1)
    for b in range(2):
        torch.testing.assert_close(out[b], F.conv2d(x[b:b + 1], weight[b], padding=1)[0],
                                   atol=1e-5, rtol=0)
    swapped = batch_agnostic_conv(x, weight.flip(0), None, (1, 1), (1, 1), (1, 1), 1)
    assert not torch.allclose(swapped[0], out[0])


def test_export_mode_selects_the_formulation_and_restores_the_flag(monkeypatch):
    import kw_mm.layers.execution.export as export
    calls = []
    original = export.batch_agnostic_conv
    monkeypatch.setattr(export, 'batch_agnostic_conv',
                        lambda *args: calls.append(1) or original(*args))
    layer = KWConv2d(4, 4, 3, padding=1).eval()
    x = torch.randn(2, 4, 5, 5)
    layer(x)
    assert calls == [] and not is_exporting()
    with export_mode():
        assert is_exporting()
        layer(x)
        with export_mode(False):
            assert not is_exporting()
        assert is_exporting()
    assert calls == [1] and not is_exporting()
    with pytest.raises(RuntimeError):
        with export_mode():
            raise RuntimeError('inside')
    assert not is_exporting()


@pytest.mark.parametrize('kwargs,message', [
    (dict(weight=torch.zeros(2, 4, 4, 3)), 'spatial dims'),
    (dict(groups=2), 'channels'),
    (dict(padding='full'), "padding must be 'same', 'valid'"),
])
def test_export_formulation_names_bad_arguments(kwargs, message):
    args = dict(x=torch.zeros(2, 4, 6, 6), weight=torch.zeros(2, 4, 4, 3, 3), bias=None,
                stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        batch_agnostic_conv(**args)
