"""The fixed shape facts of one KW layer, computed once, and the reorders
between the warehouse's layout and a convolution's.

Every execution path reads a layer through a :class:`ConvGeometry`: the
convolution's arguments (with ``'same'`` / ``'valid'`` padding resolved to
explicit symmetric padding plus an extra ``F.pad`` of the input, which the
convolution backward and the native kernels need), the warehouse's cell
shape and the layer's cell groups (paper §3.2, kernel partition).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..partition import LayerPlan, WarehousePlan

CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class ConvGeometry:
    """One KW layer's convolution and warehouse layout (a linear layer is a
    1-d convolution with kernel size 1).

    ``padding`` is the layer's own (ints or ``'same'`` / ``'valid'``), for
    torch's convolutions; ``conv_padding`` the explicit symmetric padding and
    ``extra_pad`` the ``F.pad`` of the input (or None) that give the same
    output where only integer padding is taken.
    """
    ndim: int
    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    padding: Union[str, Tuple[int, ...]]
    conv_padding: Tuple[int, ...]
    extra_pad: Optional[Tuple[int, ...]]
    dilation: Tuple[int, ...]
    groups: int
    #: 1×1 kernel, no padding or dilation, one group: a per-sample matmul
    pointwise: bool
    unit_stride: bool
    #: in_channels == groups: depth-wise (or one channel per group)
    depthwise: bool
    partitioned: bool
    num_cells: int
    private_cells: int
    num_mixtures: int
    out_groups: int
    in_groups: int
    cell_out: int
    cell_in: int
    spatial_positions: int
    #: out · in · Π kernel_size (the kernel's size at groups = 1)
    kernel_numel: int
    #: the per-sample kernel's shape [out, in/groups, *k]
    kernel_shape: Tuple[int, ...]
    #: (kernel_size, stride, padding, dilation) as the native taps kernels take it
    taps_geometry: Tuple[Tuple[int, ...], ...]
    #: the shape a bias [out] is viewed as to add to an output [B, out, *S]
    bias_view: Tuple[int, ...]

    @property
    def cell_groups(self) -> Tuple[int, int]:
        return self.out_groups, self.in_groups

    @property
    def conv(self) -> Callable[..., torch.Tensor]:
        return CONV_FUNCTIONS[self.ndim]


#: a 1×1 layer as a taps convolution on the positions it reads
POINTWISE_TAPS = ((1, 1), (1, 1), (0, 0), (1, 1))


def explicit_padding(padding: Union[str, Tuple[int, ...]], kernel_size: Tuple[int, ...],
                     dilation: Tuple[int, ...]
                     ) -> Tuple[Tuple[int, ...], Optional[Tuple[int, ...]]]:
    """(symmetric padding, extra ``F.pad`` of the input or None) equal to ``padding``:
    'valid' is 0, 'same' is d·(k − 1) split as torch does (the odd extra on
    the far side, padded onto the input)."""
    ndim = len(kernel_size)
    if not isinstance(padding, str):
        return tuple(padding), None
    if padding == 'valid':
        return (0,) * ndim, None
    totals = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
    if all(t % 2 == 0 for t in totals):
        return tuple(t // 2 for t in totals), None
    extra = []
    for t in reversed(totals):  # F.pad lists the last dim first
        extra += [t // 2, t - t // 2]
    return (0,) * ndim, tuple(extra)


def _geometry(in_channels: int, out_channels: int, kernel_size: Tuple[int, ...],
              stride: Tuple[int, ...], padding: Union[str, Tuple[int, ...]],
              dilation: Tuple[int, ...], groups: int, **partition: Any) -> ConvGeometry:
    """A :class:`ConvGeometry` from the convolution's arguments and the fields
    that describe how its kernel is partitioned (``partition``)."""
    ndim = len(kernel_size)
    conv_padding, extra_pad = explicit_padding(padding, kernel_size, dilation)
    ones, zeros = (1,) * ndim, (0,) * ndim
    return ConvGeometry(
        ndim=ndim, in_channels=in_channels, out_channels=out_channels,
        kernel_size=kernel_size, stride=stride, padding=padding, conv_padding=conv_padding,
        extra_pad=extra_pad, dilation=dilation, groups=groups,
        pointwise=(kernel_size == ones and groups == 1 and padding in (zeros, 'valid')
                   and dilation == ones),
        unit_stride=stride == ones, depthwise=in_channels == groups,
        kernel_numel=out_channels * in_channels * math.prod(kernel_size),
        kernel_shape=(out_channels, in_channels // groups, *kernel_size),
        taps_geometry=(kernel_size, stride, conv_padding, dilation),
        bias_view=(1, -1) + ones, **partition)


def conv_geometry(plan: LayerPlan, warehouse: WarehousePlan, in_channels: int,
                  out_channels: int, kernel_size: Tuple[int, ...], stride: Tuple[int, ...],
                  padding: Union[str, Tuple[int, ...]], dilation: Tuple[int, ...],
                  groups: int) -> ConvGeometry:
    """The :class:`ConvGeometry` of a layer planned as ``plan`` in ``warehouse``."""
    return _geometry(
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
        partitioned=plan.partitioned, num_cells=warehouse.num_cells,
        private_cells=warehouse.private_cells, num_mixtures=plan.num_mixtures,
        out_groups=plan.out_groups, in_groups=plan.in_groups, cell_out=warehouse.cell_out,
        cell_in=warehouse.cell_in, spatial_positions=plan.kernel.spatial_positions)


def whole_kernel_geometry(in_channels: int, out_channels: int, kernel_size: Tuple[int, ...],
                          stride: Tuple[int, ...], padding: Union[str, Tuple[int, ...]],
                          dilation: Tuple[int, ...], groups: int) -> ConvGeometry:
    """The :class:`ConvGeometry` of a layer whose per-sample kernel is assembled
    whole, in the convolution's own layout ``[out, in/groups, *k]`` (one
    "mixture" that is the kernel): the dynamic convolutions of
    :mod:`kw_mm.layers.dynamic` and KW layers with ODConv's attentions (KW*).
    The paths of :mod:`.dense` read it; none of the warehouse paths applies."""
    return _geometry(
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
        partitioned=False, num_cells=1, private_cells=0, num_mixtures=1, out_groups=1,
        in_groups=1, cell_out=out_channels, cell_in=in_channels // groups,
        spatial_positions=math.prod(kernel_size))


def padded_input(geometry: ConvGeometry, x: torch.Tensor) -> torch.Tensor:
    """``x`` with the extra ``F.pad`` of ``'same'`` padding (see :func:`explicit_padding`)."""
    extra = geometry.extra_pad
    return x if extra is None else F.pad(x, extra)


def blocked(geometry: ConvGeometry, mixed: torch.Tensor) -> torch.Tensor:
    """``mixed [..., m, cell numel]`` as a view ``[..., G_out, cell_out, G_in, cell_in, S]``.

    Mixture ``i = (s·G_out + o)·G_in + c`` fills output channels of group
    ``o`` and input channels of group ``c`` at kernel position ``s``.
    """
    lead = mixed.shape[:-2]
    n = len(lead)
    view = mixed.view(*lead, geometry.spatial_positions, geometry.out_groups,
                      geometry.in_groups, geometry.cell_out, geometry.cell_in)
    return view.permute(*range(n), n + 1, n + 3, n + 2, n + 4, n)


def mixture_to_kernel(geometry: ConvGeometry, mixed: torch.Tensor) -> torch.Tensor:
    """Kernels ``[..., out, in/groups, *k]`` from mixtures ``[..., m, cell numel]``."""
    shape = (*mixed.shape[:-2], *geometry.kernel_shape)
    if not geometry.partitioned:  # one mixture: the whole kernel (paper §3.5)
        return mixed.reshape(shape)
    return blocked(geometry, mixed).reshape(shape)


def kernel_into_mixture_(geometry: ConvGeometry, mixed: torch.Tensor,
                         kernel: torch.Tensor) -> None:
    """Write ``kernel`` into ``mixed`` in place: the inverse of :func:`mixture_to_kernel`."""
    if not geometry.partitioned:
        mixed.view(kernel.shape).copy_(kernel)
        return
    view = blocked(geometry, mixed)
    view.copy_(kernel.reshape(view.shape))


def kernel_blocks(geometry: ConvGeometry, mixed: torch.Tensor) -> torch.Tensor:
    """``mixed [B, m, cell numel]`` as ``[B, m, cell_out, cell_in]`` (the native kernels' view)."""
    return mixed.view(mixed.shape[0], -1, geometry.cell_out, geometry.cell_in)


def pointwise_input(geometry: ConvGeometry, x: torch.Tensor) -> torch.Tensor:
    """The positions a 1×1 layer reads (every stride-th one)."""
    if geometry.unit_stride:
        return x
    every = tuple(slice(None, None, s) for s in geometry.stride)
    return x[(slice(None), slice(None)) + every].contiguous()


def pointwise_positions(geometry: ConvGeometry, x: torch.Tensor) -> int:
    """How many positions of ``x`` a 1×1 layer reads per sample."""
    # a list, not a generator: torch.compile traces math.prod of a list without a graph
    # break (a break makes it recompile per shape, with dynamic shapes Inductor rejects)
    return math.prod([-(-n // s) for n, s in zip(x.shape[2:], geometry.stride)])
