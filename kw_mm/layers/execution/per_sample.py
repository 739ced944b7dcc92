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
convolving each sample with its assembled kernel (the layers'
``reference_forward``).

On CPU, oneDNN runs B ordinary dense convolutions faster than one convolution
with ``B ×`` the groups (the usual dynamic-convolution trick, kept for CUDA and
for depth-wise convolutions, where the grouped form is the faster one:
:mod:`.batched`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from ... import native
from ...native import taps, tuning
from ..recompute import hooks_unsupported
from .conditions import (
    native_backward_geometry,
    pointwise_native_applies,
    strided_native_backward,
    taps_macs,
)
from .geometry import (
    ConvGeometry,
    kernel_blocks,
    kernel_into_mixture_,
    mixture_to_kernel,
    pointwise_input,
)


def conv_one(g: ConvGeometry, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """One sample ``x [1, C, *S]`` (from :func:`~.geometry.padded_input`) through ``kernel``."""
    return g.conv(x, kernel, None, g.stride, g.conv_padding, g.dilation, g.groups)


def conv_one_backward(g: ConvGeometry, grad: torch.Tensor, x: torch.Tensor,
                      kernel: torch.Tensor, need_x: bool, need_kernel: bool
                      ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of :func:`conv_one` for ``x`` and ``kernel`` (None where not needed)."""
    grad_x, grad_kernel, _ = torch.ops.aten.convolution_backward(
        grad, x, kernel, None, g.stride, g.conv_padding, g.dilation, False, (0,) * g.ndim,
        g.groups, [need_x, need_kernel, False])
    return grad_x, grad_kernel


def run_native_taps(g: ConvGeometry, x: torch.Tensor,
                    mixed: torch.Tensor) -> Optional[torch.Tensor]:
    """All samples ``x [B, C, *S]`` (from :func:`~.geometry.padded_input`) through
    their mixtures ``[B, m, cell numel]`` with :func:`kw_mm.native.conv2d_taps`,
    which reads the mixtures as they are; None where it does not apply (see
    :func:`~.conditions.taps_macs` and :func:`~.conditions.pointwise_native_applies`;
    strided mixtures; :func:`kw_mm.native.usable`)."""
    if g.pointwise:
        if not (mixed.is_contiguous() and pointwise_native_applies(g, x)
                and native.usable(x, mixed, tuning.MIN_MACS)):
            return None
        return taps.conv2d_taps(pointwise_input(g, x), kernel_blocks(g, mixed),
                                (1, 1), (1, 1), (0, 0), (1, 1), g.cell_groups)
    macs = taps_macs(g, x)
    if macs is None or not mixed.is_contiguous() or not native.usable(x, mixed, macs):
        return None
    return taps.conv2d_taps(x, kernel_blocks(g, mixed), *g.taps_geometry, g.cell_groups)


def native_taps_backward(g: ConvGeometry, grad: torch.Tensor, x: torch.Tensor,
                         mixed: torch.Tensor, need_x: bool, need_kernel: bool,
                         reuse_mixed: bool
                         ) -> Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]:
    """Gradients of :func:`run_native_taps` for ``x`` and ``mixed`` through
    :func:`kw_mm.native.conv2d_taps_backward` (1×1 layers; k×k ones on small
    maps, strided ones too: see :func:`~.conditions.native_backward_geometry`),
    the mixtures' written over ``mixed`` with ``reuse_mixed``; None where that
    does not apply."""
    geometry = native_backward_geometry(g, grad, x)
    if geometry is None or not mixed.is_contiguous():
        return None
    kernels = kernel_blocks(g, mixed)
    grad_x, grad_kernels = taps.conv2d_taps_backward(
        geometry[0], kernels, grad, *geometry[1:4], need_x, need_kernel,
        kernels if reuse_mixed else None, g.cell_groups, stride=geometry[4])
    if grad_x is not None and g.pointwise and not g.unit_stride:
        full = grad_x.new_zeros(x.shape)
        full[:, :, ::g.stride[0], ::g.stride[1]] = grad_x
        grad_x = full
    return grad_x, None if grad_kernels is None else grad_kernels.view_as(mixed)


class PerSampleKernelConv(torch.autograd.Function):
    """``y[b] = conv_one(x[b:b+1], kernel of mixed[b])`` for every sample, or all
    samples at once through :func:`run_native_taps` where that applies (then
    the backward through :func:`native_taps_backward` too, where that applies).

    Its backward is not differentiable again (no second-order gradients
    through KW layers on CPU's native paths). Runs with autocast off: the
    caller casts ``x`` and ``mixed`` to the dtype the operation should run
    in. ``reuse_saved``: the saved ``mixed`` is rebuilt for the backward pass
    and owned by it alone (kernel recomputation), so the backward may
    overwrite it with its gradient (one sample after another, or one mixture
    block after another in the native backward) instead of allocating a
    second such tensor.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, mixed: torch.Tensor, geometry: ConvGeometry,
                reuse_saved: bool = False) -> torch.Tensor:
        ctx.geometry = geometry
        ctx.reuse_saved = reuse_saved
        ctx.save_for_backward(x, mixed)
        out = run_native_taps(geometry, x, mixed)
        ctx.native = out is not None
        if out is not None:
            return out
        return torch.cat([conv_one(geometry, x[b:b + 1], mixture_to_kernel(geometry, mixed[b]))
                          for b in range(x.shape[0])])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, mixed = ctx.saved_tensors
        g = ctx.geometry
        native_backward = ctx.native or strided_native_backward(g, grad_out, x)
        grad_x, grad_mixed = mixtures_backward(g, grad_out, x, mixed, *ctx.needs_input_grad[:2],
                                               ctx.reuse_saved, native_backward)
        return grad_x, grad_mixed, None, None


def mixtures_backward(g: ConvGeometry, grad_out: torch.Tensor, x: torch.Tensor,
                      mixed: torch.Tensor, need_x: bool, need_mixed: bool, reuse: bool,
                      native: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of :class:`PerSampleKernelConv`'s output for ``x`` and ``mixed``:
    all samples at once where ``native`` (the forward ran natively) and the
    native backward applies, else one sample at a time; the mixtures'
    written over ``mixed`` where ``reuse``."""
    if native:
        grads = native_taps_backward(g, grad_out, x, mixed, need_x, need_mixed, reuse)
        if grads is not None:
            return grads
    grad_x = [] if need_x else None
    grad_mixed = None
    if need_mixed:
        grad_mixed = mixed if reuse else torch.empty_like(mixed)
    for b in range(x.shape[0]):
        grad_xb, grad_kernel = conv_one_backward(g, grad_out[b:b + 1], x[b:b + 1],
                                                 mixture_to_kernel(g, mixed[b]), need_x,
                                                 need_mixed)
        if need_x:
            grad_x.append(grad_xb)
        if need_mixed:  # sample b's kernel is no longer needed: its slot may be reused
            kernel_into_mixture_(g, grad_mixed[b], grad_kernel)
    return (torch.cat(grad_x) if need_x else None), grad_mixed


def run_per_sample(g: ConvGeometry, x: torch.Tensor, mixed: torch.Tensor,
                   recompute_kernels: bool) -> torch.Tensor:
    """:class:`PerSampleKernelConv` in the dtype autocast would pick for a convolution.

    ``mixed`` straight from the layer's assembly: with ``recompute_kernels``
    the backward pass gets a rebuilt copy of it (see :mod:`..recompute`), so
    it may overwrite it.
    """
    rebuilt = recompute_kernels and not hooks_unsupported()
    device_type = x.device.type
    if not (torch.amp.is_autocast_available(device_type)
            and torch.is_autocast_enabled(device_type)):
        return PerSampleKernelConv.apply(x, mixed, g, rebuilt)
    dtype = torch.get_autocast_dtype(device_type)
    cast = mixed.to(dtype)
    # a cast copy is saved as itself, not rebuilt: then it must not be overwritten
    reuse = rebuilt and cast is mixed
    with torch.autocast(device_type, enabled=False):
        return PerSampleKernelConv.apply(x.to(dtype), cast, g, reuse)
