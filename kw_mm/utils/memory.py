"""The process's memory as the kernel (``/proc/self/status``) and glibc report it."""
from __future__ import annotations

import ctypes
import ctypes.util
import re
import sys
from typing import Any, Dict, Optional, Tuple


def proc_status_kib(field: str) -> Optional[int]:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...) in KiB.

    Returns None where there is no such file or field (not Linux).
    """
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def glibc(*names: str) -> Optional[Tuple[ctypes.CDLL, Tuple[Any, ...]]]:
    """The C library and its functions ``names``; None off Linux or without
    them (another libc, e.g. musl)."""
    if not sys.platform.startswith('linux'):
        return None
    path = ctypes.util.find_library('c')
    if not path:
        return None
    try:
        libc = ctypes.CDLL(path)
        return libc, tuple(getattr(libc, name) for name in names)
    except (OSError, AttributeError):
        return None


def _load_malloc_info():
    found = glibc('malloc_info', 'open_memstream', 'fclose')
    if found is None:
        return None
    libc, (malloc_info, open_memstream, fclose) = found
    open_memstream.restype = ctypes.c_void_p
    open_memstream.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_size_t)]
    malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    fclose.argtypes = [ctypes.c_void_p]
    libc.free.argtypes = [ctypes.c_void_p]

    def report() -> Optional[str]:
        buffer, size = ctypes.c_char_p(), ctypes.c_size_t()
        stream = open_memstream(ctypes.byref(buffer), ctypes.byref(size))
        if not stream:
            return None
        try:
            malloc_info(0, stream)
        finally:
            fclose(stream)  # flushes buffer/size
        try:
            return ctypes.string_at(buffer, size.value).decode()
        finally:
            libc.free(buffer)
    return report


_malloc_info = _load_malloc_info()
#: the process-wide totals follow the last arena's </heap>
_TOTAL = re.compile(r'<(total|system) type="(fast|rest|mmap|current)"[^>]* size="(\d+)"')


def malloc_heap_mib() -> Optional[Dict[str, float]]:
    """glibc's account of its heaps, all arenas together (``malloc_info``):
    MiB ``in_use`` by live allocations and MiB ``held`` from the OS (in use
    plus free blocks kept for reuse), both counting mmap'd blocks. A resident
    set that grows while ``in_use`` stays flat is the allocator keeping or
    fragmenting free memory, or memory glibc does not manage, not a leak of
    malloc'd objects (tensors, Python objects).

    Returns None without glibc.
    """
    report = _malloc_info() if _malloc_info is not None else None
    if not report:
        return None
    totals = {kind: int(size) for _, kind, size in
              _TOTAL.findall(report[report.rfind('</heap>'):])}
    if len(totals) != 4:
        return None
    held = totals['current'] + totals['mmap']
    return {'in_use': (held - totals['fast'] - totals['rest']) / 2**20, 'held': held / 2**20}
