"""kw_mm.native's fused convolutions (fused_conv2d_taps, fused_kernel_grads) and the layers
that take them."""
import math

import pytest
import torch
from native_helpers import needs_native, num_threads

from kw_mm import KWConv2d, native, set_temperature


def per_sample_grouped_kernels64(alpha, cells, kernel, out_c, in_c, groups):
    """Each sample's kernel [B, out, in, kh, kw] in float64 from mixtures
    ordered (position, output group, input group), as fused_conv2d_taps reads them."""
    g_out, g_in = groups
    batch, positions = alpha.shape[0], kernel[0] * kernel[1]
    mixed = (alpha.double() @ cells.double()).view(batch, positions, g_out, g_in,
                                                    out_c // g_out, in_c // g_in)
    return mixed.permute(0, 2, 4, 3, 5, 1).reshape(batch, out_c, in_c, *kernel)


@needs_native
@pytest.mark.parametrize('unpadded', [True, False])
@pytest.mark.parametrize('threads', [1, 2])
@pytest.mark.parametrize('batch,in_c,out_c,size,kernel,stride,padding,groups', [
    (3, 5, 7, (9, 11), (3, 3), (1, 1), (1, 1), (1, 1)),  # out_c not a multiple of the strip of 8
    (2, 12, 16, (10, 9), (3, 3), (1, 1), (1, 1), (2, 3)),  # size-keeping, cell groups
    (2, 16, 20, (7, 7), (3, 3), (2, 2), (1, 1), (1, 1)),
    (1, 8, 16, (6, 5), (1, 3), (1, 1), (0, 1), (1, 1)),
    (3, 12, 20, (5, 6), (1, 1), (1, 1), (0, 0), (2, 3)),  # 1×1 in cells of 10 × 4 channels
    (2, 16, 44, (7, 7), (1, 1), (1, 1), (0, 0), (4, 1)),  # output groups of 11 channels
    (2, 12, 16, (7, 8), (3, 3), (2, 2), (1, 1), (2, 3)),
])
def test_fused_conv2d_taps_matches_float64(batch, in_c, out_c, size, kernel, stride, padding,
                                           groups, threads, unpadded, monkeypatch):
    monkeypatch.setattr(native.tuning, 'UNPADDED_TAPS', unpadded)
    torch.manual_seed(0)
    mixtures, n = kernel[0] * kernel[1] * groups[0] * groups[1], 11
    x = torch.randn(batch, in_c, *size)
    alpha = torch.randn(batch, mixtures, n)
    cells = torch.randn(n, out_c // groups[0] * in_c // groups[1])
    with num_threads(threads):
        out = native.fused_conv2d_taps(x, alpha, cells, kernel, stride, padding, (1, 1), groups)
    kernels = per_sample_grouped_kernels64(alpha, cells, kernel, out_c, in_c, groups)
    ref = torch.cat([torch.nn.functional.conv2d(x[b:b + 1].double(), kernels[b], None, stride,
                                                padding) for b in range(batch)])
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5,
                               atol=1e-5 * math.sqrt(in_c * kernel[0] * kernel[1] * n))
    with pytest.raises(ValueError, match='do not fit'):
        native.fused_conv2d_taps(x, alpha[:, :1], cells, kernel, stride, padding, (1, 1), groups)
    with pytest.raises(ValueError, match=r'cell_groups must be two positive ints, got \(0, 1\)'):
        native.fused_conv2d_taps(x, alpha, cells, kernel, stride, padding, (1, 1), (0, 1))


@needs_native
@pytest.mark.parametrize('threads', [1, 2])
@pytest.mark.parametrize('batch,in_c,out_c,size,kernel,stride,padding,dilation,groups', [
    (3, 5, 7, (9, 11), (3, 3), (1, 1), (1, 1), (1, 1), (1, 1)),  # rows not a multiple of 8
    (2, 16, 20, (7, 7), (3, 3), (2, 2), (1, 1), (1, 1), (1, 1)),
    (2, 12, 16, (7, 8), (3, 3), (2, 2), (1, 1), (1, 1), (2, 3)),
    (1, 8, 16, (6, 5), (1, 3), (1, 1), (0, 1), (1, 1), (1, 1)),
    (2, 8, 8, (9, 9), (3, 3), (1, 1), (2, 2), (2, 2), (1, 2)),
    (3, 12, 20, (5, 6), (1, 1), (1, 1), (0, 0), (1, 1), (2, 3)),
    (2, 16, 44, (7, 7), (1, 1), (1, 1), (0, 0), (1, 1), (4, 1)),
    (2, 640, 640, (3, 3), (1, 1), (1, 1), (0, 0), (1, 1), (1, 1)),  # an 18 MB cells' gradient:
])                                                                  # streaming stores
def test_fused_kernel_grads_match_float64(batch, in_c, out_c, size, kernel, stride, padding,
                                          dilation, groups, threads):
    """The attentions' and cells' gradients of fused_conv2d_taps, against
    float64 autograd through per-sample convolutions with the assembled kernels."""
    torch.manual_seed(0)
    mixtures, n = kernel[0] * kernel[1] * groups[0] * groups[1], 11
    x = torch.randn(batch, in_c, *size)
    alpha = torch.randn(batch, mixtures, n)
    cells = torch.randn(n, out_c // groups[0] * in_c // groups[1])
    alpha64 = alpha.double().requires_grad_()
    cells64 = cells.double().requires_grad_()
    kernels = per_sample_grouped_kernels64(alpha64, cells64, kernel, out_c, in_c, groups)
    ref = torch.cat([torch.nn.functional.conv2d(x[b:b + 1].double(), kernels[b], None, stride,
                                                padding, dilation) for b in range(batch)])
    grad = torch.randn(ref.shape)
    ref.backward(grad.double())
    with num_threads(threads):
        grad_alpha, grad_cells = native.fused_kernel_grads(x, grad, alpha, cells, kernel, stride,
                                                           padding, dilation, groups)
        only_cells = native.fused_kernel_grads(x, grad, alpha, cells, kernel, stride, padding,
                                               dilation, groups, need_alpha=False)
    # float32 rounding grows with the terms summed: positions × a cell's entries for
    # an attention's gradient, positions × samples × mixtures for a cell's
    positions = grad[0, 0].numel()
    torch.testing.assert_close(grad_alpha.double(), alpha64.grad, rtol=1e-5,
                               atol=1e-5 * math.sqrt(positions * cells.shape[1]))
    torch.testing.assert_close(grad_cells.double(), cells64.grad, rtol=1e-5,
                               atol=1e-5 * math.sqrt(positions * batch * mixtures))
    assert only_cells[0] is None and torch.equal(only_cells[1], grad_cells)
    with pytest.raises(ValueError, match='do not fit'):
        native.fused_kernel_grads(x, grad, alpha.repeat(1, 2, 1), cells, kernel, stride,
                                  padding, dilation, groups)  # twice the mixtures
    with pytest.raises(ValueError, match='grad of shape'):
        native.fused_kernel_grads(x, grad[..., 1:], alpha, cells, kernel, stride, padding,
                                  dilation, groups)
    with pytest.raises(ValueError, match=r'cell_groups must be two positive ints, got \(0, 1\)'):
        native.fused_kernel_grads(x, grad, alpha, cells, kernel, stride, padding, dilation,
                                  (0, 1))


def test_fused_pointwise_is_chosen_where_assembly_is_a_large_share():
    # ResNet50 at 224²: stage 3 (14², 138 cells) and stage 4 (7², 47 cells) fuse
    assert native.fused_pointwise_pays(138, 14 * 14)
    assert native.fused_pointwise_pays(47, 7 * 7)
    assert not native.fused_pointwise_pays(104, 28 * 28)      # stage 2
    assert not native.fused_pointwise_pays(47, 25 * 38)       # stage 4 at 800 × 1216


@needs_native
@pytest.mark.parametrize('make,size', [
    (lambda: KWConv2d(16, 32, 1, bias=False, cell_in_ratio=0.5, cell_out_ratio=0.25,
                      recompute_kernels=False), 5),
    (lambda: KWConv2d(16, 24, 1, stride=2, cell_in_ratio=0.25, recompute_kernels=False),
     7),    # a downsampling 1×1
])
def test_pointwise_layers_fuse_in_inference_only(make, size, monkeypatch):
    # (and in training with recompute_kernels: test_training_with_recompute_runs_fused...)
    used = []
    fused = native.fused_conv2d_taps
    monkeypatch.setattr(native.fused, 'fused_conv2d_taps',
                        lambda *a, **k: used.append(k['cell_groups']) or fused(*a, **k))
    monkeypatch.setattr(native.tuning, 'MIN_MACS', 0)
    monkeypatch.setattr(native.tuning, 'FUSED_POINTWISE_POSITIONS_PER_CELL', 100)  # few cells here
    torch.manual_seed(0)
    layer = make().eval()
    set_temperature(layer, 0.3)
    plan = layer.layer_plan
    assert plan.out_groups * plan.in_groups > 1
    x = torch.randn(3, 16, size, size)
    with torch.no_grad():
        ref = layer.reference_forward(x)
        inference = layer(x)
    assert used == [(plan.out_groups, plan.in_groups)]
    torch.testing.assert_close(inference, ref, rtol=1e-5, atol=1e-5)
    with_graph = layer(x)  # training keeps the kernels for backward: not fused
    assert len(used) == 1
    torch.testing.assert_close(with_graph.detach(), ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(native.tuning, 'FUSED_POINTWISE_POSITIONS_PER_CELL', 0)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert len(used) == 1  # a map too large for the cells: the batched product


@needs_native
def test_private_cells_and_one_sample_under_functorch(monkeypatch):
    from kw_mm.layers.partition import KernelShape, plan_warehouse
    from kw_mm.layers.warehouse import KernelWarehouse
    monkeypatch.setattr(native.tuning, 'MIN_MACS', 0)
    torch.manual_seed(0)
    # sharing='none': each mixture mixes cells of its own, a strided mixture tensor
    plan = plan_warehouse([KernelShape('c', 16, 16, (3, 3))], 2.0, cell_in_ratio=1,
                          cell_out_ratio=0.5, private=True)
    layer = KWConv2d(16, 16, 3, padding=1, warehouse=KernelWarehouse(plan), name='c').eval()
    set_temperature(layer, 0.3)
    x = torch.randn(3, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=1e-5, atol=1e-5)
    # one sample under a functorch transform keeps the plain convolution (differentiable)
    dense = KWConv2d(16, 16, 3, padding=1).eval()
    x1 = torch.randn(1, 16, 8, 8, requires_grad=True)
    grad = torch.func.grad(lambda t: dense(t).square().sum())(x1.detach())
    dense(x1).square().sum().backward()
    torch.testing.assert_close(grad, x1.grad, rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize('make,input_grad', [
    (lambda r: KWConv2d(16, 32, 1, stride=2, cell_in_ratio=0.5, cell_out_ratio=0.5,
                        recompute_kernels=r), True),
    (lambda r: KWConv2d(16, 24, 3, padding=1, recompute_kernels=r), True),  # native backward
    (lambda r: KWConv2d(16, 16, (3, 5), padding='same', dilation=(1, 2), recompute_kernels=r),
     True),
    (lambda r: KWConv2d(16, 32, 3, stride=2, padding=1, cell_in_ratio=0.5,
                        recompute_kernels=r), True),  # per-sample backward on the mixtures
    (lambda r: KWConv2d(16, 24, 3, padding=1, recompute_kernels=r), False),  # a first layer
])
def test_training_with_recompute_runs_fused_with_the_same_numbers(make, input_grad,
                                                                  monkeypatch):
    """With recompute_kernels the forward keeps no kernels, so it can run fused:
    outputs equal those of the unfused path that keeps them; the gradients match
    to float32 rounding (the attentions' and cells' come from
    native.fused_kernel_grads, summed in another order, and the input's includes
    the attention's)."""
    used = []
    fused = native.fused_conv2d_taps
    monkeypatch.setattr(native.fused, 'fused_conv2d_taps',
                        lambda *a, **k: used.append(1) or fused(*a, **k))
    monkeypatch.setattr(native.tuning, 'MIN_MACS', 0)
    monkeypatch.setattr(native.tuning, 'FUSED_POINTWISE_POSITIONS_PER_CELL', 1e9)
    results = []
    for recompute in (False, True):
        torch.manual_seed(0)
        layer = make(recompute).train()
        set_temperature(layer, 0.3)
        x = torch.randn(3, 16, 10, 10, requires_grad=input_grad)
        out = layer(x)
        assert len(used) == recompute
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach(), x.grad] + [p.grad for p in layer.parameters()])
    for i, (fast, ref) in enumerate(zip(*results)):
        assert (fast is None) == (ref is None)
        if fast is not None and i == 0:
            assert torch.equal(fast, ref)
        elif fast is not None:
            torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
