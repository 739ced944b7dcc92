"""Keep large CPU buffers in the heap instead of fresh mmap'd pages.

A KW layer assembles a kernel per sample on every forward pass; for a batch
of 8 in ResNet50's last stage that is a 75 MB tensor. glibc serves
allocations above its mmap threshold (at most 32 MB) with fresh pages from
the kernel and returns them on free, so every such tensor pays page faults
and zero-filling, which on a 2-core machine cost as much as the matmul that
fills it. ``tune_cpu_allocator()`` asks glibc (``mallopt``) to serve large
blocks from the heap and to keep freed memory for reuse. It is process-wide,
so kw_mm never calls it on import: ``tools/train.py``, ``tools/test.py``,
``tools/demo.py`` and ``tools/benchmark.py`` call it (``KW_MM_MALLOC=0``
turns that off). It changes nothing but the allocator's policy: the process
keeps its peak heap instead of returning freed pages to the OS.
"""
from __future__ import annotations

import os

from .memory import glibc

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4


def tune_cpu_allocator() -> bool:
    """Apply the glibc policy above; returns whether it was applied."""
    if os.environ.get('KW_MM_MALLOC', '1') == '0':
        return False
    found = glibc('mallopt')
    if found is None:
        return False
    mallopt, = found[1]
    ok = mallopt(M_MMAP_MAX, 0) == 1
    ok &= mallopt(M_TRIM_THRESHOLD, 2**30) == 1
    ok &= mallopt(M_TOP_PAD, 64 * 2**20) == 1
    return bool(ok)
