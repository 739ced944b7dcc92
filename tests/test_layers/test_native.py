"""kw_mm.native: the C kernels for the assembly products, their build and their fallbacks."""
import contextlib
import math
import os
import warnings
from functools import partial

import pytest
import torch

from kw_mm import KWConv1d, KWConv2d, KWLinear, native, set_temperature

needs_native = pytest.mark.skipif(not native.available(),
                                  reason=f'native kernels: {native.status()}')


def float64_product(a, b):
    return (a.double() @ b.double())


@contextlib.contextmanager
def num_threads(threads):
    """torch's thread count set to ``threads`` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@needs_native
@pytest.mark.parametrize('m,k,n', [
    (1, 1, 1), (5, 3, 100), (6, 47, 64), (7, 47, 130), (13, 72, 1000), (72, 47, 4099),
    (8, 3, 600_000),  # a 19 MB output: the streaming stores
])
def test_gemm_nn_matches_float64(m, k, n):
    torch.manual_seed(0)
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.testing.assert_close(native.gemm_nn(a, b).double(), float64_product(a, b),
                               rtol=1e-5, atol=1e-5 * math.sqrt(k))


@needs_native
def test_gemm_nn_strided_operands():
    torch.manual_seed(0)
    a = torch.randn(9, 60)[:, 3:50]           # leading dimension 60, offset 3
    b = torch.randn(47, 300)[:, 7:290]        # columns start off any alignment
    torch.testing.assert_close(native.gemm_nn(a, b).double(), float64_product(a, b),
                               rtol=1e-5, atol=1e-4)
    bt = torch.randn(283, 47).t()             # column-major: copied to rows first
    torch.testing.assert_close(native.gemm_nn(a, bt).double(), float64_product(a, bt),
                               rtol=1e-5, atol=1e-4)


@needs_native
@pytest.mark.parametrize('threads', [1, 2, 3])
@pytest.mark.parametrize('s,m,k,n', [
    (1, 1, 1, 1), (3, 13, 5, 17), (2, 7, 30, 48), (8, 50, 20, 49), (2, 256, 64, 196),
    (1, 6, 3, 64), (5, 9, 40, 1000),
])
def test_gemm_nn_batched_matches_float64(s, m, k, n, threads):
    # shapes for both register tiles (8 × 48, 6 × 64), narrow tail tiles, and
    # outputs too narrow for one tile per thread (rows split between threads)
    torch.manual_seed(0)
    a, b = torch.randn(s, m, k), torch.randn(s, k, n)
    with num_threads(threads):
        out = native.gemm_nn_batched(a, b)
        out_t = native.gemm_nn_batched(a.transpose(1, 2).contiguous().transpose(1, 2), b)
    for result in (out, out_t):  # row-major A, and A read through its transpose in place
        torch.testing.assert_close(result.double(), a.double() @ b.double(), rtol=1e-5,
                                   atol=1e-5 * math.sqrt(k))


@needs_native
def test_gemm_nn_batched_strided_operands():
    torch.manual_seed(0)
    a = torch.randn(4, 9, 60)[::2, :, 3:50]    # every other sample, leading dimension 60
    b = torch.randn(2, 47, 300)[:, :, 7:290]
    torch.testing.assert_close(native.gemm_nn_batched(a, b).double(),
                               a.double() @ b.double(), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match='do not multiply'):
        native.gemm_nn_batched(torch.randn(2, 3, 4), torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match='3-D float32 CPU'):
        native.gemm_nn_batched(torch.randn(3, 4), torch.randn(4, 5))


@needs_native
@pytest.mark.parametrize('n', [100, 700, 2100])  # the three ways of b's gradient
def test_batched_matmul_matches_torch(n, monkeypatch):
    monkeypatch.setattr(native, 'MIN_MACS', 0)
    used = []
    product = native.gemm_nn_batched
    monkeypatch.setattr(native, 'gemm_nn_batched', lambda *a: used.append(1) or product(*a))
    torch.manual_seed(0)
    a = torch.randn(3, 20, 33, requires_grad=True)
    b = torch.randn(3, 33, n, requires_grad=True)
    weights = torch.randn(3, 20, n)
    results = []
    for bmm in (native.bmm, torch.bmm):
        a.grad = b.grad = None
        out = bmm(a, b)
        (out * weights).sum().backward()
        results.append((out.detach(), a.grad, b.grad))
    assert len(used) == (2 if n in (100, 2100) else 1)
    for fast, ref in zip(*results):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-4)


@needs_native
def test_batched_matmul_higher_order_and_fallbacks(monkeypatch):
    monkeypatch.setattr(native, 'MIN_MACS', 0)
    torch.manual_seed(0)
    a = torch.randn(2, 6, 5, requires_grad=True)
    b = torch.randn(2, 5, 300, requires_grad=True)
    results = []
    for bmm in (native.bmm, torch.bmm):
        grad_a, = torch.autograd.grad(bmm(a, b).square().sum(), a, create_graph=True)
        second = torch.autograd.grad(grad_a.square().sum(), (a, b))
        results.append((grad_a.detach(), *second))
    for fast, ref in zip(*results):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    ta, tb = torch.randn_like(a), torch.randn_like(b)
    _, jvp_native = torch.func.jvp(native.bmm, (a.detach(), b.detach()), (ta, tb))
    _, jvp_torch = torch.func.jvp(torch.bmm, (a.detach(), b.detach()), (ta, tb))
    torch.testing.assert_close(jvp_native, jvp_torch, rtol=1e-5, atol=1e-4)

    def fail(*args):
        raise AssertionError('the C kernels ran')
    monkeypatch.setattr(native, 'gemm_nn_batched', fail)
    native.bmm(a.double(), b.double())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        native.bmm(a, b)
    with pytest.raises(RuntimeError):  # torch.bmm's own error
        native.bmm(a, b.transpose(1, 2))
    with pytest.raises(AssertionError, match='C kernels ran'):
        native.bmm(a, b)


def per_sample_conv64(x, kernels, kernel_size, stride, padding, dilation, cell_groups=(1, 1)):
    """conv2d_taps in float64: the mixtures [B, kh·kw·G_out·G_in, cell_out, cell_in]
    reordered into each sample's kernel, one sample at a time."""
    batch, _, cell_out, cell_in = kernels.shape
    g_out, g_in = cell_groups
    weight = kernels.double().view(batch, *kernel_size, g_out, g_in, cell_out, cell_in)
    weight = weight.permute(0, 3, 5, 4, 6, 1, 2).reshape(batch, g_out * cell_out, g_in * cell_in,
                                                         *kernel_size)
    return torch.cat([torch.nn.functional.conv2d(x[b:b + 1].double(), weight[b], None, stride,
                                                 padding, dilation) for b in range(batch)])


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
    monkeypatch.setattr(native, 'UNPADDED_TAPS', unpadded)
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
    for name in ('conv2d_taps', 'fused_conv2d_taps'):
        monkeypatch.setattr(native, name, lambda *a, f=getattr(native, name), k=name, **kw:
                            used.append(k) or f(*a, **kw))
    monkeypatch.setattr(native, 'MIN_MACS', 0)
    monkeypatch.setattr(native, 'FUSED_POINTWISE_POSITIONS_PER_CELL', 1e9)  # 1×1: fused too
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
    monkeypatch.setattr(native, 'NATIVE_KERNEL_GRAD_MAX_COLS', kernel_grad_max_cols)
    monkeypatch.setattr(native, 'UNPADDED_TAPS', unpadded)
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
    for name in ('conv2d_taps_backward', 'fused_kernel_grads'):
        monkeypatch.setattr(native, name, partial(lambda f, n, *a, **k: used.append(n) or f(*a, **k),
                                                  getattr(native, name), name))
    monkeypatch.setattr(native, 'MIN_MACS', 0)
    results = []
    for max_cols in (native.TAPS_BACKWARD_MAX_COLS, 0):  # native, then per-sample oneDNN
        monkeypatch.setattr(native, 'TAPS_BACKWARD_MAX_COLS', max_cols)
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
    monkeypatch.setattr(native, 'conv2d_taps_backward',
                        lambda *a, **k: used.append(k.get('stride')) or backward(*a, **k))
    monkeypatch.setattr(native, 'MIN_MACS', 0)
    results = []
    for max_cols in (native.TAPS_BACKWARD_MAX_COLS, 0):  # native, then per-sample oneDNN
        monkeypatch.setattr(native, 'TAPS_BACKWARD_MAX_COLS', max_cols)
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
    monkeypatch.setattr(native, 'UNPADDED_TAPS', unpadded)
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
    monkeypatch.setattr(native, 'fused_conv2d_taps',
                        lambda *a, **k: used.append(k['cell_groups']) or fused(*a, **k))
    monkeypatch.setattr(native, 'MIN_MACS', 0)
    monkeypatch.setattr(native, 'FUSED_POINTWISE_POSITIONS_PER_CELL', 100)  # few cells here
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
    monkeypatch.setattr(native, 'FUSED_POINTWISE_POSITIONS_PER_CELL', 0)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert len(used) == 1  # a map too large for the cells: the batched product


@needs_native
def test_forward_mode_ad_takes_torch_products(monkeypatch):
    monkeypatch.setattr(native, 'MIN_MACS', 0)

    def fail(*args):
        raise AssertionError('the C kernels ran')
    for kernel in ('gemm_nn', 'gemm_nn_batched'):
        monkeypatch.setattr(native, kernel, fail)
    import torch.autograd.forward_ad as fwAD
    torch.manual_seed(0)
    for product, ref, shapes in ((native.bmm, torch.bmm, ((2, 6, 5), (2, 5, 300))),
                                 (native.matmul, torch.matmul, ((6, 5), (5, 300)))):
        a, b = (torch.randn(s) for s in shapes)
        ta = torch.randn_like(a)
        with fwAD.dual_level():
            out = product(fwAD.make_dual(a, ta), b)
            tangent = fwAD.unpack_dual(out).tangent
        torch.testing.assert_close(tangent, ref(ta, b))


@needs_native
def test_batched_matmul_keeps_no_kernel_for_an_input_without_gradient(monkeypatch):
    import weakref
    monkeypatch.setattr(native, 'MIN_MACS', 0)
    w = torch.randn(2, 6, 5, requires_grad=True)
    kernel = w * 2
    ref = weakref.ref(kernel)
    out = native.bmm(kernel, torch.randn(2, 5, 300))  # the input needs no gradient
    del kernel
    assert ref() is None  # only the input is saved (for the kernel's gradient)
    out.sum().backward()
    assert w.grad is not None


@needs_native
def test_private_cells_and_one_sample_under_functorch(monkeypatch):
    from kw_mm.layers.partition import KernelShape, plan_warehouse
    from kw_mm.layers.warehouse import KernelWarehouse
    monkeypatch.setattr(native, 'MIN_MACS', 0)
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
@pytest.mark.parametrize('threads', [1, 3])
@pytest.mark.parametrize('m,p,d', [(1, 1, 1), (5, 7, 15), (4, 6, 16), (9, 13, 1000),
                                   (72, 47, 10_003)])
def test_gemm_nt_matches_float64(m, p, d, threads):
    torch.manual_seed(0)
    g, e = torch.randn(m, d), torch.randn(p, d)
    with num_threads(threads):
        out = native.gemm_nt(g, e)
    torch.testing.assert_close(out.double(), float64_product(g, e.t()), rtol=1e-5,
                               atol=1e-5 * math.sqrt(d))


@needs_native
def test_autograd_function_matches_torch():
    torch.manual_seed(0)
    a = torch.randn(3, 4, 11, requires_grad=True)
    b = torch.randn(11, 5000, requires_grad=True)
    weights = torch.randn(3, 4, 5000)
    grads = []
    for product in (native.SmallKMatmul.apply, torch.matmul):
        a.grad = b.grad = None
        out = product(a.reshape(12, 11), b).view(3, 4, 5000)
        (out * weights).sum().backward()
        grads.append((out.detach(), a.grad, b.grad))
    for fast, ref in zip(*grads):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-4)


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
    for kernel in ('gemm_nn', 'gemm_nn_batched', 'conv2d_taps', 'conv2d_taps_backward'):
        monkeypatch.setattr(native, kernel, lambda *a, f=getattr(native, kernel), k=kernel,
                            **options: calls.append(k) or f(*a, **options))
    results = []
    for min_macs in (float('inf'), 0):  # torch.matmul, then the C kernels
        monkeypatch.setattr(native, 'MIN_MACS', min_macs)
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


@needs_native
def test_not_used_for_float64_autocast_or_small_products(monkeypatch):
    def fail(*args):
        raise AssertionError('the C kernels ran')
    monkeypatch.setattr(native, 'gemm_nn', fail)
    a, b = torch.randn(72, 47), torch.randn(47, 262_144)
    native.matmul(a.double(), b.double())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        native.matmul(a, b)
    native.matmul(a[:2, :3], b[:3, :100])  # below MIN_MACS
    with pytest.raises(AssertionError, match='C kernels ran'):
        native.matmul(a, b)


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv('KW_MM_NATIVE', '0')
    monkeypatch.setattr(native, '_loaded', None)
    monkeypatch.setattr(native, 'MIN_MACS', 0)
    assert not native.available() and 'KW_MM_NATIVE=0' in native.status()
    a, b = torch.randn(6, 5), torch.randn(5, 300)
    torch.testing.assert_close(native.matmul(a, b), a @ b)
    with pytest.raises(RuntimeError, match='not in use'):
        native.gemm_nn(a, b)


def test_missing_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv('CC', str(tmp_path / 'no-such-cc'))
    monkeypatch.setenv('KW_MM_CACHE_DIR', str(tmp_path / 'cache'))
    monkeypatch.delenv('KW_MM_NATIVE', raising=False)
    monkeypatch.setattr(native, '_loaded', None)
    monkeypatch.setattr(native, 'MIN_MACS', 0)
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
    monkeypatch.setattr(native, '_cpu_flags', lambda: 'flags: another cpu')
    second = native.build(tmp_path)  # another CPU: built again beside the first
    checksums.append(native.checksum_path(second).name)
    assert second != first and sorted(os.listdir(tmp_path)) == sorted([first.name, second.name]
                                                                      + checksums)


@needs_native
def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match='inner dimensions differ'):
        native.gemm_nn(torch.randn(100, 4), torch.randn(8, 10_000))
    with pytest.raises(ValueError, match='inner dimensions differ'):
        native.gemm_nt(torch.randn(100, 5000), torch.randn(4, 3000))
    with pytest.raises(ValueError, match='float32 CPU matrix'):
        native.gemm_nn(torch.randn(3, 4).double(), torch.randn(4, 5))
    with pytest.raises(RuntimeError):  # torch.matmul's own error
        native.matmul(torch.randn(100, 4), torch.randn(8, 10_000))


@needs_native
def test_higher_order_and_forward_mode_derivatives(monkeypatch):
    monkeypatch.setattr(native, 'MIN_MACS', 0)
    torch.manual_seed(0)
    a = torch.randn(6, 5, requires_grad=True)
    b = torch.randn(5, 300, requires_grad=True)
    results = []
    for product in (native.matmul, torch.matmul):
        grad_a, = torch.autograd.grad(product(a, b).square().sum(), a, create_graph=True)
        second = torch.autograd.grad(grad_a.square().sum(), (a, b))
        results.append((grad_a.detach(), *second))
    for fast, ref in zip(*results):  # sums of 300 products: float32 rounding ~1e-5
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    ta, tb = torch.randn_like(a), torch.randn_like(b)
    _, jvp_native = torch.func.jvp(native.matmul, (a.detach(), b.detach()), (ta, tb))
    _, jvp_torch = torch.func.jvp(torch.matmul, (a.detach(), b.detach()), (ta, tb))
    torch.testing.assert_close(jvp_native, jvp_torch, rtol=1e-5, atol=1e-4)
    batched = torch.func.vmap(native.matmul, in_dims=(0, None))(torch.randn(3, 6, 5), b)
    assert batched.shape == (3, 6, 300)


@needs_native
def test_large_attention_gradients_fall_back_to_torch(monkeypatch):
    monkeypatch.setattr(native, 'MIN_MACS', 0)
    monkeypatch.setattr(native, 'NT_WORKSPACE_BYTES', 0)

    def fail(*args):
        raise AssertionError('kw_gemm_nt ran')
    monkeypatch.setattr(native, 'gemm_nt', fail)
    a = torch.randn(6, 5, requires_grad=True)
    b = torch.randn(5, 300)
    native.matmul(a, b).sum().backward()
    torch.testing.assert_close(a.grad, b.sum(1).expand(6, 5))


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
    monkeypatch.setattr(native, 'fused_conv2d_taps',
                        lambda *a, **k: used.append(1) or fused(*a, **k))
    monkeypatch.setattr(native, 'MIN_MACS', 0)
    monkeypatch.setattr(native, 'FUSED_POINTWISE_POSITIONS_PER_CELL', 1e9)
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
