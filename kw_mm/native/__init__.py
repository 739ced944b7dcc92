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
- :mod:`.tuning`: every threshold that decides where a kernel is used.

Where the kernels cannot be used (no compiler, no AVX-512F, not float32,
products under :data:`MIN_MACS`, autocast, tracing, export, functorch
transforms or forward-mode AD) kw_mm computes the same products with torch;
:func:`status` says which and why, and a failed build or load warns once.
``KW_MM_NATIVE=0`` turns the kernels off.

Setting a name on this module (``kw_mm.native.MIN_MACS = 0``, or replacing
``kw_mm.native.gemm_nn``, as tests do) sets it in the module that uses it, so
it takes effect everywhere.
"""
import sys
import types

from . import bindings, fused, gemm, library, taps, tuning
from .bindings import SIGNATURES, bind
from .fused import fused_conv2d_taps, fused_kernel_grads
from .gemm import (BatchedMatmul, SmallKMatmul, bmm, gemm_nn, gemm_nn_batched, gemm_nt, matmul,
                   small_k_grads)
from .library import (FLAGS, SOURCES, _cpu_flags, available, build, cache_dir, checksum_path,
                      status, usable)
from .taps import _TapsInput, conv2d_output_size, conv2d_taps, conv2d_taps_backward
from .tuning import (conv2d_taps_backward_pays, conv2d_taps_pays, fused_pointwise_pays,
                     nt_workspace_fits)

__all__ = [
    'available', 'build', 'cache_dir', 'status', 'usable',
    'gemm_nn', 'gemm_nn_batched', 'gemm_nt', 'SmallKMatmul', 'BatchedMatmul', 'bmm', 'matmul',
    'small_k_grads', 'conv2d_output_size', 'conv2d_taps', 'conv2d_taps_backward',
    'fused_conv2d_taps', 'fused_kernel_grads', 'conv2d_taps_pays', 'conv2d_taps_backward_pays',
    'fused_pointwise_pays', *tuning.THRESHOLDS,
]

#: the module that defines (and reads) each name re-exported here
_HOMES = {}
for _module in (tuning, bindings, library, gemm, taps, fused):
    for _name, _value in vars(_module).items():
        if (_name in globals() and not _name.startswith('__')
                and not isinstance(_value, types.ModuleType)
                and getattr(_value, '__module__', _module.__name__) == _module.__name__):
            _HOMES.setdefault(_name, _module)


class _Package(types.ModuleType):
    """The type of this module: an assignment to a re-exported name also sets
    it in the module it comes from; the thresholds and the loading state are
    read from their modules (one value, wherever it is set)."""

    def __setattr__(self, name: str, value) -> None:
        home = _HOMES.get(name)
        if home is not None:
            setattr(home, name, value)
        super().__setattr__(name, value)

    def __dir__(self):
        return sorted({*super().__dir__(), *tuning.THRESHOLDS, '_loaded'})


def _forwarded(module: types.ModuleType, name: str) -> property:
    return property(lambda self: getattr(module, name),
                    lambda self, value: setattr(module, name, value),
                    doc=f'``{module.__name__}.{name}``')


for _name in tuning.THRESHOLDS:
    setattr(_Package, _name, _forwarded(tuning, _name))
_Package._loaded = _forwarded(library, '_loaded')
sys.modules[__name__].__class__ = _Package
del _module, _name, _value
