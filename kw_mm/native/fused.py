"""KW convolutions straight from the attentions and cells, without the kernels.

:func:`fused_conv2d_taps` is :func:`~kw_mm.native.conv2d_taps` of the kernels
``alpha @ cells``, assembled strip by strip inside the C kernel, and
:func:`fused_kernel_grads` gives its gradients for the attentions and cells:
the per-sample kernels (B × the layer's parameters) and their gradients are
never stored.
"""
import ctypes
from typing import Optional, Tuple

import torch

from . import gemm as _gemm
from . import taps as _taps
from . import tuning
from .bindings import _offsets


def _fused_layout(name: str, channels: int, kernel_size: Tuple[int, int],
                  cell_groups: Tuple[int, int]) -> Tuple[int, int, int, int, ctypes.Array]:
    """``(G_out, G_in, mixtures, cell_in, mix)`` of a fused taps product:
    ``mix[o·taps + t]`` is the mixture of output group ``o`` for tap
    ``t = (s, c)`` (kernel position, input group), as ``kw_fused_taps`` and
    ``kw_fused_kernel_grad`` read it. Raises for bad ``cell_groups``."""
    g_out, g_in = cell_groups
    if g_out < 1 or g_in < 1:
        raise ValueError(f'{name}: cell_groups must be two positive ints, got {cell_groups}')
    positions = kernel_size[0] * kernel_size[1]
    mix = _offsets([(s * g_out + o) * g_in + c for o in range(g_out) for s in range(positions)
                    for c in range(g_in)])
    return g_out, g_in, positions * g_out * g_in, channels // g_in, mix


def fused_conv2d_taps(x: torch.Tensor, alpha: torch.Tensor, cells: torch.Tensor,
                      kernel_size: Tuple[int, int], stride: Tuple[int, int],
                      padding: Tuple[int, int], dilation: Tuple[int, int],
                      cell_groups: Tuple[int, int] = (1, 1)) -> torch.Tensor:
    """:func:`~kw_mm.native.conv2d_taps` of the kernels ``alpha @ cells``, never built.

    ``alpha [B, m, n]``, ``cells [n, cell_out·cell_in]`` (every mixture mixes
    the same cells) or ``[m, n, cell_out·cell_in]`` (mixture ``i`` mixes
    ``cells[i]``: a layer's kernel basis, :mod:`kw_mm.layers.execution.kernel_basis`); with
    ``cell_groups = (G_out, G_in)`` the layer's ``out = G_out·cell_out`` and
    ``in = G_in·cell_in`` channels are split into groups, and mixture
    ``i = (s·G_out + o)·G_in + c`` (``m = kh·kw·G_out·G_in`` of them) is the
    block of kernel position ``s``, output group ``o`` and input group ``c``
    (the layout of KW's kernel partition).

    No autograd (inference; training through
    :class:`kw_mm.layers.execution.fused.FusedKernelConv`). ``kw_fused_taps``
    assembles each strip of 8 rows of every sample's mixtures into a
    per-thread buffer and convolves with it at once, so the per-sample kernels
    (B × the layer's parameters) are neither written to memory nor read back.
    """
    lib, source = _taps._taps_setup('fused_conv2d_taps', x, kernel_size, stride, padding,
                                    dilation, unpadded=tuning.UNPADDED_TAPS, alpha=alpha,
                                    cells=cells)
    batch, channels = x.shape[:2]
    positions = kernel_size[0] * kernel_size[1]
    g_out, g_in, mixtures, cell_in, mix = _fused_layout('fused_conv2d_taps', channels,
                                                        kernel_size, cell_groups)
    own = cells.dim() == 3
    if (alpha.dim() != 3 or alpha.shape[:2] != (batch, mixtures) or cells.dim() not in (2, 3)
            or (own and cells.shape[0] != mixtures)
            or cells.shape[-2] != alpha.shape[2] or channels % g_in
            or cells.shape[-1] % cell_in):
        raise ValueError(f'fused_conv2d_taps: alpha {tuple(alpha.shape)} and cells '
                         f'{tuple(cells.shape)} do not fit input {tuple(x.shape)}, kernel '
                         f'size {kernel_size} and cell_groups {cell_groups}')
    cell_out = cells.shape[-1] // cell_in
    taps = positions * g_in
    alpha = alpha.reshape(batch * mixtures, -1).contiguous()
    cells = cells.contiguous() if own else _gemm._rows(cells)
    phases = source.phases
    ldb = phases.stride(1)
    b_off = _offsets([source.offsets[s] + c * cell_in * ldb for s in range(positions)
                      for c in range(g_in)])
    out = source.output(batch, g_out * cell_out)
    failed = lib.kw_fused_taps(
        batch, cell_out, source.cols, cell_in, taps, g_out, cells.shape[-2],
        alpha.data_ptr(), alpha.stride(0), cells.data_ptr(), cells.stride(-2),
        cells.stride(0) if own else 0, phases.data_ptr(),
        phases.stride(0), ldb, b_off, source.masks(g_in), mix, out.data_ptr(), out.stride(0),
        out.stride(1),
        torch.get_num_threads())
    if failed:
        raise MemoryError('kw_fused_taps: could not allocate its per-thread buffers')
    return source.crop(out)


def fused_kernel_grads(x: torch.Tensor, grad: torch.Tensor, alpha: torch.Tensor,
                       cells: torch.Tensor, kernel_size: Tuple[int, int],
                       stride: Tuple[int, int], padding: Tuple[int, int],
                       dilation: Tuple[int, int],
                       cell_groups: Tuple[int, int] = (1, 1), need_alpha: bool = True,
                       need_cells: bool = True
                       ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of :func:`fused_conv2d_taps` for ``alpha`` and ``cells`` (None
    where not needed), given the output's gradient ``grad``.

    No autograd. Each mixture's gradient ``D[b, i]`` (the gradient of the
    kernels :func:`conv2d_taps_backward` would return) is computed strip by
    strip inside ``kw_fused_kernel_grad`` and used there for both
    ``grad_alpha[b, i, j] = Σ D[b, i] ⊙ cells[j]`` and
    ``grad_cells[j] = Σ_(b, i) alpha[b, i, j] · D[b, i]``: the ``B × m``
    mixture gradients are never stored.
    """
    lib, source = _taps._taps_setup('fused_kernel_grads', x, kernel_size, stride, padding,
                                    dilation, alpha=alpha, cells=cells, grad=grad)
    batch, channels = x.shape[:2]
    positions = kernel_size[0] * kernel_size[1]
    g_out, g_in, mixtures, cell_in, mix = _fused_layout('fused_kernel_grads', channels,
                                                        kernel_size, cell_groups)
    if (alpha.dim() != 3 or alpha.shape[:2] != (batch, mixtures)
            or cells.dim() != 2 or cells.shape[0] != alpha.shape[2] or channels % g_in
            or cells.shape[1] % cell_in):
        raise ValueError(f'fused_kernel_grads: alpha {tuple(alpha.shape)} and cells '
                         f'{tuple(cells.shape)} do not fit input {tuple(x.shape)}, kernel '
                         f'size {kernel_size} and cell_groups {cell_groups}')
    cell_out = cells.shape[1] // cell_in
    if tuple(grad.shape) != (batch, g_out * cell_out, source.out_h, source.out_w):
        raise ValueError(f'fused_kernel_grads: grad of shape {tuple(grad.shape)} does not fit '
                         f'the output {(batch, g_out * cell_out, source.out_h, source.out_w)}')
    if not (need_alpha or need_cells):
        return None, None
    ncells = cells.shape[0]
    grad_alpha = torch.empty(batch * mixtures, ncells) if need_alpha else None
    grad_cells = torch.empty(ncells, cells.shape[1]) if need_cells else None
    g_grid = _taps._grad_on_grid(grad, source)
    # the input's grid (its phases, for stride > 1) transposed: grid position q of
    # tap (s, c) reads row offsets[s] + q
    grid_t = source.phases.view(batch, channels, -1).transpose(1, 2).contiguous()
    taps = positions * g_in
    x_off = _offsets([source.offsets[s] * channels + c * cell_in for s in range(positions)
                      for c in range(g_in)])
    alpha = alpha.reshape(batch * mixtures, -1).contiguous()
    cells = _gemm._rows(cells)
    failed = lib.kw_fused_kernel_grad(
        batch, cell_out, source.cols, cell_in, taps, g_out, ncells, alpha.data_ptr(),
        alpha.stride(0), cells.data_ptr(), cells.stride(0), g_grid.data_ptr(),
        g_grid.stride(0), g_grid.stride(1), grid_t.data_ptr(), grid_t.stride(0),
        grid_t.stride(1), x_off, mix,
        grad_alpha.data_ptr() if need_alpha else None, ncells,
        grad_cells.data_ptr() if need_cells else None, cells.shape[1], torch.get_num_threads())
    if failed:
        raise MemoryError('kw_fused_kernel_grad: could not allocate its per-thread buffers')
    if grad_alpha is not None:
        grad_alpha = grad_alpha.view(batch, mixtures, ncells)
    return grad_alpha, grad_cells
