"""KW convolutions and the KW linear layer: shapes, assembly, gradients, state."""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kw_mm import KWConv1d, KWConv2d, KWConv3d, KWLinear, set_temperature
from kw_mm.layers.partition import ZERO_CELL


@pytest.mark.parametrize('kernel,stride,padding,dilation,groups', [
    (3, 1, 1, 1, 1), (3, 2, 1, 1, 1), (1, 1, 0, 1, 1), (3, 1, 2, 2, 1), (5, 2, 2, 1, 2),
    (3, 1, 1, 1, 8), ((3, 1), (2, 1), (1, 0), 1, 4), (2, 2, 0, 1, 1)])
def test_output_shape_matches_conv2d(kernel, stride, padding, dilation, groups):
    torch.manual_seed(0)
    kw = KWConv2d(8, 16, kernel, stride=stride, padding=padding, dilation=dilation,
                  groups=groups)
    ref = nn.Conv2d(8, 16, kernel, stride=stride, padding=padding, dilation=dilation,
                    groups=groups)
    x = torch.randn(3, 8, 11, 13)
    assert kw(x).shape == ref(x).shape
    assert kw(x[:1]).shape == ref(x[:1]).shape


@pytest.mark.parametrize('cls,ref_cls,size', [(KWConv1d, nn.Conv1d, (9,)),
                                              (KWConv3d, nn.Conv3d, (5, 6, 7))])
def test_1d_and_3d_shapes(cls, ref_cls, size):
    kw = cls(4, 6, 3, stride=2, padding=1)
    ref = ref_cls(4, 6, 3, stride=2, padding=1)
    x = torch.randn(2, 4, *size)
    assert kw(x).shape == ref(x).shape


def _assigned_kernel(layer):
    """The static kernel built from each mixture's β cell (what τ = 1 must give)."""
    plan = layer.layer_plan
    wh = layer.kw_warehouse
    co, ci = wh.plan.cell_out, wh.plan.cell_in
    weight = torch.zeros(plan.kernel.out_channels, plan.kernel.in_channels,
                         *plan.kernel.kernel_size)
    kk = plan.kernel.kernel_size
    for i, cell in enumerate(plan.beta):
        s, rest = divmod(i, plan.out_groups * plan.in_groups)
        o, c = divmod(rest, plan.in_groups)
        pos = list(itertools.product(*[range(n) for n in kk]))[s]
        if cell != ZERO_CELL:
            weight[(slice(o * co, (o + 1) * co), slice(c * ci, (c + 1) * ci)) + pos] = \
                wh.cells[cell].reshape(co, ci)
    return weight


@pytest.mark.parametrize('budget', [1, 0.5])
def test_tau_one_assembles_the_assigned_cells(budget):
    torch.manual_seed(0)
    layer = KWConv2d(16, 32, 3, padding=1, budget=budget, bias=False)
    set_temperature(layer, 1.0)
    alpha = layer.attention(torch.randn(2, 16, 5, 5))
    kernel = layer.assemble_kernel(alpha)
    expected = _assigned_kernel(layer)
    torch.testing.assert_close(kernel[0], expected)
    torch.testing.assert_close(kernel[1], expected)
    x = torch.randn(2, 16, 7, 7)
    torch.testing.assert_close(layer(x), F.conv2d(x, expected, padding=1), atol=1e-5, rtol=1e-5)


def test_batch_forward_equals_per_sample_forward():
    torch.manual_seed(0)
    layer = KWConv2d(8, 8, 3, padding=1, groups=2).eval()
    set_temperature(layer, 0.3)
    x = torch.randn(4, 8, 6, 6)
    whole = layer(x)
    single = torch.cat([layer(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(whole, single, atol=1e-5, rtol=1e-5)


def test_gradients_reach_cells_attention_and_bias():
    layer = KWConv2d(8, 8, 3, padding=1)
    set_temperature(layer, 0.5)
    layer(torch.randn(2, 8, 5, 5)).square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_deepcopy_and_state_dict_round_trip():
    torch.manual_seed(0)
    layer = KWConv2d(8, 16, 3, padding=1).eval()
    set_temperature(layer, 0.25)
    clone = copy.deepcopy(layer)
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(clone(x), layer(x))
    assert clone.kw_warehouse is not layer.kw_warehouse
    fresh = KWConv2d(8, 16, 3, padding=1).eval()
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x), layer(x))
    assert float(fresh.attention.temperature) == 0.25


def test_buffers_follow_to():
    layer = KWConv2d(8, 8, 3).to(torch.float64)
    assert layer.attention.beta.dtype == torch.float64
    assert layer.attention.temperature.dtype == torch.float64
    out = layer(torch.randn(2, 8, 5, 5, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_kw_linear_matches_linear_shape_and_tau_one():
    torch.manual_seed(0)
    layer = KWLinear(64, 40, budget=1, cell_in_ratio=0.5)
    set_temperature(layer, 1.0)
    x = torch.randn(3, 64)
    weight = _assigned_kernel(layer).flatten(1)
    torch.testing.assert_close(layer(x), F.linear(x, weight, layer.bias), atol=1e-5, rtol=1e-5)
    assert layer(torch.randn(3, 5, 64)).shape == (3, 5, 40)


def test_caf_is_finite_for_zero_logits():
    layer = KWConv2d(8, 8, 1, bias=False)
    set_temperature(layer, 0.0)
    with torch.no_grad():
        layer.attention.fc2.weight.zero_()
        layer.attention.fc2.bias.zero_()
    alpha = layer.attention(torch.randn(2, 8, 3, 3))
    assert torch.isfinite(alpha).all() and alpha.abs().sum() == 0


@pytest.mark.parametrize('shape', [(3, 8, 5, 7), (2, 8, 9), (2, 8, 3, 4, 5)])
def test_attention_pools_the_spatial_mean(shape):
    """The attention's pooling (a sum divided on the pooled [B, C] values, so its
    backward broadcasts rather than materialises) is the spatial mean, with the
    mean's gradient."""
    torch.manual_seed(0)
    layer = KWConv2d(8, 8, 1, bias=False).train()
    x = torch.randn(*shape, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_()
    attention = layer.attention
    pooled = ref_x.flatten(2).mean(-1)
    ref = attention.act1(attention.norm1(attention.fc1(pooled)))
    out = attention.hidden(x)
    torch.testing.assert_close(out, ref)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    assert x.grad.shape == x.shape


def test_single_sample_trains():
    layer = KWConv2d(8, 8, 3, padding=1).train()
    before = layer.attention.norm1.running_mean.clone()
    layer(torch.randn(1, 8, 5, 5)).sum().backward()
    assert layer.attention.norm1.weight.grad is not None
    torch.testing.assert_close(layer.attention.norm1.running_mean, before)


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match='groups'):
        KWConv2d(6, 8, 3, groups=4)
    with pytest.raises(ValueError, match='budget'):
        KWConv2d(8, 8, 3, budget=0)
    with pytest.raises(ValueError, match='padding_mode'):
        KWConv2d(8, 8, 3, padding_mode='reflect')


def test_builds_through_mmcv_and_conv_module():
    from mmcv.cnn import ConvModule, build_conv_layer
    conv = build_conv_layer(dict(type='KWConv2d', budget=2), 8, 16, 3, padding=1)
    assert isinstance(conv, KWConv2d) and conv.kw_warehouse.num_cells == 2 * 9
    module = ConvModule(8, 16, 3, padding=1, conv_cfg=dict(type='KWConv2d'),
                        norm_cfg=dict(type='BN'))
    module.init_weights()
    assert module(torch.randn(2, 8, 6, 6)).shape == (2, 16, 6, 6)


LAYER_CASES = [
    ('dense3x3', lambda bias: KWConv2d(8, 16, 3, padding=1, bias=bias), (8, 7, 7)),
    ('pointwise', lambda bias: KWConv2d(16, 32, 1, bias=bias), (16, 5, 5)),
    ('pointwise-stride2', lambda bias: KWConv2d(16, 32, 1, stride=2, bias=bias), (16, 7, 7)),
    ('depthwise', lambda bias: KWConv2d(16, 16, 3, padding=1, groups=16, bias=bias),
     (16, 6, 6)),
    ('grouped-dilated', lambda bias: KWConv2d(8, 8, 3, padding=2, dilation=2, groups=2,
                                              bias=bias), (8, 7, 7)),
    ('same-even-kernel', lambda bias: KWConv2d(8, 16, (2, 4), padding='same', dilation=(1, 3),
                                                bias=bias), (8, 7, 9)),
    ('valid', lambda bias: KWConv2d(8, 16, 3, padding='valid', stride=2, bias=bias), (8, 9, 9)),
    ('whole-kernels', lambda bias: KWConv2d(8, 16, 3, padding=1, budget=2, kernel_partition=False,
                                            bias=bias), (8, 6, 6)),
    ('conv1d', lambda bias: KWConv1d(4, 8, 3, stride=2, padding=1, bias=bias), (4, 11)),
    ('pointwise1d', lambda bias: KWConv1d(4, 8, 1, bias=bias), (4, 11)),
    ('conv3d', lambda bias: KWConv3d(4, 8, 3, padding=1, bias=bias), (4, 4, 5, 6)),
    ('linear', lambda bias: KWLinear(24, 12, bias=bias), (24,)),
]


@pytest.mark.parametrize('mode', ['train', 'eval'])
@pytest.mark.parametrize('batch', [1, 3])
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('name,make,shape', LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_fast_path_matches_reference(name, make, shape, bias, batch, mode):
    torch.manual_seed(0)
    layer = make(bias)
    set_temperature(layer, 0.3)
    if bias:
        nn.init.normal_(layer.bias)
    layer.train(mode == 'train')
    x = torch.randn(batch, *shape, requires_grad=True)
    outputs, grads = [], []
    for forward in (layer, layer.reference_forward):
        layer.zero_grad()
        x.grad = None
        out = forward(x)
        # a loss that weighs every output differently, so misplaced gradients show
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs.append(out.detach())
        grads.append([x.grad] + [p.grad for p in layer.parameters()])
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    for fast, ref in zip(*grads):
        assert (fast is None) == (ref is None)
        if fast is not None:
            torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_cells_are_initialised_as_the_authors_do():
    # one layer owning all n = 2·9 cells of 64x64: kaiming fan-out over [18·64, 64, 1, 1]
    torch.manual_seed(0)
    layer = KWConv2d(64, 64, 3, budget=2)
    std = layer.kw_warehouse.cells.std().item()
    assert abs(std - (2.0 / (18 * 64)) ** 0.5) < 0.05 * std


def _private_cells_layer():
    from kw_mm.layers.partition import KernelShape, plan_warehouse
    from kw_mm.layers.warehouse import KernelWarehouse
    plan = plan_warehouse([KernelShape('c', 16, 8, (3, 3))], 2.0, cell_in_ratio=1,
                          cell_out_ratio=0.5, private=True)
    return KWConv2d(8, 16, 3, padding=1, bias=False, warehouse=KernelWarehouse(plan), name='c')


EMPTY_LAYERS = {
    '3x3': lambda: KWConv2d(8, 16, 3, padding=1),
    '3x3_same_stride1': lambda: KWConv2d(8, 16, 4, padding='same'),
    '3x3_stride2': lambda: KWConv2d(8, 16, 3, stride=2, padding=1),
    '1x1': lambda: KWConv2d(8, 16, 1),
    '1x1_stride2': lambda: KWConv2d(8, 16, 1, stride=2),
    'grouped': lambda: KWConv2d(8, 16, 3, padding=1, groups=2),
    'depthwise': lambda: KWConv2d(8, 8, 3, padding=1, groups=8),
    'private_cells': lambda: _private_cells_layer(),
    'unpartitioned': lambda: KWConv2d(8, 16, 3, padding=1, budget=2, kernel_partition=False),
    '1d': lambda: KWConv1d(8, 16, 3, padding=1),
    '3d': lambda: KWConv3d(8, 16, 3, padding=1),
}


@pytest.mark.parametrize('mode', ['train', 'eval', 'export'])
@pytest.mark.parametrize('min_macs', [None, 0])  # 0: every native path would apply
@pytest.mark.parametrize('name', sorted(EMPTY_LAYERS))
def test_empty_batch_gives_empty_output_and_gradients(name, mode, min_macs, monkeypatch):
    from kw_mm import native
    from kw_mm.layers.execution.export import export_mode
    if min_macs is not None:
        monkeypatch.setattr(native.tuning, 'MIN_MACS', min_macs)
        monkeypatch.setattr(native.tuning, 'FUSED_POINTWISE_POSITIONS_PER_CELL', 1e9)
    torch.manual_seed(0)
    layer = EMPTY_LAYERS[name]().train(mode == 'train')
    size = {1: (9,), 2: (9, 10), 3: (5, 6, 7)}[layer.ndim]
    ref = getattr(nn, f'Conv{layer.ndim}d')(8, layer.out_channels, layer.kernel_size,
                                           stride=layer.stride, padding=layer.padding,
                                           groups=layer.groups)
    x = torch.randn(0, 8, *size, requires_grad=True)
    with export_mode(mode == 'export'):
        out = layer(x)
    assert out.shape == ref(x).shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    cells = layer.kw_warehouse.cells
    assert cells.grad is not None and cells.grad.shape == cells.shape
    assert not cells.grad.any()
    with torch.no_grad(), export_mode(mode == 'export'):
        assert layer(x.detach()).shape == out.shape


@pytest.mark.parametrize('shape', [(0, 12), (0, 5, 12)])
def test_kw_linear_empty_batch(shape):
    layer = KWLinear(12, 6).train()
    x = torch.randn(*shape, requires_grad=True)
    out = layer(x)
    assert out.shape == (*shape[:-1], 6)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert layer.kw_warehouse.cells.grad.shape == layer.kw_warehouse.cells.shape
    with torch.no_grad():
        assert layer.eval()(x.detach()).shape == out.shape


@pytest.mark.parametrize('name', ['3x3', '1x1', 'depthwise', '3x3_same_stride1', '1d', 'linear'])
def test_jit_trace_is_batch_agnostic(name):
    # a trace at batch 1 must not bake in one sample's kernel for all samples
    torch.manual_seed(0)
    if name == 'linear':
        layer, size = KWLinear(8, 16), ()
    else:
        layer = EMPTY_LAYERS[name]()
        size = {1: (9,), 2: (9, 10), 3: (5, 6, 7)}[layer.ndim]
    layer.eval()
    set_temperature(layer, 0.0)
    with torch.no_grad():
        traced = torch.jit.trace(layer, torch.randn(1, 8, *size))
        x = torch.randn(4, 8, *size)
        torch.testing.assert_close(traced(x), layer.reference_forward(x), atol=1e-5, rtol=1e-5)
