"""The process's memory as the kernel reports it (``/proc/self/status``)."""
from __future__ import annotations

from typing import Optional


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
