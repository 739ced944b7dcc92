"""A batch-agnostic formulation of the per-sample convolution of KW layers.

The normal forward of a KW convolution (:mod:`.dispatch`) picks its
computation from the batch size in Python: a plain convolution for one
sample, a batched matmul for 1×1 kernels, one grouped convolution whose
groups are the samples on CUDA, or one convolution per sample on CPU. None
of these can be exported to ONNX with a dynamic batch size: the choice is
frozen at the traced batch size, and ONNX ``Conv``'s ``group`` is a static
attribute.

This module computes the same per-sample convolution with operations whose
attributes do not depend on the batch size: im2col by one ordinary
convolution, then one batched matmul with the per-sample kernels::

    cols = conv(x as [B·C, 1, *S], one-hot kernels [K, 1, *k])  # [B·C, K, *S_out]
    y_b  = W_b[g] @ cols_b[g]               # per sample b and group g, [O/g, L]

``K = Π k`` kernel positions; one-hot kernel ``p`` picks the input under
kernel position ``p`` (stride, padding and dilation are the layer's), so
``cols`` holds each window's values exactly (products with 1 and 0 only).
``W_b`` is sample ``b``'s assembled kernel ``[O, C/groups, *k]`` viewed as
``[groups, O/groups, C/groups · K]``; for depth-wise convolutions the
matmul is an elementwise product summed over ``K``. The batch size only
ever appears as the ``-1`` of a reshape.

KW layers use it while :func:`is_exporting` is true, i.e. inside
``kw_mm.export.export_mode()``, during ``torch.onnx.export`` and under
``torch.jit.trace``. It is slower than the normal paths and needs ``K×``
the input's memory for the columns, so it is meant for export only.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence, Union

import torch

from .geometry import CONV_FUNCTIONS, ConvGeometry

_export_mode = False


def is_exporting() -> bool:
    """Whether KW layers should use the batch-agnostic formulation.

    True inside :func:`export_mode`, while ``torch.onnx.export`` traces a
    model, and under ``torch.jit.trace`` (a trace records one path: the
    batch-size branches of the normal forward would be frozen at the traced
    batch size, every sample then convolved with the first one's kernel).
    """
    # torch.jit.is_tracing() without its Python wrapper (this runs on every forward);
    # torch.compile cannot trace that call, and is never inside a jit trace itself
    return (_export_mode or torch.onnx.is_in_onnx_export()
            or (not torch.compiler.is_compiling() and torch._C._is_tracing()))


@contextlib.contextmanager
def export_mode(enabled: bool = True) -> Iterator[None]:
    """Make KW layers use the batch-agnostic formulation inside the block.

    Args:
        enabled (bool): The flag's value inside the block (False switches it
            off inside an enclosing ``export_mode()``). Defaults to True.
    """
    global _export_mode
    previous = _export_mode
    _export_mode = bool(enabled)
    try:
        yield
    finally:
        _export_mode = previous


def batch_agnostic_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        stride: Sequence[int], padding: Union[str, Sequence[int]],
                        dilation: Sequence[int], groups: int) -> torch.Tensor:
    """Convolve each sample with its own kernel, with batch-size-agnostic ops.

    Args:
        x (Tensor): Input ``[B, C, *S]`` (1 to 3 spatial dims).
        weight (Tensor): Per-sample kernels ``[B, O, C/groups, *k]``.
        bias (Tensor, optional): Shared bias ``[O]``.
        stride, padding, dilation, groups: As ``torch.nn.functional.conv*d``
            (``padding`` a tuple of ints, ``'same'`` or ``'valid'``).

    Returns:
        Tensor: ``[B, O, *S_out]``, equal to convolving sample ``b`` with
        ``weight[b]`` on its own.
    """
    ndim = x.dim() - 2
    if ndim not in CONV_FUNCTIONS or weight.dim() != ndim + 3:
        raise ValueError(f'expected x [B, C, *S] with 1 to 3 spatial dims and weight '
                         f'[B, out, in/groups, *kernel] with as many kernel dims, got x '
                         f'{tuple(x.shape)} and weight {tuple(weight.shape)}')
    kernel_size = tuple(weight.shape[3:])
    out_channels, in_per_group = weight.shape[1], weight.shape[2]
    channels = x.shape[1]
    if channels != in_per_group * groups:
        raise ValueError(f'x has {channels} channels, weight {tuple(weight.shape)} expects '
                         f'{in_per_group} × groups={groups}')
    if isinstance(padding, str) and padding not in ('same', 'valid'):
        raise ValueError(f"padding must be 'same', 'valid' or a tuple of ints, got {padding!r}")
    positions = math.prod(kernel_size)
    # im2col: every channel of every sample through one convolution with the
    # one-hot kernels of the K positions (exact: products with 1 and 0 only)
    one_hot = torch.eye(positions, dtype=x.dtype, device=x.device).view(positions, 1,
                                                                         *kernel_size)
    # torch 2.13's ONNX translation of a bias-less conv3d builds a bias of the
    # kernel's full shape (onnxruntime refuses it): give 3-d an explicit zero bias
    zero_bias = one_hot.new_zeros(positions) if ndim == 3 else None
    cols = CONV_FUNCTIONS[ndim](x.flatten(0, 1).unsqueeze(1), one_hot, zero_bias, stride,
                                 padding, dilation)  # [B·C, K, *S_out]
    out_shape = cols.shape[2:]
    length = math.prod(out_shape)
    # the batch is the one -1 of every reshape; the kernel flattens channel-major
    # ([O, C/groups, *k] -> [O, C/groups · K]), as the columns do
    if groups == 1:
        out = torch.bmm(weight.reshape(-1, out_channels, channels * positions),
                        cols.reshape(-1, channels * positions, length))
    elif in_per_group == 1 and out_channels == groups:  # depth-wise: no reduction over channels
        out = (weight.reshape(-1, channels, positions, 1)
               * cols.reshape(-1, channels, positions, length)).sum(2)
    else:
        out = torch.matmul(
            weight.reshape(-1, groups, out_channels // groups, in_per_group * positions),
            cols.reshape(-1, groups, in_per_group * positions, length))
    out = out.reshape(-1, out_channels, *out_shape)
    if bias is not None:
        out = out + bias.view(1, -1, *([1] * ndim))
    return out


def run_export(g: ConvGeometry, x: torch.Tensor, weight: torch.Tensor,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The layer's convolution of ``x`` with the per-sample kernels ``weight``
    through :func:`batch_agnostic_conv`."""
    return batch_agnostic_conv(x, weight, bias, g.stride, g.padding, g.dilation, g.groups)
