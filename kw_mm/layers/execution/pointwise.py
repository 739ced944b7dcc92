"""1×1 layers as one batched matmul of the per-sample kernels: ``y_b = W_b @ x_b``
over the flattened positions, with no per-call weight reordering as a
convolution backend would do (the native product on CPU where it applies,
:func:`kw_mm.native.bmm`). The fused and the native per-sample paths come
first where they apply (:mod:`.dispatch`)."""
from __future__ import annotations

import torch

from ... import native
from .geometry import ConvGeometry, pointwise_input


def run_pointwise(g: ConvGeometry, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [B, C, *S]`` through the per-sample kernels ``weight [B, out, in, 1...]``."""
    x = pointwise_input(g, x)
    batch = x.shape[0]
    out = native.bmm(weight.view(batch, g.out_channels, g.in_channels),
                     x.reshape(batch, g.in_channels, -1))
    return out.view(batch, g.out_channels, *x.shape[2:])
