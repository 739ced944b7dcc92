"""The fused CPU path: the kernels ``alpha @ cells`` assembled strip by strip
inside the convolution (:func:`kw_mm.native.fused_conv2d_taps`), never
stored. Used in inference, and while training with ``recompute_kernels``
(:class:`FusedKernelConv` rebuilds the mixtures in the backward pass), for
2-d layers with one group and shared cells (see
:func:`~.conditions.fused_applies`).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from ... import native
from .conditions import fused_applies, fused_grads_apply
from .geometry import POINTWISE_TAPS, ConvGeometry, pointwise_input
from .per_sample import mixtures_backward

MixCells = Callable[[torch.Tensor], torch.Tensor]


def run_fused(g: ConvGeometry, x: torch.Tensor, alpha: torch.Tensor,
              cells: torch.Tensor) -> torch.Tensor:
    """:func:`kw_mm.native.fused_conv2d_taps` of ``x`` (from
    :func:`~.geometry.padded_input`) with the kernels ``alpha @ cells`` (no autograd)."""
    if g.pointwise:
        x, geometry = pointwise_input(g, x), POINTWISE_TAPS
    else:
        geometry = g.taps_geometry
    return native.fused.fused_conv2d_taps(x, alpha, cells, *geometry, cell_groups=g.cell_groups)


def fused_mixture_grads(g: ConvGeometry, grad: torch.Tensor, x: torch.Tensor,
                        alpha: torch.Tensor, cells: torch.Tensor, need_alpha: bool,
                        need_cells: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of :func:`run_fused` for ``alpha`` and ``cells`` through
    :func:`kw_mm.native.fused_kernel_grads` (the mixtures' gradient never
    stored), where :func:`~.conditions.fused_grads_apply`."""
    if g.pointwise:
        x, geometry = pointwise_input(g, x), POINTWISE_TAPS
    else:
        geometry = g.taps_geometry
    return native.fused.fused_kernel_grads(x, grad, alpha, cells, *geometry, g.cell_groups,
                                           need_alpha, need_cells)


class FusedKernelConv(torch.autograd.Function):
    """The layer's output through :func:`run_fused`, for training with
    ``recompute_kernels``: only ``x``, ``alpha`` and the cells are kept.

    The backward pass rebuilds the mixtures with ``mix_cells`` (the layer's
    assembly, as the unfused forward runs it: the same numbers) for the
    input's gradient (:func:`~.per_sample.mixtures_backward`). Where
    :func:`~.conditions.fused_grads_apply` (small maps, as the native
    backward), the gradients of ``alpha`` and the cells come from
    :func:`fused_mixture_grads`, which never stores the mixtures' gradient;
    elsewhere from that gradient, written over the rebuilt mixtures.
    ``alpha [B, m, n]``, ``cells [n, cell numel]``, float32 on CPU.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: torch.Tensor, cells: torch.Tensor,
                geometry: ConvGeometry, mix_cells: MixCells) -> torch.Tensor:
        ctx.geometry = geometry
        ctx.mix_cells = mix_cells
        ctx.save_for_backward(x, alpha, cells)
        return run_fused(geometry, x, alpha, cells)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, alpha, cells = ctx.saved_tensors
        need_x, need_alpha, need_cells = ctx.needs_input_grad[:3]
        g = ctx.geometry
        # where the native backward applies, the attentions' and cells' gradients
        # come without storing the mixtures' (the rebuilt mixtures serve x's only)
        fused = fused_grads_apply(g, grad_out, x)
        need_mixed = not fused and (need_alpha or need_cells)
        grad_x = grad_mixed = None
        if need_x or need_mixed:
            with torch.no_grad():
                mixed = ctx.mix_cells(alpha)
            grad_x, grad_mixed = mixtures_backward(g, grad_out, x, mixed, need_x, need_mixed,
                                                   True, True)
            del mixed
        if fused:
            grad_alpha, grad_cells = fused_mixture_grads(g, grad_out, x, alpha, cells,
                                                         need_alpha, need_cells)
            return grad_x, grad_alpha, grad_cells, None, None
        grad_alpha = grad_cells = None
        if need_mixed:
            batch, mixtures = alpha.shape[:2]
            grad_alpha, grad_cells = native.small_k_grads(
                alpha.reshape(batch * mixtures, -1).contiguous(), cells,
                grad_mixed.view(batch * mixtures, -1), need_alpha, need_cells)
            if grad_alpha is not None:
                grad_alpha = grad_alpha.view_as(alpha)
        return grad_x, grad_alpha, grad_cells, None, None


def try_fused(g: ConvGeometry, x: torch.Tensor, alpha: torch.Tensor, cells: torch.Tensor,
              recompute_kernels: bool, mix_cells: MixCells) -> Optional[torch.Tensor]:
    """The layer through :func:`run_fused` where :func:`~.conditions.fused_applies`:
    in inference, and while training with ``recompute_kernels``; else None.
    ``x`` from :func:`~.geometry.padded_input`, ``cells`` the warehouse's."""
    graph = torch.is_grad_enabled() and (x.requires_grad or alpha.requires_grad
                                         or cells.requires_grad)
    if graph and not recompute_kernels:
        return None  # the backward pass needs the kernels: assembled and kept
    if not fused_applies(g, x, alpha):
        return None
    cells = cells.reshape(g.num_cells, -1).to(x.dtype)
    if graph:
        return FusedKernelConv.apply(x, alpha, cells, g, mix_cells)
    return run_fused(g, x, alpha, cells)
