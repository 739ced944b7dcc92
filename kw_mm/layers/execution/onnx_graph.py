"""The graph KW convolutions export to ONNX (``kw_mm.export``): fast in ONNX Runtime.

:mod:`.export` gives a batch-agnostic formulation that any tracer can record
(im2col by a convolution with one-hot kernels, then a batched MatMul). In
ONNX Runtime it runs at about 0.4x the plain model: the im2col convolution
and the kernels' reorder (a 6-d Transpose, which ONNX Runtime moves element
by element) cost more than the convolutions. While :func:`onnx_forwards` is
active, KW convolutions instead compute (see :func:`onnx_conv_forward`):

1. the attentions ``α [B, m, n]`` and the mixtures ``α @ cells``
   ``[B, m, cell numel]`` (one MatMul, the cells read once for the batch);
2. 1×1 layers: one batched MatMul of the mixtures, as ``[B, out, in]``,
   with the input ``[B, in, H·W]`` (no kernel reorder at all where a
   mixture spans all input channels; else a block reorder, or a MatMul per
   input cell group and a ReduceSum, whichever moves fewer values);
3. other layers: the kernels ``[B, out, in/groups, *k]`` from the mixtures
   by at most two Transposes that ONNX Runtime runs as block copies
   (the kernel position to the innermost axis, then the input cell groups
   past the output channels), and one ``Conv`` per sample inside a ``Scan``
   over the batch (ONNX ``Conv`` takes the per-sample kernel as an input;
   its ``group`` attribute is static, so the batch cannot be folded into
   the groups with a dynamic batch size).

The batch size is dynamic throughout: it is the ``-1`` of every Reshape and
the length of every Scan. Layers whose cells are private to each mixture
(``sharing='none'``), that are not partitioned or that have ODConv's
attentions (KW*, ``omni_attention``) build their kernels as the layer does
and take step 3.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterator, Optional, Tuple

import torch
from torch import nn

from .conditions import kernel_basis_pays
from .geometry import ConvGeometry, padded_input, pointwise_input
from .kernel_basis import (
    build_kernel_basis,
    kernel_basis_coefficients,
    kernel_basis_rows,
    with_beta,
)


def kernel_from_mixtures(g: ConvGeometry, mixed: torch.Tensor) -> torch.Tensor:
    """Kernels ``[B, out, in/groups, *k]`` from mixtures ``[B, m, cell numel]``.

    Equal to :func:`~.geometry.mixture_to_kernel` for partitioned layers, in
    two block moves instead of one 6-d permutation: mixture ``(s, o, c)``
    holds the ``cell_out × cell_in`` block of output group ``o`` and input
    group ``c`` at kernel position ``s``.
    """
    positions, out_groups, in_groups = g.spatial_positions, g.out_groups, g.in_groups
    cell_in = g.cell_in
    if positions > 1:  # [B, S, R] -> [B, R, S]: the kernel position innermost
        mixed = mixed.reshape(-1, positions, out_groups * in_groups * g.cell_out * cell_in)
        mixed = mixed.transpose(1, 2)
    if in_groups > 1:  # [B, Go, Gi, co, ci·S] -> [B, Go, co, Gi, ci·S]
        mixed = mixed.reshape(-1, out_groups, in_groups, g.cell_out, cell_in * positions)
        mixed = mixed.transpose(2, 3)
    return mixed.reshape(-1, *g.kernel_shape)


def per_sample_conv(g: ConvGeometry, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Sample ``b`` of ``x`` convolved with ``weight[b]``: while exporting to
    ONNX, one ``Scan`` over the batch whose body is one ``Conv`` (``group`` as
    the layer's); in eager mode the same convolutions in a loop.

    Args:
        g (ConvGeometry): The layer's geometry.
        x (Tensor): Input ``[B, C, *S]``.
        weight (Tensor): Per-sample kernels ``[B, out, in/groups, *k]``.
    """
    x = padded_input(g, x)

    def conv(x_b: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
        # torch 2.13 translates a bias-less conv3d with a bias of the kernel's shape,
        # which onnxruntime refuses: 3-d gets an explicit zero bias
        bias = w_b.new_zeros(g.out_channels) if g.ndim == 3 else None
        return g.conv(x_b.unsqueeze(0), w_b, bias, g.stride, g.conv_padding, g.dilation,
                      g.groups).squeeze(0)

    if not torch.onnx.is_in_onnx_export():  # eager: the same convolutions in a loop
        if x.shape[0] == 0:
            return g.conv(x, weight.new_zeros(weight.shape[1:]), None, g.stride, g.conv_padding,
                          g.dilation, g.groups)
        return torch.stack([conv(x_b, w_b) for x_b, w_b in zip(x, weight)])
    from torch._higher_order_ops.scan import scan

    def body(carry: torch.Tensor, sample):
        return carry.clone(), conv(*sample)

    # the carry is a placeholder: Scan needs one, the samples are independent
    return scan(body, x.new_zeros(1), (x, weight))[1]


def pointwise_conv(g: ConvGeometry, x: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
    """A 1×1 layer (one group, no padding) as batched MatMuls of the mixtures
    ``[B, m, cell numel]`` with the positions it reads."""
    x = pointwise_input(g, x)
    spatial = x.shape[2:]
    length = math.prod(spatial)
    out_groups, in_groups = g.out_groups, g.in_groups
    if in_groups == 1:  # mixture o is output rows [o·co, (o+1)·co) over all inputs
        weight = mixed.reshape(-1, g.out_channels, g.in_channels)
        out = torch.matmul(weight, x.reshape(-1, g.in_channels, length))
    elif length * in_groups < g.in_channels:
        # small maps: one product per input group, summed (moves B·out·L·Gi values
        # instead of reordering B·out·in kernel values)
        blocks = mixed.reshape(-1, out_groups, in_groups, g.cell_out, g.cell_in)
        parts = torch.matmul(blocks, x.reshape(-1, 1, in_groups, g.cell_in, length))
        out = parts.sum(2)
    else:
        weight = kernel_from_mixtures(g, mixed).reshape(-1, g.out_channels, g.in_channels)
        out = torch.matmul(weight, x.reshape(-1, g.in_channels, length))
    return out.reshape(-1, g.out_channels, *spatial)


def kernel_basis_for(layer: nn.Module) -> Optional[Tuple[torch.Tensor, bool]]:
    """The kernel basis ``F [m, rows, cell numel]`` (:mod:`.kernel_basis`) and
    whether it has the τ·β row, for a layer with shared, partitioned cells
    whose ``inference_basis`` is on where
    :func:`~.conditions.kernel_basis_pays`; else None. Computed from the
    current weights and τ (call it before tracing: it reads τ's value)."""
    g: ConvGeometry = layer.geometry
    attention = layer.attention
    if not (layer.inference_basis and g.partitioned and not g.private_cells
            and not attention.omni):
        return None
    beta = with_beta(attention)
    rows = kernel_basis_rows(attention, beta)
    if rows is None or not kernel_basis_pays(g.num_mixtures, rows, g.num_cells):
        return None
    with torch.no_grad():
        cells = layer.kw_warehouse.cells.reshape(g.num_cells, -1)
        return build_kernel_basis(attention, cells, beta), beta


def mixtures(layer: nn.Module, x: torch.Tensor,
             basis: Optional[Tuple[torch.Tensor, bool]] = None) -> torch.Tensor:
    """The mixtures ``[B, m, cell numel]`` of a layer with shared, partitioned
    cells: ``α @ cells``, or with ``basis`` (:func:`kernel_basis_for`) the
    per-sample coefficients times the kernel basis."""
    g: ConvGeometry = layer.geometry
    attention = layer.attention
    if basis is not None:
        rows, beta = basis
        coefficients = kernel_basis_coefficients(attention, x, beta).to(x.dtype)
        mixed = torch.matmul(coefficients.transpose(0, 1), rows.to(x.dtype))  # [m, B, numel]
        return mixed.transpose(0, 1)
    cells = layer.kw_warehouse.cells  # [n, cell numel] inside onnx_forwards
    if cells.dim() != 2:
        cells = cells.reshape(g.num_cells, -1)
    return torch.matmul(attention(x).to(x.dtype), cells.to(x.dtype))


def onnx_conv_forward(layer: nn.Module, x: torch.Tensor,
                      basis: Optional[Tuple[torch.Tensor, bool]] = None) -> torch.Tensor:
    """The forward of a KW convolution ``layer`` (``KWConv1d/2d/3d``) as it
    exports to ONNX (module docstring); the same values as its forward.

    Args:
        layer (nn.Module): The KW convolution.
        x (Tensor): Its input ``[B, C, *S]``.
        basis (tuple, optional): The layer's :func:`kernel_basis_for`, to
            mix the kernel basis instead of the cells.
    """
    if x.dim() != layer.ndim + 2:
        raise ValueError(f'{type(layer).__name__} expects a {layer.ndim + 2}-D input '
                         f'[B, C, ...], got shape {tuple(x.shape)}')
    g: ConvGeometry = layer.geometry
    shared = g.partitioned and not g.private_cells and not layer.attention.omni
    if shared:
        mixed = mixtures(layer, x, basis)
        if g.pointwise:
            out = pointwise_conv(g, x, mixed)
        else:
            out = per_sample_conv(g, x, kernel_from_mixtures(g, mixed))
    else:  # the layer's own kernels (with ODConv's attentions for KW*)
        out = per_sample_conv(g, x, layer.per_sample_kernels(x))
    if layer.bias is not None:
        out = out + layer.bias.to(x.dtype).view(g.bias_view)
    return out


def _is_kw_conv(module: nn.Module) -> bool:
    from ..kw_conv import _KWConvNd
    return isinstance(module, _KWConvNd)


@contextlib.contextmanager
def onnx_forwards(model: nn.Module) -> Iterator[int]:
    """Inside the block, the KW convolutions of ``model`` run
    :func:`onnx_conv_forward` (for ``torch.onnx.export``; eager calls work
    too, more slowly than the layers' own forward), with the kernel basis of
    their weights and τ on entry. Yields how many layers were switched;
    restores their forward on exit.

    Args:
        model (nn.Module): Any module containing KW convolutions.
    """
    switched = [(m, m.__dict__.get('forward')) for m in model.modules() if _is_kw_conv(m)]
    for module, _ in switched:
        module.forward = functools.partial(onnx_conv_forward, module,
                                           basis=kernel_basis_for(module))
    # each warehouse's cells as [n, cell numel] (a view of the same storage), so that the
    # graph has no Reshape per layer of the cells, which ONNX Runtime's constant folding
    # would turn into one copy of the warehouse per layer
    warehouses = {id(m.kw_warehouse): m.kw_warehouse for m, _ in switched}.values()
    own_cells = [(w, w.cells) for w in warehouses]
    for warehouse, cells in own_cells:
        warehouse.cells = nn.Parameter(cells.detach().reshape(cells.shape[0], -1),
                                       requires_grad=cells.requires_grad)
    try:
        yield len(switched)
    finally:
        for warehouse, cells in own_cells:
            warehouse.cells = cells
        for module, own in switched:
            if own is None:
                del module.forward
            else:
                module.forward = own
