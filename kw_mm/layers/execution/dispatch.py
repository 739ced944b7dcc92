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
from .export import is_exporting, run_export
from .fused import try_fused
from .geometry import ConvGeometry, padded_input
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
