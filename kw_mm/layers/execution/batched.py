"""Paths through torch's own convolution: one sample with its kernel, and
the usual dynamic-convolution trick for a batch, one grouped convolution
whose groups are the samples (CUDA, and depth-wise layers on CPU, where it
is the faster form); and an empty batch."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .geometry import ConvGeometry


def run_single(g: ConvGeometry, x: torch.Tensor, weight: torch.Tensor,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
    """One sample ``x [1, C, *S]`` through its kernel ``weight [1, out, in/groups, *k]``."""
    return g.conv(x, weight[0], bias, g.stride, g.padding, g.dilation, g.groups)


def batched_kernel(assemble: Callable[[torch.Tensor], torch.Tensor],
                   alpha: torch.Tensor) -> torch.Tensor:
    """``assemble(alpha)`` flattened to ``[B·out, in/groups, *k]`` for :func:`run_batched`.

    Flattened here, not in :func:`run_batched`: where flattening copies, the
    copy is what the convolution keeps, so it is what ``recompute_kernels``
    must rebuild."""
    return assemble(alpha).flatten(0, 1)


def run_batched(g: ConvGeometry, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One grouped convolution whose groups are the samples (sample b is group
    block b); ``weight`` the per-sample kernels flattened to ``[B·out, in/groups, *k]``."""
    batch = x.shape[0]
    out = g.conv(x.reshape(1, -1, *x.shape[2:]), weight, None, g.stride, g.padding,
                 g.dilation, g.groups * batch)
    return out.view(batch, g.out_channels, *out.shape[2:])


def run_empty(g: ConvGeometry, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """An empty batch ``x [0, C, *S]``: the empty output ``[0, out, *S_out]``,
    still connected to the (empty) per-sample kernels ``weight [0, out, in/groups, *k]``
    so that backward gives zero gradients of the right shapes."""
    return g.conv(x, weight.sum(0), None, g.stride, g.padding, g.dilation, g.groups)
