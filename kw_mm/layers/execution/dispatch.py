"""The one place a KW convolution's forward picks its execution path.

In order (the first that applies runs):

0. an empty batch (:mod:`.batched`): the empty output, connected for backward;
1. kernel basis (:mod:`.kernel_basis`): CPU inference, where mixing the
   cached basis beats mixing the cells;
2. export (:mod:`.export`): batch-agnostic operations while exporting;
3. one sample (:mod:`.batched`): a plain convolution with its kernel, unless
   the native CPU kernels can run (then the batch paths below are faster);
4. 1×1 layers: fused (:mod:`.fused`), else the native product straight from
   the mixtures (:mod:`.per_sample`), else one batched matmul (:mod:`.pointwise`);
5. CPU, dense or grouped k×k layers: fused, else per sample (:mod:`.per_sample`);
6. everything else (CUDA; depth-wise layers on CPU): one grouped convolution
   whose groups are the samples (:mod:`.batched`).

KW* layers (``KWOptions.omni_attention``: ODConv's attentions multiply each
sample's assembled kernel) take none of these: the cell-level paths (kernel
basis, fused, native on the mixtures) would leave those attentions out.
They run through :mod:`.dense`, which convolves with the whole per-sample
kernel (:func:`omni_forward`).

Every test and threshold a choice reads is in :mod:`.conditions`. The paths
take the layer's :class:`~.geometry.ConvGeometry`, tensors and the layer's
assembly functions (``mix_cells``: attentions to mixtures, paper Eq. 3;
``assemble_kernel``: attentions to per-sample kernels); they never see the
layer itself.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..attention import KWAttention
from ..recompute import run_with_kernel
from .batched import batched_kernel, run_batched, run_empty, run_single
from .conditions import native_batch_paths, pointwise_native_applies
from .dense import dense_forward, fold_channel_attentions
from .export import is_exporting, run_export
from .fused import try_fused
from .geometry import ConvGeometry, padded_input, whole_kernel_geometry
from .kernel_basis import KernelBasisCache, try_kernel_basis
from .per_sample import run_per_sample
from .pointwise import run_pointwise

Assembly = Callable[[torch.Tensor], torch.Tensor]


def conv_forward(g: ConvGeometry, x: torch.Tensor, attention: KWAttention,
                 cells: torch.Tensor, bias: Optional[torch.Tensor], mix_cells: Assembly,
                 assemble_kernel: Assembly, recompute_kernels: bool,
                 kernel_basis: KernelBasisCache, inference_basis: bool) -> torch.Tensor:
    """A KW convolution of ``x [B, C, *S]`` (see the module docstring for the order).

    Args:
        g (ConvGeometry): The layer's geometry.
        x (Tensor): The input.
        attention (KWAttention): The layer's attention (``x`` to ``α [B, m, n]``).
        cells (Tensor): The warehouse's cells.
        bias (Tensor, optional): The layer's bias ``[out]``.
        mix_cells, assemble_kernel: The layer's assembly of mixtures and of kernels.
        recompute_kernels (bool): Rebuild assembled kernels in backward instead
            of keeping them (:mod:`..recompute`).
        kernel_basis (KernelBasisCache): The layer's kernel-basis cache.
        inference_basis (bool): Whether the kernel-basis path may run.
    """
    if attention.omni:  # KW*: only the whole-kernel paths see ODConv's attentions
        return omni_forward(g, x, attention, assemble_kernel, bias, recompute_kernels)
    if bias is not None:
        bias = bias.to(x.dtype)
    if x.shape[0] == 0:
        out = run_empty(g, x, assemble_kernel(attention(x).to(x.dtype)))
        return out if bias is None else out + bias.view(g.bias_view)
    out = try_kernel_basis(g, x, attention, cells, kernel_basis, inference_basis)
    if out is not None:
        return out if bias is None else out + bias.view(g.bias_view)
    alpha = attention(x).to(x.dtype)
    if is_exporting():  # ONNX: no branch on the batch size (see export.py)
        return run_export(g, x, assemble_kernel(alpha), bias)
    if x.shape[0] == 1 and not native_batch_paths(x):
        return run_with_kernel(alpha, lambda w: run_single(g, x, w, bias), assemble_kernel,
                               recompute_kernels)
    if g.pointwise:
        out = try_fused(g, x, alpha, cells, recompute_kernels, mix_cells)
        if out is None and pointwise_native_applies(g, x):
            # the mixtures read in place (run_native_taps): no reordered kernels
            out = run_with_kernel(
                alpha, lambda mixed: run_per_sample(g, x, mixed, recompute_kernels),
                mix_cells, recompute_kernels)
        if out is None:
            out = run_with_kernel(alpha, lambda w: run_pointwise(g, x, w), assemble_kernel,
                                  recompute_kernels)
    elif x.device.type == 'cpu' and not g.depthwise:
        # CPU, dense or grouped: per sample, kernels reordered one at a time (per_sample.py);
        # depth-wise ones run fastest as one convolution with B× the groups (below)
        x = padded_input(g, x)
        out = try_fused(g, x, alpha, cells, recompute_kernels, mix_cells)
        if out is None:
            out = run_with_kernel(
                alpha, lambda mixed: run_per_sample(g, x, mixed, recompute_kernels),
                mix_cells, recompute_kernels)
    else:
        out = run_with_kernel(alpha, lambda w: run_batched(g, x, w),
                              lambda a: batched_kernel(assemble_kernel, a), recompute_kernels)
    if bias is not None:
        out = out + bias.view(g.bias_view)
    return out


def omni_kernels(g: ConvGeometry, assemble_kernel: Assembly, alpha: torch.Tensor,
                 channel: torch.Tensor, filters: Optional[torch.Tensor],
                 spatial: Optional[torch.Tensor]) -> torch.Tensor:
    """A KW* layer's per-sample kernels ``[B, out, in/groups, *k]``: the kernels
    assembled from ``alpha [B, m, n]``, multiplied by ODConv's spatial
    (``[B, positions]``), input-channel (``[B, in]``) and output-channel
    (``[B, out]``) attentions."""
    kernel = assemble_kernel(alpha)
    if spatial is not None:
        batch = kernel.shape[0]
        kernel = kernel * spatial.view(batch, 1, 1, *g.kernel_size)
    return fold_channel_attentions(kernel, channel, filters, g.groups)


def omni_forward(g: ConvGeometry, x: torch.Tensor, attention: KWAttention,
                 assemble_kernel: Assembly, bias: Optional[torch.Tensor],
                 recompute_kernels: bool) -> torch.Tensor:
    """A KW* convolution of ``x``: :func:`omni_kernels` through
    :func:`~.dense.dense_forward` (every path there convolves each sample with
    its whole kernel). The attentions travel as one coefficient tensor, from
    which backward can rebuild the kernels."""
    alpha, channel, filters, spatial = attention(x, omni=True)
    mixtures, cells = alpha.shape[1:]
    parts = [alpha.flatten(1), channel, filters, spatial]
    present = [p is not None for p in parts]
    parts = [p for p in parts if p is not None]
    sizes = [p.shape[1] for p in parts]

    def make(coefficients: torch.Tensor) -> torch.Tensor:
        pieces = iter(coefficients.split(sizes, dim=1))
        alpha_, channel_, filters_, spatial_ = (next(pieces) if here else None
                                                for here in present)
        return omni_kernels(g, assemble_kernel,
                            alpha_.reshape(coefficients.shape[0], mixtures, cells), channel_,
                            filters_, spatial_)

    whole = whole_kernel_geometry(g.in_channels, g.out_channels, g.kernel_size, g.stride,
                                  g.padding, g.dilation, g.groups)
    return dense_forward(whole, x, torch.cat(parts, dim=1), make, bias, recompute_kernels)
