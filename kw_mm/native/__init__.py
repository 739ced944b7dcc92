"""Native CPU kernels for KW layers, compiled on first use.

A KW layer assembles its kernels with matrix products whose inner dimension
is short (the warehouse's ``n`` cells, or the ``B·m`` mixtures in the cell
gradient) and whose outer one is a cell's numel; its per-sample convolutions
are sums of such products. ``kw_kernels.c`` has kernels written for exactly
these shapes (AVX-512, float32, OpenMP over torch's own thread count).

The package is split by role; this module re-exports their public names:

- :mod:`.library`: building, caching and loading the library; :func:`status`,
  :func:`available`, :func:`usable`;
- :mod:`.bindings`: the C entry points' ctypes signatures;
- :mod:`.gemm`: the matrix products and their autograd (:func:`matmul`, :func:`bmm`);
- :mod:`.taps`: per-sample convolutions (:func:`conv2d_taps` and its backward);
- :mod:`.fused`: convolutions straight from attentions and cells;
- :mod:`.tuning`: every threshold that decides where a kernel is used. The
  kernels and the layers read them there at call time, so that is where one is
  changed (``kw_mm.native.tuning.MIN_MACS = 0``); the copies re-exported here
  keep their default values.

Where the kernels cannot be used (no compiler, no AVX-512F, not float32,
products under :data:`MIN_MACS`, autocast, tracing, export, functorch
transforms or forward-mode AD) kw_mm computes the same products with torch;
:func:`status` says which and why, and a failed build or load warns once.
``KW_MM_NATIVE=0`` turns the kernels off.
"""
from . import bindings, fused, gemm, library, taps, tuning
from .bindings import SIGNATURES, bind
from .fused import fused_conv2d_taps, fused_kernel_grads
from .gemm import (
                   BatchedMatmul,
                   SmallKMatmul,
                   bmm,
                   gemm_nn,
                   gemm_nn_batched,
                   gemm_nt,
                   matmul,
                   small_k_grads,
)
from .library import FLAGS, SOURCES, available, build, cache_dir, checksum_path, status, usable
from .taps import _TapsInput, conv2d_output_size, conv2d_taps, conv2d_taps_backward
from .tuning import (
                   FUSED_POINTWISE_POSITIONS_PER_CELL,
                   MIN_MACS,
                   NATIVE_KERNEL_GRAD_MAX_COLS,
                   NT_WORKSPACE_BYTES,
                   STRIDED_TAPS_MAX_TILES,
                   SWAP_MAX_COLS,
                   TAPS_BACKWARD_MAX_COLS,
                   TAPS_BACKWARD_STRIDED_MAX_COLS,
                   TAPS_KERNEL_TRAFFIC,
                   TRANSPOSED_MIN_COLS,
                   UNPADDED_TAPS,
                   conv2d_taps_backward_pays,
                   conv2d_taps_pays,
                   fused_pointwise_pays,
                   nt_workspace_fits,
)

__all__ = [
    'available', 'build', 'cache_dir', 'status', 'usable',
    'gemm_nn', 'gemm_nn_batched', 'gemm_nt', 'SmallKMatmul', 'BatchedMatmul', 'bmm', 'matmul',
    'small_k_grads', 'conv2d_output_size', 'conv2d_taps', 'conv2d_taps_backward',
    'fused_conv2d_taps', 'fused_kernel_grads', 'conv2d_taps_pays', 'conv2d_taps_backward_pays',
    'fused_pointwise_pays', *tuning.THRESHOLDS,
]

