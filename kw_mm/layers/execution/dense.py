"""Paths for layers whose per-sample kernel is assembled whole.

The dynamic convolutions of :mod:`kw_mm.layers.dynamic` (ODConv, CondConv,
DY-Conv) and KW layers with ODConv's attentions (KW*, ``KWOptions.omni_attention``)
build each sample's kernel in the convolution's own layout
``[B, out, in/groups, *k]`` from a few per-sample coefficients. Nothing here
reads warehouse cells: every path convolves sample ``b`` with kernel ``b``
exactly as it was assembled, so attentions folded into the kernel are never
lost (the warehouse paths of :mod:`.dispatch` compute from the cells and
would ignore them).

In order (the first that applies runs):

0. an empty batch: the empty output, connected for backward;
1. export: batch-agnostic operations (:mod:`.export`);
2. one sample: a plain convolution with its kernel;
3. 1×1 layers: one batched matmul (:mod:`.pointwise`);
4. CPU, dense or grouped k×k layers: one convolution per sample, each kernel's
   gradient written in place (:mod:`.per_sample`, whole-kernel geometry);
5. everything else (CUDA; depth-wise layers on CPU): one grouped convolution
   whose groups are the samples (:mod:`.batched`).

With ``recompute_kernels`` the kernels are rebuilt in backward from the
coefficients instead of being kept (:mod:`..recompute`).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..recompute import run_with_kernel
from .batched import batched_kernel, run_batched, run_empty, run_single
from .export import is_exporting, run_export
from .geometry import ConvGeometry, padded_input
from .per_sample import run_per_sample
from .pointwise import run_pointwise

MakeKernel = Callable[[torch.Tensor], torch.Tensor]


def dense_forward(g: ConvGeometry, x: torch.Tensor, coefficients: torch.Tensor,
                  make_kernel: MakeKernel, bias: Optional[torch.Tensor],
                  recompute_kernels: bool) -> torch.Tensor:
    """The convolution of ``x [B, C, *S]`` with per-sample kernels ``make_kernel(coefficients)``.

    Args:
        g (ConvGeometry): The layer's geometry
            (:func:`~.geometry.whole_kernel_geometry`).
        x (Tensor): The input.
        coefficients (Tensor): Per-sample values ``[B, ...]`` the kernels are
            made from (the attentions).
        make_kernel (callable): ``coefficients`` to kernels ``[B, out, in/groups, *k]``;
            the same operations every call (it is rerun in backward).
        bias (Tensor, optional): The layer's bias ``[out]``.
        recompute_kernels (bool): Rebuild the kernels in backward instead of
            keeping them.
    """
    if bias is not None:
        bias = bias.to(x.dtype)
    coefficients = coefficients.to(x.dtype)
    batch = x.shape[0]
    if batch == 0:
        out = run_empty(g, x, make_kernel(coefficients))
    elif is_exporting():  # ONNX: no branch on the batch size
        return run_export(g, x, make_kernel(coefficients), bias)
    elif batch == 1:
        return run_with_kernel(coefficients, lambda w: run_single(g, x, w, bias), make_kernel,
                               recompute_kernels)
    elif g.pointwise:
        out = run_with_kernel(coefficients, lambda w: run_pointwise(g, x, w), make_kernel,
                              recompute_kernels)
    elif not x.is_cuda and not g.depthwise:
        x = padded_input(g, x)
        out = run_with_kernel(
            coefficients,
            lambda w: run_per_sample(g, x, w.reshape(batch, 1, -1), recompute_kernels),
            make_kernel, recompute_kernels)
    else:
        out = run_with_kernel(coefficients, lambda w: run_batched(g, x, w),
                              lambda c: batched_kernel(make_kernel, c), recompute_kernels)
    if bias is not None:
        out = out + bias.view(g.bias_view)
    return out


def fold_channel_attentions(kernel: torch.Tensor, channel: Optional[torch.Tensor],
                            filters: Optional[torch.Tensor], groups: int) -> torch.Tensor:
    """Per-sample kernels ``[B, out, in/groups, *k]`` multiplied by input-channel
    attentions ``channel [B, in]`` and output-channel attentions ``filters [B, out]``
    (either None: not applied). Input channel ``c`` of a grouped convolution is
    column ``c mod in/groups`` of the output channels of group ``c div in/groups``."""
    batch, out, per_group = kernel.shape[:3]
    spatial = kernel.shape[3:]
    ones = (1,) * len(spatial)
    if channel is not None:
        view = kernel.reshape(batch, groups, out // groups, per_group, *spatial)
        kernel = (view * channel.view(batch, groups, 1, per_group, *ones)).view(kernel.shape)
    if filters is not None:
        kernel = kernel * filters.view(batch, out, 1, *ones)
    return kernel


def reference_conv(g: ConvGeometry, x: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Sample ``b`` of ``x`` through ``weight[b]``, one convolution per sample (the oracle
    the tests compare every path with)."""
    return torch.cat([g.conv(x[b:b + 1], weight[b], bias, g.stride, g.padding, g.dilation,
                             g.groups) for b in range(x.shape[0])])
