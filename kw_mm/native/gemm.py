"""Native matrix products and their autograd: ``gemm_nn``, ``gemm_nn_batched``,
``gemm_nt``, and :func:`matmul` / :func:`bmm`, which take them where
:func:`~kw_mm.native.usable` says they apply and torch's products elsewhere.

The kernels are written for KW's assembly shapes: a short inner dimension
(the warehouse's cells, or the ``B·m`` mixtures in the cell gradient) and a
long outer one (a cell's numel), which general BLAS kernels tile poorly; the
same register-tiled product, batched, runs the 1×1 KW convolutions.
"""
from typing import Optional, Tuple

import torch

from . import library, tuning


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a matrix with unit column stride (a copy only if needed)."""
    return t if t.stride(1) == 1 and t.stride(0) >= t.shape[1] else t.contiguous()


def _batch_rows(t: torch.Tensor) -> torch.Tensor:
    """``t [S, R, C]`` as matrices with unit column stride (a copy only if needed)."""
    if t.stride(2) == 1 and t.stride(1) >= t.shape[2]:
        return t
    return t.contiguous()


def _product(kernel: str, x: torch.Tensor, y: torch.Tensor, cols: int) -> torch.Tensor:
    """Run ``kw_gemm_<kernel>(rows, cols, inner, x, ldx, y, ldy, out, ldout, threads)``."""
    lib = library._require()
    x, y = _rows(x), _rows(y)
    out = torch.empty(x.shape[0], cols, dtype=torch.float32)
    if out.numel() == 0 or x.shape[1] == 0:
        return out.zero_()
    failed = getattr(lib, 'kw_gemm_' + kernel)(
        x.shape[0], cols, x.shape[1], x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0),
        out.data_ptr(), out.stride(0), torch.get_num_threads())
    if failed:
        raise MemoryError(f'kw_gemm_{kernel}: could not allocate its per-thread workspace')
    return out


def _check(name: str, x: torch.Tensor, y: torch.Tensor, x_dim: int, y_dim: int) -> None:
    for label, t in (('first', x), ('second', y)):
        if t.dim() != 2 or t.dtype != torch.float32 or t.device.type != 'cpu':
            raise ValueError(f'{name}: the {label} operand must be a float32 CPU matrix, got '
                             f'{t.dtype} {t.device.type} of shape {tuple(t.shape)}')
    if x.shape[x_dim] != y.shape[y_dim]:
        raise ValueError(f'{name}: inner dimensions differ, shapes {tuple(x.shape)} and '
                         f'{tuple(y.shape)}')


def gemm_nn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for float32 CPU matrices ``a [M, K]``, ``b [K, N]`` (no autograd)."""
    _check('gemm_nn', a, b, 1, 0)
    return _product('nn', a, b, b.shape[1])


def gemm_nn_batched(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(a, b)`` for float32 CPU tensors ``a [S, M, K]``, ``b [S, K, N]`` (no autograd).

    ``a`` may be a transposed view: each matrix needs a unit stride along
    either dimension, ``b`` along its rows.
    """
    for label, t in (('first', a), ('second', b)):
        if t.dim() != 3 or t.dtype != torch.float32 or t.device.type != 'cpu':
            raise ValueError(f'gemm_nn_batched: the {label} operand must be a 3-D float32 CPU '
                             f'tensor, got {t.dtype} {t.device.type} of shape {tuple(t.shape)}')
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f'gemm_nn_batched: shapes {tuple(a.shape)} and {tuple(b.shape)} do not '
                         f'multiply as batches of matrices')
    lib = library._require()
    if not (a.stride(2) == 1 or a.stride(1) == 1):  # rows or columns of A may be strided
        a = a.contiguous()
    b = _batch_rows(b)
    batch, rows, inner = a.shape
    out = torch.empty(batch, rows, b.shape[2], dtype=torch.float32)
    if out.numel() == 0 or inner == 0:
        return out.zero_()
    lib.kw_gemm_nn_batched(batch, rows, b.shape[2], inner,
                           a.data_ptr(), a.stride(0), a.stride(1), a.stride(2),
                           b.data_ptr(), b.stride(0), b.stride(1),
                           out.data_ptr(), out.stride(0), out.stride(1), torch.get_num_threads())
    return out


def gemm_nt(g: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``g @ e.T`` for float32 CPU matrices ``g [M, D]``, ``e [P, D]`` (no autograd)."""
    _check('gemm_nt', g, e, 1, 1)
    return _product('nt', g, e, e.shape[0])


class _NativeProduct(torch.autograd.Function):
    """A native ``a @ b``; subclasses give the product and the backward. Each
    operand is saved only if the other one's gradient needs it (as torch's
    products do), so a kernel multiplying an input without gradient is not kept.
    Not used under forward-mode AD (see :func:`~kw_mm.native.usable`)."""

    @staticmethod
    def _save(ctx, a: torch.Tensor, b: torch.Tensor) -> None:
        need_a, need_b = ctx.needs_input_grad[:2]
        ctx.save_for_backward(a if need_b else None, b if need_a else None)


class SmallKMatmul(_NativeProduct):
    """``a @ b`` (``a [M, K]`` short, ``b [K, N]`` long) with native forward and backward.

    A backward that builds a graph (``create_graph=True``) uses torch's
    products, so higher derivatives work.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        _NativeProduct._save(ctx, a, b)
        return gemm_nn(a, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # differentiating the backward itself
            return (grad @ b.t() if need_a else None), (a.t() @ grad if need_b else None)
        return small_k_grads(a, b, grad, need_a, need_b)


def small_k_grads(a: Optional[torch.Tensor], b: Optional[torch.Tensor], grad: torch.Tensor,
                  need_a: bool, need_b: bool
                  ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of ``a @ b`` (``a [M, K]``, ``b [K, N]``, float32 CPU) given the
    output's: ``grad @ bᵀ`` and ``aᵀ @ grad`` with the native kernels, None
    where not needed (no autograd)."""
    grad_a = None
    if need_a:
        fits = tuning.nt_workspace_fits(grad.shape[0], b.shape[0])
        grad_a = gemm_nt(grad, b) if fits else grad @ b.t()
    grad_b = gemm_nn(a.t().contiguous(), grad) if need_b else None
    return grad_a, grad_b


def _grad_of_b(a: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``aᵀ @ grad`` for ``a [S, M, K]``, ``grad [S, M, N]``."""
    cols = grad.shape[2]
    if torch.is_grad_enabled() or not library.usable(a, grad, a.numel() * cols):
        return torch.bmm(a.transpose(1, 2), grad)
    if cols >= tuning.TRANSPOSED_MIN_COLS:
        return gemm_nn_batched(a.transpose(1, 2), grad)
    if cols <= tuning.SWAP_MAX_COLS:  # the transposed operand is the short one: strides stay small
        return gemm_nn_batched(grad.transpose(1, 2), a).transpose(1, 2)
    return torch.bmm(a.transpose(1, 2), grad)


class BatchedMatmul(_NativeProduct):
    """``torch.bmm(a, b)`` with the native kernel in forward and (by shape) for ``b``'s gradient.

    ``a``'s gradient (``grad @ bᵀ``, inner dimension ``N``) stays with torch.
    A backward that builds a graph uses torch's products throughout.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        _NativeProduct._save(ctx, a, b)
        return gemm_nn_batched(a, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[:2]
        grad_a = torch.bmm(grad, b.transpose(1, 2)) if need_a else None
        grad_b = _grad_of_b(a, grad) if need_b else None
        return grad_a, grad_b


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(a, b)``: native where :func:`~kw_mm.native.usable`, else torch's."""
    if (a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]
            or not library.usable(a, b, a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2])):
        return torch.bmm(a, b)  # raises its own error for bad shapes
    return BatchedMatmul.apply(a, b)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for ``a [..., K]`` and a matrix ``b [K, N]``: native where
    :func:`~kw_mm.native.usable`, else ``torch.matmul``."""
    lead, k = a.shape[:-1], a.shape[-1]
    rows = a.numel() // max(k, 1)
    if (a.dim() < 2 or b.dim() != 2 or k != b.shape[0]  # torch.matmul raises its own error
            or not library.usable(a, b, rows * k * b.shape[1])):
        return torch.matmul(a, b)
    return SmallKMatmul.apply(a.reshape(rows, k), b).view(*lead, b.shape[1])
