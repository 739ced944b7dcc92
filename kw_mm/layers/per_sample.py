"""The CPU forward/backward of a KW convolution: one sample at a time, with
each sample's kernel reordered from the warehouse's layout just before use
(1×1 layers, and the k×k ones on small maps, instead read the mixtures in
place, all samples at once, through ``kw_mm.native.conv2d_taps`` and its
backward where those apply).

The assembly matmul (paper Eq. 3) yields every sample's mixtures in the
warehouse's layout ``[B, m, cell numel]``; a convolution wants
``[out, in/groups, *k]``. Reordering all ``B`` kernels at once is a pass of
``B ×`` the layer's kernel through memory (75 MB per ResNet50 last-stage
layer at batch 8), and autograd's backward then stacks the per-sample
kernel gradients and reorders them back: two more such passes and two more
such tensors alive at once. :class:`PerSampleKernelConv` instead reorders
one sample's kernel (a few MB, still in cache when the convolution reads
it), and in backward writes each sample's kernel gradient straight into a
gradient in the warehouse's layout. The arithmetic is the same as
convolving each sample with its assembled kernel
(:meth:`~kw_mm.layers.kw_conv._KWConvNd.reference_forward`).

On CPU, oneDNN runs B ordinary dense convolutions faster than one convolution
with ``B ×`` the groups (the usual dynamic-convolution trick, kept for CUDA and
for depth-wise convolutions, where the grouped form is the faster one).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from .. import native
from .recompute import hooks_unsupported


class PerSampleKernelConv(torch.autograd.Function):
    """``y[b] = layer.apply_kernel(x[b:b+1], kernel of mixed[b])`` for every sample.

    ``layer`` provides ``mixture_to_kernel`` / ``kernel_into_mixture_`` (the
    reorder and its inverse), ``apply_kernel`` and ``apply_kernel_backward``,
    and ``apply_kernels_native``: the forward of all samples at once straight
    from the mixtures (native CPU kernels), or None where that does not apply;
    after it, ``apply_kernels_native_backward`` gives the backward the same
    way, or None. Its backward is not differentiable again (no second-order
    gradients through KW layers on CPU's native paths).
    Runs with autocast off: the caller casts ``x`` and ``mixed`` to the
    dtype the operation should run in. ``reuse_saved``: the saved ``mixed``
    is rebuilt for the backward pass and owned by it alone (kernel
    recomputation), so the backward may overwrite it with its gradient
    (one sample after another, or one mixture block after another in the
    native backward) instead of allocating a second such tensor.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, mixed: torch.Tensor, layer,
                reuse_saved: bool = False) -> torch.Tensor:
        ctx.layer = layer
        ctx.reuse_saved = reuse_saved
        ctx.save_for_backward(x, mixed)
        out = layer.apply_kernels_native(x, mixed)
        ctx.native = out is not None
        if out is not None:
            return out
        return torch.cat([layer.apply_kernel(x[b:b + 1], layer.mixture_to_kernel(mixed[b]))
                          for b in range(x.shape[0])])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, mixed = ctx.saved_tensors
        native_backward = ctx.native or ctx.layer.strided_native_backward(grad_out, x)
        grad_x, grad_mixed = mixtures_backward(ctx.layer, grad_out, x, mixed,
                                               *ctx.needs_input_grad[:2], ctx.reuse_saved,
                                               native_backward)
        return grad_x, grad_mixed, None, None


def mixtures_backward(layer, grad_out: torch.Tensor, x: torch.Tensor, mixed: torch.Tensor,
                      need_x: bool, need_mixed: bool, reuse: bool, native: bool
                      ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of :class:`PerSampleKernelConv`'s output for ``x`` and ``mixed``:
    all samples at once where ``native`` (the forward ran natively) and the
    layer's native backward applies, else one sample at a time; the mixtures'
    written over ``mixed`` where ``reuse``."""
    if native:
        grads = layer.apply_kernels_native_backward(grad_out, x, mixed, need_x, need_mixed,
                                                    reuse)
        if grads is not None:
            return grads
    grad_x = [] if need_x else None
    grad_mixed = None
    if need_mixed:
        grad_mixed = mixed if reuse else torch.empty_like(mixed)
    for b in range(x.shape[0]):
        grad_xb, grad_kernel = layer.apply_kernel_backward(
            grad_out[b:b + 1], x[b:b + 1], layer.mixture_to_kernel(mixed[b]),
            need_x, need_mixed)
        if need_x:
            grad_x.append(grad_xb)
        if need_mixed:  # sample b's kernel is no longer needed: its slot may be reused
            layer.kernel_into_mixture_(grad_mixed[b], grad_kernel)
    return (torch.cat(grad_x) if need_x else None), grad_mixed


class FusedKernelConv(torch.autograd.Function):
    """A KW layer's output through ``layer.apply_fused(x, alpha, cells)`` (the
    kernels ``alpha @ cells`` assembled inside the convolution, never stored),
    for training with ``recompute_kernels``: only ``x``, ``alpha`` and the
    cells are kept. The backward pass rebuilds the mixtures
    (``layer.mix_cells``, the unfused forward's assembly: the same numbers)
    for the input's gradient (:func:`mixtures_backward`). Where
    ``layer.fused_grads_apply`` (small maps, as the native backward), the
    gradients of ``alpha`` and the cells come from
    ``layer.fused_mixture_grads``, which never stores the mixtures' gradient;
    elsewhere from that gradient, written over the rebuilt mixtures.
    ``alpha [B, m, n]``, ``cells [n, cell numel]``, float32 on CPU.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: torch.Tensor, cells: torch.Tensor,
                layer) -> torch.Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x, alpha, cells)
        return layer.apply_fused(x, alpha, cells)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, alpha, cells = ctx.saved_tensors
        need_x, need_alpha, need_cells = ctx.needs_input_grad[:3]
        layer = ctx.layer
        # where the native backward applies, the attentions' and cells' gradients
        # come without storing the mixtures' (the rebuilt mixtures serve x's only)
        fused = layer.fused_grads_apply(grad_out, x)
        need_mixed = not fused and (need_alpha or need_cells)
        grad_x = grad_mixed = None
        if need_x or need_mixed:
            with torch.no_grad():
                mixed = layer.mix_cells(alpha)
            grad_x, grad_mixed = mixtures_backward(layer, grad_out, x, mixed, need_x,
                                                   need_mixed, True, True)
            del mixed
        if fused:
            grad_alpha, grad_cells = layer.fused_mixture_grads(grad_out, x, alpha, cells,
                                                               need_alpha, need_cells)
            return grad_x, grad_alpha, grad_cells, None
        grad_alpha = grad_cells = None
        if need_mixed:
            batch, mixtures = alpha.shape[:2]
            grad_alpha, grad_cells = native.small_k_grads(
                alpha.reshape(batch * mixtures, -1).contiguous(), cells,
                grad_mixed.view(batch * mixtures, -1), need_alpha, need_cells)
            if grad_alpha is not None:
                grad_alpha = grad_alpha.view_as(alpha)
        return grad_x, grad_alpha, grad_cells, None


def _rebuilt(layer) -> bool:
    """Whether the saved mixtures are rebuilt for backward (kernel recomputation
    with its hooks in place), so the backward owns them and may overwrite them."""
    return layer.recompute_kernels and not hooks_unsupported()


def run_per_sample(layer, x: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
    """:class:`PerSampleKernelConv` in the dtype autocast would pick for a convolution.

    ``mixed`` straight from the layer's assembly: with ``recompute_kernels``
    the backward pass gets a rebuilt copy of it (see :mod:`.recompute`).
    """
    device_type = x.device.type
    if not (torch.amp.is_autocast_available(device_type)
            and torch.is_autocast_enabled(device_type)):
        return PerSampleKernelConv.apply(x, mixed, layer, _rebuilt(layer))
    dtype = torch.get_autocast_dtype(device_type)
    cast = mixed.to(dtype)
    # a cast copy is saved as itself, not rebuilt: then it must not be overwritten
    reuse = _rebuilt(layer) and cast is mixed
    with torch.autocast(device_type, enabled=False):
        return PerSampleKernelConv.apply(x.to(dtype), cast, layer, reuse)
