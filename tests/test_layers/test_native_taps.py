"""kw_mm.native's per-sample convolutions (conv2d_taps, its input layout and its backward)
and the layers that take them."""
import math
from functools import partial

import pytest
import torch
from native_helpers import needs_native, num_threads, per_sample_conv64

from kw_mm import KWConv2d, native, set_temperature


@needs_native
@pytest.mark.parametrize('unpadded', [True, False])  # size-keeping layers: the two layouts
@pytest.mark.parametrize('threads', [1, 2])
@pytest.mark.parametrize('batch,in_c,out_c,size,kernel,stride,padding,dilation,groups', [
    (3, 5, 7, (9, 11), (3, 3), (1, 1), (1, 1), (1, 1), (1, 1)),
    (2, 16, 40, (14, 14), (3, 3), (2, 2), (1, 1), (1, 1), (1, 1)),   # stride 2: four phases
    (1, 8, 12, (13, 10), (5, 3), (1, 2), (2, 0), (1, 2), (1, 1)),    # mixed strides, dilation
    (2, 4, 6, (7, 8), (1, 1), (3, 3), (0, 0), (1, 1), (1, 1)),
    (2, 3, 70, (5, 6), (3, 3), (1, 1), (0, 0), (2, 2), (1, 1)),      # output 1 × 2
    (2, 12, 10, (6, 7), (1, 1), (1, 1), (0, 0), (1, 1), (2, 3)),     # cell groups, 1×1
    (3, 8, 18, (9, 9), (3, 3), (2, 2), (1, 1), (1, 1), (3, 2)),      # cell groups, strided 3×3
    # size-keeping at stride 1: several column tiles and a tail, dilation, a 5 × 3
    # kernel, kernels larger than the map, cell groups
    (2, 9, 20, (13, 17), (3, 3), (1, 1), (2, 2), (2, 2), (1, 1)),
    (2, 6, 10, (8, 7), (5, 3), (1, 1), (2, 1), (1, 1), (1, 1)),
    (2, 4, 8, (1, 3), (5, 5), (1, 1), (2, 2), (1, 1), (1, 1)),
    (2, 8, 18, (10, 9), (3, 3), (1, 1), (1, 1), (1, 1), (3, 2)),
])
def test_conv2d_taps_matches_float64(batch, in_c, out_c, size, kernel, stride, padding,
                                     dilation, groups, threads, unpadded, monkeypatch):
    monkeypatch.setattr(native.tuning, 'UNPADDED_TAPS', unpadded)
    torch.manual_seed(0)
    x = torch.randn(batch, in_c, *size)
    kernels = torch.randn(batch, kernel[0] * kernel[1] * groups[0] * groups[1],
                          out_c // groups[0], in_c // groups[1])
    with num_threads(threads):
        out = native.conv2d_taps(x, kernels, kernel, stride, padding, dilation, groups)
    ref = per_sample_conv64(x, kernels, kernel, stride, padding, dilation, groups)
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5,
                               atol=1e-5 * math.sqrt(in_c * kernel[0] * kernel[1]))


@needs_native
def test_conv2d_taps_rejects_what_does_not_fit():
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match='do not fit'):
        native.conv2d_taps(x, torch.randn(2, 9, 3, 5), (3, 3), (1, 1), (1, 1), (1, 1))
    with pytest.raises(ValueError, match=r'\[B, C, H, W\]'):
        native.conv2d_taps(x[0], torch.randn(2, 9, 3, 4), (3, 3), (1, 1), (1, 1), (1, 1))
    with pytest.raises(ValueError, match=r'smaller than kernel_size=\(7, 7\)'):
        native.conv2d_taps(x, torch.randn(2, 49, 3, 4), (7, 7), (1, 1), (0, 0), (1, 1))
    with pytest.raises(ValueError, match='x must be float32 on CPU'):
        native.conv2d_taps(x.double(), torch.randn(2, 9, 3, 4), (3, 3), (1, 1), (1, 1), (1, 1))
    with pytest.raises(ValueError, match=r'stride must be at least 1, got \(0, 1\)'):
        native.conv2d_taps(x, torch.randn(2, 9, 3, 4), (3, 3), (0, 1), (1, 1), (1, 1))
    with pytest.raises(ValueError, match=r'padding must be at least 0, got \(-1, 1\)'):
        native.conv2d_taps(x, torch.randn(2, 9, 3, 4), (3, 3), (1, 1), (-1, 1), (1, 1))
    with pytest.raises(ValueError, match=r'cell_groups must be two positive ints, got \(0, 1\)'):
        native.conv2d_taps(x, torch.randn(2, 9, 3, 4), (3, 3), (1, 1), (1, 1), (1, 1), (0, 1))
    with pytest.raises(ValueError, match=r'cell_groups \(1, 2\)'):  # 2 input groups of 4
        native.conv2d_taps(x, torch.randn(2, 18, 3, 4), (3, 3), (1, 1), (1, 1), (1, 1), (1, 2))


def test_size_keeping_layers_read_the_input_unpadded():
    x = torch.randn(2, 3, 6, 7)
    same = native._TapsInput('t', x, (3, 3), (1, 1), (1, 1), (1, 1), unpadded=True)
    assert same.unpadded and same.phases.data_ptr() == x.data_ptr()  # no padded copy
    assert (same.cols, same.grid_w, list(same.offsets)) == (42, 7, [-8, -7, -6, -1, 0, 1, 6, 7, 8])
    for geometry in [((3, 3), (2, 2), (1, 1), (1, 1)),   # strided: the phases
                     ((3, 3), (1, 1), (0, 0), (1, 1)),   # shrinks the map
                     ((3, 3), (1, 1), (1, 1), (2, 2))]:  # dilated past what the padding keeps
        assert not native._TapsInput('t', x, *geometry, unpadded=True).unpadded
    assert not native._TapsInput('t', x, (3, 3), (1, 1), (1, 1), (1, 1)).unpadded
    # bit l of entry u·taps + t: position 16·u + l shifted to tap t is inside the 6 × 7 map
    top_left, centre = same.masks(1)[0], same.masks(1)[4]
    assert centre == 0xFFFF and top_left == 0xFFFF & ~0x7F & ~(1 << 7) & ~(1 << 14)


def test_conv2d_taps_is_chosen_for_small_maps_only():
    kernel = 9 * 512 * 512
    assert native.conv2d_taps_pays(kernel, 7, 7, (1, 1))            # ResNet50 last stage, 224²
    assert native.conv2d_taps_pays(kernel, 7, 7, (2, 2))            # its strided first block
    assert not native.conv2d_taps_pays(kernel, 25, 38, (1, 1))      # the same at 800 × 1216
    assert native.conv2d_taps_pays(9 * 256 * 256, 14, 14, (2, 2))      # its stage-3 one
    assert not native.conv2d_taps_pays(9 * 128 * 128, 28, 28, (2, 2))  # and stage 2's


@needs_native
@pytest.mark.parametrize('make', [
    lambda: KWConv2d(16, 16, 3, padding=1, bias=False, recompute_kernels=False),
    lambda: KWConv2d(16, 32, 3, stride=2, padding=1, cell_out_ratio=0.5,
                     recompute_kernels=False),  # 2 output groups
    lambda: KWConv2d(16, 16, (3, 5), padding='same', dilation=(1, 2),
                     recompute_kernels=False),  # odd 'same'
    lambda: KWConv2d(16, 24, 3, padding=1, cell_in_ratio=0.5,
                     recompute_kernels=False),  # 2 input groups
    lambda: KWConv2d(16, 32, 1, stride=2, cell_in_ratio=0.5, cell_out_ratio=0.5,
                     recompute_kernels=False),  # 1×1, groups
])
@pytest.mark.parametrize('train', [False, True])
def test_layers_take_conv2d_taps_and_match_the_reference(make, train, monkeypatch):
    used = []
    for home, name in ((native.taps, 'conv2d_taps'), (native.fused, 'fused_conv2d_taps')):
        monkeypatch.setattr(home, name, lambda *a, f=getattr(home, name), k=name, **kw:
                            used.append(k) or f(*a, **kw))
    monkeypatch.setattr(native.tuning, 'MIN_MACS', 0)
    monkeypatch.setattr(native.tuning, 'FUSED_POINTWISE_POSITIONS_PER_CELL', 1e9)  # 1×1: fused too
    torch.manual_seed(0)
    layer = make().train(train)
    set_temperature(layer, 0.3)
    x = torch.randn(3, 16, 10, 10)
    with torch.no_grad():
        ref = layer.reference_forward(x)
        inference = layer(x)  # no graph: the kernels assembled inside the convolution
    assert used == ['fused_conv2d_taps']
    with_graph = layer(x)  # kernels kept for backward: conv2d_taps on the mixtures
    assert used[1:] == ['conv2d_taps']
    for out in (inference, with_graph.detach()):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize('unpadded', [True, False])
@pytest.mark.parametrize('kernel_grad_max_cols', [0, 1 << 30])  # torch's product / native
@pytest.mark.parametrize('threads', [1, 2])
@pytest.mark.parametrize('batch,in_c,out_c,size,kernel,padding,dilation,groups,stride', [
    (2, 5, 7, (6, 7), (3, 3), (1, 1), (1, 1), (1, 1), (1, 1)),
    (2, 9, 20, (13, 17), (3, 3), (2, 2), (2, 2), (1, 1), (1, 1)),  # size-keeping, dilated
    (2, 6, 10, (8, 7), (5, 3), (2, 1), (1, 1), (1, 1), (1, 1)),
    (2, 4, 8, (1, 3), (5, 5), (2, 2), (1, 1), (1, 1), (1, 1)),    # kernel larger than the map
    (3, 16, 20, (7, 7), (3, 3), (1, 1), (1, 1), (1, 1), (1, 1)),  # rows of 8, tails everywhere
    (2, 8, 4, (9, 6), (1, 3), (0, 1), (1, 2), (1, 1), (1, 1)),    # dilated, padded in width only
    (1, 4, 6, (5, 6), (3, 3), (2, 0), (2, 1), (1, 1), (1, 1)),
    (2, 4, 6, (5, 6), (3, 3), (3, 1), (1, 1), (1, 1), (1, 1)),    # more padding than reached
    (2, 6, 9, (5, 5), (1, 1), (0, 0), (1, 1), (1, 1), (1, 1)),
    (3, 12, 20, (7, 6), (1, 1), (0, 0), (1, 1), (4, 3), (1, 1)),  # cell groups, 1×1
    (2, 8, 18, (6, 7), (3, 3), (1, 1), (1, 1), (3, 2), (1, 1)),   # cell groups, 3×3
    (2, 16, 20, (14, 13), (3, 3), (1, 1), (1, 1), (1, 1), (2, 2)),  # strided: the phases
    (2, 8, 12, (9, 11), (3, 3), (2, 1), (2, 1), (2, 2), (2, 3)),
    (1, 4, 6, (8, 8), (2, 2), (0, 0), (1, 1), (1, 1), (3, 3)),    # phases no position reads
])
def test_conv2d_taps_backward_matches_float64(batch, in_c, out_c, size, kernel, padding,
                                              dilation, groups, stride, threads,
                                              kernel_grad_max_cols, unpadded, monkeypatch):
    monkeypatch.setattr(native.tuning, 'NATIVE_KERNEL_GRAD_MAX_COLS', kernel_grad_max_cols)
    monkeypatch.setattr(native.tuning, 'UNPADDED_TAPS', unpadded)
    torch.manual_seed(0)
    mixtures = kernel[0] * kernel[1] * groups[0] * groups[1]
    x = torch.randn(batch, in_c, *size)
    kernels = torch.randn(batch, mixtures, out_c // groups[0], in_c // groups[1])
    x64, k64 = x.double().requires_grad_(), kernels.double().requires_grad_()
    ref = per_sample_conv64(x64, k64, kernel, stride, padding, dilation, groups)
    grad = torch.randn(ref.shape)
    ref.backward(grad.double())
    with num_threads(threads):
        grad_x, grad_k = native.conv2d_taps_backward(x, kernels, grad, kernel, padding, dilation,
                                                     cell_groups=groups, stride=stride)
        reused = kernels.clone()
        only_k = native.conv2d_taps_backward(x, reused, grad, kernel, padding, dilation,
                                             need_x=False, kernels_grad=reused,
                                             cell_groups=groups, stride=stride)
    scale = math.sqrt(max(in_c, out_c) * kernel[0] * kernel[1] * size[0] * size[1])
    torch.testing.assert_close(grad_x.double(), x64.grad, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(grad_k.double(), k64.grad, rtol=1e-5, atol=1e-5 * scale)
    assert only_k[0] is None and only_k[1] is reused and torch.equal(reused, grad_k)
    with pytest.raises(ValueError, match='grad of shape'):
        native.conv2d_taps_backward(x, kernels, grad[..., 1:], kernel, padding, dilation,
                                    cell_groups=groups, stride=stride)
    with pytest.raises(ValueError, match='kernels_grad must be a contiguous float32'):
        native.conv2d_taps_backward(x, kernels, grad, kernel, padding, dilation,
                                    kernels_grad=kernels.transpose(2, 3), cell_groups=groups,
                                    stride=stride)


@needs_native
def test_conv2d_taps_backward_ignores_the_default_dtype():
    torch.manual_seed(0)
    x, kernels, grad = torch.randn(2, 4, 6, 6), torch.randn(2, 9, 5, 4), torch.randn(2, 5, 6, 6)
    expected = native.conv2d_taps_backward(x, kernels, grad, (3, 3), (1, 1), (1, 1))
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = native.conv2d_taps_backward(x, kernels, grad, (3, 3), (1, 1), (1, 1))
    finally:
        torch.set_default_dtype(before)
    for a, b in zip(got, expected):
        assert a.dtype == torch.float32 and torch.equal(a, b)


@needs_native
@pytest.mark.parametrize('recompute', [False, True])
@pytest.mark.parametrize('make,input_grad', [
    (lambda r: KWConv2d(16, 24, 3, padding=1, recompute_kernels=r), True),
    (lambda r: KWConv2d(16, 16, (3, 5), padding='same', dilation=(1, 2),
                        recompute_kernels=r), True),   # odd 'same': the input padded first
    (lambda r: KWConv2d(16, 24, 3, padding=1, recompute_kernels=r), False),  # a first layer
])
def test_layers_take_the_native_backward_on_small_maps(make, input_grad, recompute,
                                                       monkeypatch):
    used = []
    for home, name in ((native.taps, 'conv2d_taps_backward'), (native.fused, 'fused_kernel_grads')):
        monkeypatch.setattr(home, name, partial(lambda f, n, *a, **k: used.append(n) or f(*a, **k),
                                                getattr(home, name), name))
    monkeypatch.setattr(native.tuning, 'MIN_MACS', 0)
    results = []
    for max_cols in (native.TAPS_BACKWARD_MAX_COLS, 0):  # native, then per-sample oneDNN
        monkeypatch.setattr(native.tuning, 'TAPS_BACKWARD_MAX_COLS', max_cols)
        torch.manual_seed(0)
        layer = make(recompute).train()
        set_temperature(layer, 0.3)
        x = torch.randn(3, 16, 7, 7, requires_grad=input_grad)
        out = layer(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach(), x.grad] + [p.grad for p in layer.parameters()])
    # by the first pass only: with recompute the fused forward's backward takes the
    # fused gradients of the attentions and cells (and the native one for the input)
    expected = (['conv2d_taps_backward'] if input_grad else []) + ['fused_kernel_grads']
    assert used == (expected if recompute else ['conv2d_taps_backward'])
    for fast, ref in zip(*results):
        assert (fast is None) == (ref is None)
        if fast is not None:
            torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize('recompute', [False, True])
@pytest.mark.parametrize('size', [7, 28])  # the forward native (one column tile), or per sample
def test_strided_layers_take_the_native_backward_on_small_maps(size, recompute, monkeypatch):
    """A strided 3×3 layer's backward runs natively on the input's phases on
    small maps, whichever way its forward ran, with the per-sample backward's
    numbers (which it replaces)."""
    used = []
    backward = native.conv2d_taps_backward
    monkeypatch.setattr(native.taps, 'conv2d_taps_backward',
                        lambda *a, **k: used.append(k.get('stride')) or backward(*a, **k))
    monkeypatch.setattr(native.tuning, 'MIN_MACS', 0)
    results = []
    for max_cols in (native.TAPS_BACKWARD_MAX_COLS, 0):  # native, then per-sample oneDNN
        monkeypatch.setattr(native.tuning, 'TAPS_BACKWARD_MAX_COLS', max_cols)
        torch.manual_seed(0)
        layer = KWConv2d(16, 24, 3, stride=2, padding=1, recompute_kernels=recompute).train()
        set_temperature(layer, 0.3)
        x = torch.randn(3, 16, size, size, requires_grad=True)
        out = layer(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach(), x.grad] + [p.grad for p in layer.parameters()])
    assert used == [(2, 2)]  # by the first pass only
    for fast, ref in zip(*results):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
