"""Every tuning threshold of the native kernels, and the predicates that read them.

The thresholds say where a native kernel beats torch's (MKL / oneDNN) on CPU;
docs/native_kernels.md gives the measurements behind them. They are read at
call time from this module, so setting one here changes what the kernels and
the layers choose.
"""
from typing import Tuple

import torch

#: Products with fewer multiply-adds (M·K·N) than this use torch: there the call
#: overheads are as large as what the kernels save.
MIN_MACS = 1 << 21

#: ``kw_gemm_nt`` keeps per-thread partial sums of 16 floats per output element;
#: larger products use torch.matmul rather than allocate more than this many bytes.
NT_WORKSPACE_BYTES = 64 << 20

#: :func:`conv2d_taps` re-reads a sample's kernel for every 64 output columns: it
#: beats oneDNN while that re-reading stays under this many bytes per sample.
TAPS_KERNEL_TRAFFIC = 32 << 20

#: A strided layer's input is split into phases (a copy) that the forward re-reads
#: per strip of output channels: that pays up to this many 64-column output tiles.
STRIDED_TAPS_MAX_TILES = 4

#: Stride-1, size-keeping taps products read the input unpadded with lane masks
#: (no padded copy); False lays every input on the padded grid (tests compare both).
UNPADDED_TAPS = True

#: The stride-1 taps backward runs natively up to this many grid columns per sample
#: (small maps, where per-sample oneDNN backward calls cost most).
TAPS_BACKWARD_MAX_COLS = 1024

#: The same for strided layers (their input's gradient per phase of the input).
TAPS_BACKWARD_STRIDED_MAX_COLS = 256

#: The taps backward computes the kernels' gradient with the native product up to
#: this many grid columns (its inner dimension), with torch's batched product above.
NATIVE_KERNEL_GRAD_MAX_COLS = 256

#: 1×1 layers run fused where their positions per sample are at most this many
#: times the warehouse's cells: where assembly is a large share of the arithmetic.
FUSED_POINTWISE_POSITIONS_PER_CELL = 1.5

#: :class:`~kw_mm.native.gemm.BatchedMatmul`'s ``aᵀ @ grad`` reads ``aᵀ`` in place
#: natively from this many columns ``N`` (MKL is faster below).
TRANSPOSED_MIN_COLS = 2048

#: ... and runs natively as ``(gradᵀ @ a)ᵀ`` up to this many columns (the
#: transposed operand short, its strides small); MKL in between.
SWAP_MAX_COLS = 256


def conv2d_taps_pays(kernel_numel: int, out_h: int, out_w: int, stride: Tuple[int, int]) -> bool:
    """Whether :func:`~kw_mm.native.conv2d_taps` is expected to beat per-sample oneDNN."""
    tiles = -(-out_h * (out_w + 2) // 64)
    if stride != (1, 1):
        return tiles <= STRIDED_TAPS_MAX_TILES
    return tiles * kernel_numel * 4 <= TAPS_KERNEL_TRAFFIC


def conv2d_taps_backward_pays(out_h: int, grid_w: int, strided: bool = False) -> bool:
    """Whether :func:`~kw_mm.native.conv2d_taps_backward` is expected to beat
    per-sample oneDNN."""
    return out_h * grid_w <= (TAPS_BACKWARD_STRIDED_MAX_COLS if strided
                              else TAPS_BACKWARD_MAX_COLS)


def fused_pointwise_pays(cells: int, positions: int) -> bool:
    """Whether a 1×1 KW layer should run as :func:`~kw_mm.native.fused_conv2d_taps`
    (inference, or training with ``recompute_kernels``)."""
    return positions <= FUSED_POINTWISE_POSITIONS_PER_CELL * cells


def nt_workspace_fits(rows: int, cols: int) -> bool:
    """Whether ``kw_gemm_nt`` of a ``[rows, cols]`` output stays within
    :data:`NT_WORKSPACE_BYTES` of per-thread partial sums."""
    padded = -(-rows // 4) * 4 * (-(-cols // 6) * 6)  # the kernel's 4 × 6 register tiles
    return padded * 16 * 4 * torch.get_num_threads() <= NT_WORKSPACE_BYTES


#: The thresholds above, by name (``kw_mm.native`` re-exports them).
THRESHOLDS = ('MIN_MACS', 'NT_WORKSPACE_BYTES', 'TAPS_KERNEL_TRAFFIC', 'STRIDED_TAPS_MAX_TILES',
              'UNPADDED_TAPS', 'TAPS_BACKWARD_MAX_COLS', 'TAPS_BACKWARD_STRIDED_MAX_COLS',
              'NATIVE_KERNEL_GRAD_MAX_COLS', 'FUSED_POINTWISE_POSITIONS_PER_CELL',
              'TRANSPOSED_MIN_COLS', 'SWAP_MAX_COLS')
