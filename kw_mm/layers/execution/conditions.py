"""Where each execution path of a KW convolution applies: every test that
picks a path, and the threshold each reads, in one place.

The thresholds themselves (all read at call time, so they can be tuned):

=========================================  ===============================================
``kw_mm.native.tuning.MIN_MACS``           below it the native kernels' call overhead wins
``kw_mm.native.conv2d_taps_pays``          taps convolution beats oneDNN's (small maps)
``kw_mm.native.fused_pointwise_pays``      fused 1×1: assembly a large share of the work
``kw_mm.native.conv2d_taps_backward_pays`` native backward: few output columns per row
:data:`KERNEL_BASIS_MEMORY_RATIO`          kernel basis: at most this × the warehouse
=========================================  ===============================================

Every function here takes the layer's :class:`~.geometry.ConvGeometry` and
tensors; none builds anything.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import native
from ...native import tuning
from .geometry import ConvGeometry, pointwise_input, pointwise_positions

#: the kernel basis may hold at most this many times the layer's warehouse (cell rows).
KERNEL_BASIS_MEMORY_RATIO = 1.25


def kernel_basis_pays(mixtures: int, rows: int, cells: int) -> bool:
    """Whether mixing ``rows`` kernel-basis rows per mixture beats mixing
    ``cells`` warehouse cells: at most half the multiply-adds, and a basis of
    at most :data:`KERNEL_BASIS_MEMORY_RATIO` × the warehouse (the fused
    forward streams through the warehouse per call anyway, see
    :mod:`.kernel_basis`)."""
    return 2 * rows <= cells and mixtures * rows <= KERNEL_BASIS_MEMORY_RATIO * cells


def native_batch_paths(x: torch.Tensor) -> bool:
    """Whether a single sample should take the batch paths: where kw_mm's
    native CPU kernels can run (float32 CPU, no autocast, tracing, functorch
    transform or forward-mode AD)."""
    return x.device.type == 'cpu' and native.usable(x, x, tuning.MIN_MACS)


def taps_macs(g: ConvGeometry, x: torch.Tensor) -> Optional[int]:
    """Multiply-adds of the layer on ``x`` (from :func:`~.geometry.padded_input`)
    where its kernels can run as :func:`kw_mm.native.conv2d_taps` and
    :func:`kw_mm.native.fused_conv2d_taps` read them (2-d, one group,
    partitioned) and :func:`kw_mm.native.conv2d_taps_pays`; else None."""
    if not (g.ndim == 2 and g.groups == 1 and g.partitioned):
        return None
    out_h, out_w = native.conv2d_output_size(x.shape[2:], g.kernel_size, g.stride,
                                             g.conv_padding, g.dilation)
    if not native.conv2d_taps_pays(g.kernel_numel, out_h, out_w, g.stride):
        return None
    return x.shape[0] * g.kernel_numel * out_h * out_w


def pointwise_native_applies(g: ConvGeometry, x: torch.Tensor) -> bool:
    """Whether a 1×1 layer's products run natively on the mixtures as they are
    (:func:`~.per_sample.run_native_taps`), at any map size: the same product
    kernel as the reordered kernels' batched product, without reordering."""
    if g.ndim != 2 or not g.partitioned or g.private_cells:  # private cells mix strided
        return False
    macs = x.shape[0] * g.out_channels * g.in_channels * pointwise_positions(g, x)
    return native.usable(x, x, macs)


def fused_applies(g: ConvGeometry, x: torch.Tensor, alpha: torch.Tensor) -> bool:
    """Whether :func:`~.fused.run_fused` runs for ``x`` (from
    :func:`~.geometry.padded_input`) and ``alpha``: 2-d layers with one group
    and shared cells; 1×1 ones where :func:`kw_mm.native.fused_pointwise_pays`,
    k×k ones where :func:`kw_mm.native.conv2d_taps_pays`."""
    if g.private_cells or not (g.ndim == 2 and g.groups == 1 and g.partitioned):
        return False
    if g.pointwise:
        positions = pointwise_positions(g, x)
        if not native.fused_pointwise_pays(g.num_cells, positions):
            return False
        macs = x.shape[0] * g.out_channels * g.in_channels * positions
    else:
        macs = taps_macs(g, x)
    return macs is not None and native.usable(x, alpha, macs)


def grid_w(g: ConvGeometry, x: torch.Tensor) -> int:
    """Columns per row of a k×k layer's taps grid (of each phase, for stride > 1)."""
    return -(-(x.shape[3] + 2 * g.conv_padding[1]) // g.stride[1])


def fused_grads_apply(g: ConvGeometry, grad: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether :func:`~.fused.fused_mixture_grads` runs for this output gradient
    and input (from :func:`~.geometry.padded_input`): float32, the grid of
    output columns small enough (:func:`kw_mm.native.conv2d_taps_backward_pays`)."""
    if grad.dtype != torch.float32:
        return False
    if g.pointwise:
        return True
    return native.conv2d_taps_backward_pays(grad.shape[2], grid_w(g, x))


def native_backward_geometry(g: ConvGeometry, grad: torch.Tensor,
                             x: torch.Tensor) -> Optional[tuple]:
    """``(input, kernel_size, padding, dilation, stride)`` of the layer as a
    taps convolution, where its backward runs natively (1×1 layers, at
    stride 1 on the positions they read; k×k ones where
    :func:`kw_mm.native.conv2d_taps_backward_pays`); else None."""
    if grad.dtype != torch.float32 or not native.usable(grad, x, tuning.MIN_MACS):
        return None
    if g.pointwise:
        return pointwise_input(g, x), (1, 1), (0, 0), (1, 1), (1, 1)
    if (g.ndim != 2 or g.groups != 1 or not g.partitioned or g.private_cells
            or not fused_grads_apply(g, grad, x)):
        return None
    if g.stride != (1, 1) and not native.conv2d_taps_backward_pays(
            grad.shape[2], grid_w(g, x), strided=True):
        return None
    return x, g.kernel_size, g.conv_padding, g.dilation, g.stride


def strided_native_backward(g: ConvGeometry, grad: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether a strided k×k layer's backward runs natively
    (:func:`~.per_sample.native_taps_backward`) even after a per-sample
    forward: on small maps, where per-sample oneDNN backward calls are slowest."""
    return (not g.pointwise and not g.unit_stride
            and native_backward_geometry(g, grad, x) is not None)
