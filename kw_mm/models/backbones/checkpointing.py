"""Activation checkpointing of backbone blocks (``with_cp``), as mmpretrain's.

Each residual, inverted-residual or ConvNeXt block is checkpointed when its
``with_cp`` is set and its input requires grad (mmpretrain's condition): its
activations are dropped after the forward pass and recomputed, by running the
block again, in backward. As in mmpretrain the whole block runs twice, so its
BatchNorm layers (the KW attentions' included) update their running
statistics twice per training step. The gradients are those without
checkpointing: training uses batch statistics, and the random state of drop
path is restored for the second run.

Inside a checkpointed block the KW layers run without ``recompute_kernels``:
the checkpoint already drops everything the block saves, kernels included,
whereas a kernel recipe (a saved-tensor hook of its own, which would take
precedence over the checkpoint's) keeps the layer's input alive until
backward. The assembled kernels of one block then live from its second run
until its backward is done.
"""
from __future__ import annotations

from typing import Callable, List

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...layers import KWLayer


def check_with_cp(with_cp) -> bool:
    """Validate the ``with_cp`` argument of a backbone."""
    if not isinstance(with_cp, bool):
        raise ValueError(f'with_cp must be True or False, got {with_cp!r}')
    return with_cp


class _WithoutKernelRecipes:
    """``fn`` run with the KW layers of ``block`` not keeping kernel recipes
    (their ``recompute_kernels`` switched off for the call, then restored)."""

    def __init__(self, block: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.layers: List[KWLayer] = [m for m in block.modules()
                                       if isinstance(m, KWLayer) and m.recompute_kernels]
        self.fn = fn

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        try:
            for layer in self.layers:
                layer.recompute_kernels = False
            return self.fn(x)
        finally:
            for layer in self.layers:
                layer.recompute_kernels = True


def run_block(block: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor],
              x: torch.Tensor) -> torch.Tensor:
    """``fn(x)``, checkpointed when ``block.with_cp`` is set and ``x`` requires grad.

    Uses the non-reentrant checkpoint without early stopping: the whole block
    is recomputed in backward, as mmpretrain's (reentrant) checkpoint does,
    and, unlike the reentrant one, it works with ``torch.autograd.grad`` and
    with DDP's ``find_unused_parameters``.
    """
    if not (block.with_cp and x.requires_grad):
        return fn(x)
    return checkpoint(_WithoutKernelRecipes(block, fn), x, use_reentrant=False,
                      early_stop=False)
