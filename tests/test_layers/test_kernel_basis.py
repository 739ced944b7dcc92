"""Inference through a KW layer's cached kernel basis (kw_mm/layers/execution/kernel_basis.py)."""
import copy

import pytest
import torch
from native_helpers import needs_native

from kw_mm import KWConv2d, native, set_temperature
from kw_mm.layers.builder import parse_kw_cfg
from kw_mm.layers.execution import conditions

# budget 4 and a hidden width of 2: 4 rows per mixture against 4·m cells, so the
# basis pays on these small layers as it does on ResNet50's third stage
LAYERS = {
    '3x3': (lambda **kw: KWConv2d(16, 24, 3, padding=1, **kw), 9),
    '3x3 stride 2, bias': (lambda **kw: KWConv2d(16, 16, 3, stride=2, padding=1,
                                                 **dict(kw, bias=True)), 10),
    "3x3 padding='same'": (lambda **kw: KWConv2d(16, 16, 3, padding='same', **kw), 8),
    '1x1 cell groups': (lambda **kw: KWConv2d(32, 32, 1, cell_in_ratio=0.5, cell_out_ratio=0.25,
                                              **kw), 6),
    '1x1 stride 2': (lambda **kw: KWConv2d(16, 24, 1, stride=2, cell_in_ratio=0.5, **kw), 9),
}


def make_layer(kind, **kw):
    make, size = LAYERS[kind]
    options = dict(budget=4, min_hidden=2, bias=False)
    options.update(kw)
    torch.manual_seed(0)
    layer = make(**options).eval()
    with torch.no_grad():  # attentions far from one-hot, and a running norm that is not 0/1
        layer.attention.fc2.bias.normal_(0, 0.5)
        layer.attention.norm1.running_mean.normal_(0, 0.1)
    return layer, torch.randn(3, layer.in_channels, size, size)


@pytest.fixture
def small_layers_fuse(monkeypatch):
    monkeypatch.setattr(native.tuning, 'MIN_MACS', 0)
    monkeypatch.setattr(native.tuning, 'FUSED_POINTWISE_POSITIONS_PER_CELL', 100)


def scale_of(ref):
    return 1e-5 * max(1.0, ref.abs().max().item())


@needs_native
@pytest.mark.parametrize('kind', sorted(LAYERS))
@pytest.mark.parametrize('tau', [0.0, 0.4, 1.0])
@pytest.mark.parametrize('batch', [1, 3])
def test_basis_path_matches_reference(kind, tau, batch, small_layers_fuse):
    layer, x = make_layer(kind)
    x = x[:batch]
    set_temperature(layer, tau)
    with torch.no_grad():
        ref = layer.reference_forward(x)
        out = layer(x)
    cached = layer._kernel_basis.cached
    assert cached is not None, 'the basis path did not run'
    beta = tau != 0
    assert cached.shape[:2] == (layer.layer_plan.num_mixtures,
                                layer.attention.fc2.in_features + 1 + beta)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=scale_of(ref))


@needs_native
def test_basis_without_beta_init(small_layers_fuse):
    layer, x = make_layer('3x3', init='none')
    set_temperature(layer, 0.7)  # no β term at all: τ plays no part
    with torch.no_grad():
        ref = layer.reference_forward(x)
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=scale_of(ref))
    assert layer._kernel_basis.cached.shape[1] == layer.attention.fc2.in_features + 1


@needs_native
def test_basis_is_rebuilt_when_weights_or_tau_change(small_layers_fuse):
    layer, x = make_layer('3x3')
    set_temperature(layer, 0.0)
    with torch.no_grad():
        layer(x)
        first = layer._kernel_basis.cached
        layer(x)
        assert layer._kernel_basis.cached is first  # reused
        changes = [lambda: layer.warehouse.cells.mul_(1.5),
                   lambda: layer.attention.fc2.weight.add_(0.1),
                   lambda: layer.attention.fc2.bias.sub_(0.2),
                   lambda: set_temperature(layer, 0.5)]
        for change in changes:
            before = layer._kernel_basis.cached
            change()
            ref = layer.reference_forward(x)
            torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=scale_of(ref))
            assert layer._kernel_basis.cached is not before


@needs_native
def test_training_forward_drops_the_basis_and_deepcopy_does_not_copy_it(small_layers_fuse):
    layer, x = make_layer('1x1 cell groups')
    with torch.no_grad():
        layer(x)
    assert layer._kernel_basis.cached is not None
    twin = copy.deepcopy(layer)
    assert twin._kernel_basis.cached is None
    with torch.no_grad():
        torch.testing.assert_close(twin(x), layer(x))
    layer.train()
    out = layer(x)
    out.sum().backward()
    assert layer._kernel_basis.cached is None
    assert layer.warehouse.cells.grad is not None


@needs_native
def test_attention_hooks_and_the_switch_keep_the_attention_forward(small_layers_fuse):
    layer, x = make_layer('3x3')
    seen = []
    handle = layer.attention.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        layer(x)
    handle.remove()
    assert seen == [(3, layer.layer_plan.num_mixtures, layer.kw_warehouse.num_cells)]
    assert layer._kernel_basis.cached is None
    off, x = make_layer('3x3', inference_basis=False)
    with torch.no_grad():
        off(x)
    assert off._kernel_basis.cached is None


@needs_native
@pytest.mark.parametrize('attention_fn', ['softmax', 'sigmoid', 'relu_norm'])
def test_non_affine_attentions_do_not_use_the_basis(attention_fn, small_layers_fuse):
    layer, x = make_layer('3x3', attention_fn=attention_fn)
    with torch.no_grad():
        ref = layer.reference_forward(x)
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=scale_of(ref))
    assert layer._kernel_basis.cached is None


def test_basis_pays_on_resnet50_stage3_only():
    # (mixtures, rows, cells) of KW ResNet50 1x at τ = 1
    assert conditions.kernel_basis_pays(9, 18, 138)          # stage-3 3×3
    assert conditions.kernel_basis_pays(4, 18, 138)          # stage-3 1×1 reading 256 channels
    assert not conditions.kernel_basis_pays(4, 66, 138)      # stage-3 1×1 reading 1024: 2× bytes
    assert not conditions.kernel_basis_pays(9, 34, 47)       # stage-4 3×3: fewer cells than rows·m
    assert not conditions.kernel_basis_pays(9, 18, 27)       # rows more than half the cells


def test_inference_basis_option_is_checked():
    assert parse_kw_cfg({})['inference_basis'] is True
    with pytest.raises(ValueError, match="kw_cfg.inference_basis must be True or False, got 'no'"):
        parse_kw_cfg(dict(inference_basis='no'))
    with pytest.raises(ValueError, match='inference_basis must be True or False, got 1'):
        KWConv2d(4, 4, 1, inference_basis=1)


@needs_native
@pytest.mark.parametrize('kernel,stride,groups', [
    ((3, 3), (1, 1), (1, 1)), ((3, 3), (2, 2), (2, 1)), ((1, 1), (1, 1), (2, 4))])
def test_fused_taps_with_a_cell_set_per_mixture_matches_float64(kernel, stride, groups):
    torch.manual_seed(0)
    batch, in_c, out_c, rows = 3, 16, 24, 5
    mixtures = kernel[0] * kernel[1] * groups[0] * groups[1]
    cell_out, cell_in = out_c // groups[0], in_c // groups[1]
    x = torch.randn(batch, in_c, 9, 9)
    coefficients = torch.randn(batch, mixtures, rows)
    cells = torch.randn(mixtures, rows, cell_out * cell_in)
    padding = (kernel[0] // 2, kernel[1] // 2)
    out = native.fused_conv2d_taps(x, coefficients, cells, kernel, stride, padding, (1, 1), groups)
    mixed = torch.einsum('bmk,mkd->bmd', coefficients.double(), cells.double())
    blocks = mixed.view(batch, kernel[0], kernel[1], groups[0], groups[1], cell_out, cell_in)
    kernels = blocks.permute(0, 3, 5, 4, 6, 1, 2).reshape(batch, out_c, in_c, *kernel)
    ref = torch.cat([torch.nn.functional.conv2d(x[b:b + 1].double(), kernels[b], None, stride,
                                                padding) for b in range(batch)])
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match='do not fit'):
        native.fused_conv2d_taps(x, coefficients, cells[1:], kernel, stride, padding, (1, 1),
                                 groups)


@needs_native
def test_basis_built_in_inference_mode_serves_no_grad_calls(small_layers_fuse):
    layer, x = make_layer('3x3 stride 2, bias')
    with torch.inference_mode():
        first = layer(x)
    built = layer._kernel_basis.cached
    assert built is not None
    with torch.no_grad():
        torch.testing.assert_close(layer(x), first)
    assert layer._kernel_basis.cached is built
