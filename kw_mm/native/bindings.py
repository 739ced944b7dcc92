"""The ctypes signatures of ``kw_kernels.c``'s entry points, in one place.

Each entry point takes plain integers (sizes, strides, offsets in floats),
data pointers and ``int64``/``uint16`` tables; :func:`bind` declares them on a
loaded library so that ctypes converts and checks every argument, and raises
if the library lacks one of them (a file that is not this library).
"""
import ctypes
from typing import Dict, List, Optional, Sequence, Tuple

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int

#: ``name: (result type, argument types)``. A ``None`` result reads as "not
#: failed"; an ``int`` result is 0, or -1 where the kernel could not allocate.
SIGNATURES: Dict[str, Tuple[Optional[type], List[type]]] = {
    'kw_gemm_available': (_int, []),
    # M, N, K, A, lda, B, ldb, C, ldc, threads
    'kw_gemm_nn': (None, [_i64, _i64, _i64, _ptr, _i64, _ptr, _i64, _ptr, _i64, _int]),
    # batch, M, N, K, A, sa, ars, aks, B, sb, ldb, C, sc, ldc, threads
    'kw_gemm_nn_batched': (None, [_i64, _i64, _i64, _i64, _ptr, _i64, _i64, _i64, _ptr, _i64,
                                  _i64, _ptr, _i64, _i64, _int]),
    # batch, groups, M, N, K, taps, A, sa, ars, aks, a_off, B, sb, ldb, b_off, masks,
    # C, sc, gc, ldc, threads
    'kw_conv_taps': (_int, [_i64, _i64, _i64, _i64, _i64, _i64, _ptr, _i64, _i64, _i64, _ptr,
                            _ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _int]),
    # batch, M, N, K, taps, gout, ncells, alpha, lda, E, lde, e_mix, B, sb, ldb, b_off,
    # masks, mix, C, sc, ldc, threads
    'kw_fused_taps': (_int, [_i64, _i64, _i64, _i64, _i64, _i64, _i64, _ptr, _i64, _ptr, _i64,
                             _i64, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _int]),
    # M, P, D, G, ldg, E, lde, C, ldc, threads
    'kw_gemm_nt': (_int, [_i64, _i64, _i64, _ptr, _i64, _ptr, _i64, _ptr, _i64, _int]),
    # batch, M, N, K, taps, gout, ncells, alpha, lda, E, lde, G, sg, ldg, X, sx, ldx,
    # x_off, mix, grad_alpha, ld_alpha, grad_cells, ld_cells, threads
    'kw_fused_kernel_grad': (_int, [_i64, _i64, _i64, _i64, _i64, _i64, _i64, _ptr, _i64, _ptr,
                                    _i64, _ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _ptr, _ptr,
                                    _i64, _ptr, _i64, _int]),
}


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare :data:`SIGNATURES` on ``lib`` and return it.

    Raises:
        RuntimeError: ``lib`` lacks an entry point (naming the missing ones).
    """
    missing = [name for name in SIGNATURES if not hasattr(lib, name)]
    if missing:
        raise RuntimeError(f'{lib._name} is not the kw_mm kernel library: it lacks '
                           f'{", ".join(missing)}')
    for name, (restype, argtypes) in SIGNATURES.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    return lib


def _offsets(values: Sequence[int]) -> ctypes.Array:
    """``values`` as a C ``int64_t`` table (the kernels' offsets and mixture indices)."""
    return (ctypes.c_int64 * len(values))(*values)
