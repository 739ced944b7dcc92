"""kw_mm.native's matrix products (gemm_nn, gemm_nn_batched, gemm_nt), their autograd and
where matmul / bmm take them."""
import math

import pytest
import torch
from native_helpers import needs_native, num_threads

from kw_mm import native


def float64_product(a, b):
    return (a.double() @ b.double())


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
    monkeypatch.setattr(native.tuning, 'MIN_MACS', 0)
    used = []
    product = native.gemm_nn_batched
    monkeypatch.setattr(native.gemm, 'gemm_nn_batched', lambda *a: used.append(1) or product(*a))
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
    monkeypatch.setattr(native.tuning, 'MIN_MACS', 0)
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
    monkeypatch.setattr(native.gemm, 'gemm_nn_batched', fail)
    native.bmm(a.double(), b.double())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        native.bmm(a, b)
    with pytest.raises(RuntimeError):  # torch.bmm's own error
        native.bmm(a, b.transpose(1, 2))
    with pytest.raises(AssertionError, match='C kernels ran'):
        native.bmm(a, b)


@needs_native
def test_forward_mode_ad_takes_torch_products(monkeypatch):
    monkeypatch.setattr(native.tuning, 'MIN_MACS', 0)

    def fail(*args):
        raise AssertionError('the C kernels ran')
    for kernel in ('gemm_nn', 'gemm_nn_batched'):
        monkeypatch.setattr(native.gemm, kernel, fail)
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
    monkeypatch.setattr(native.tuning, 'MIN_MACS', 0)
    w = torch.randn(2, 6, 5, requires_grad=True)
    kernel = w * 2
    ref = weakref.ref(kernel)
    out = native.bmm(kernel, torch.randn(2, 5, 300))  # the input needs no gradient
    del kernel
    assert ref() is None  # only the input is saved (for the kernel's gradient)
    out.sum().backward()
    assert w.grad is not None


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


@needs_native
def test_not_used_for_float64_autocast_or_small_products(monkeypatch):
    def fail(*args):
        raise AssertionError('the C kernels ran')
    monkeypatch.setattr(native.gemm, 'gemm_nn', fail)
    a, b = torch.randn(72, 47), torch.randn(47, 262_144)
    native.matmul(a.double(), b.double())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        native.matmul(a, b)
    native.matmul(a[:2, :3], b[:3, :100])  # below MIN_MACS
    with pytest.raises(AssertionError, match='C kernels ran'):
        native.matmul(a, b)


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
    monkeypatch.setattr(native.tuning, 'MIN_MACS', 0)
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
    monkeypatch.setattr(native.tuning, 'MIN_MACS', 0)
    monkeypatch.setattr(native.tuning, 'NT_WORKSPACE_BYTES', 0)

    def fail(*args):
        raise AssertionError('kw_gemm_nt ran')
    monkeypatch.setattr(native.gemm, 'gemm_nt', fail)
    a = torch.randn(6, 5, requires_grad=True)
    b = torch.randn(5, 300)
    native.matmul(a, b).sum().backward()
    torch.testing.assert_close(a.grad, b.sum(1).expand(6, 5))
