"""Record the process's memory while training, to show that a long run does not leak."""
from __future__ import annotations

import json
import os.path as osp
from typing import Dict, List, Optional, Sequence

import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ...checkpoint.io import write_atomically
from ...utils.memory import malloc_heap_mib, proc_status_kib


def proc_status_mib(field: str) -> Optional[float]:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB; None off Linux."""
    kib = proc_status_kib(field)
    return None if kib is None else kib / 1024


@HOOKS.register_module()
class KWMemoryHook(Hook):
    """Log resident and peak memory every ``interval`` iterations.

    CPU: the resident set (``VmRSS``), its peak so far (``VmHWM``), its
    anonymous and file-backed parts (``RssAnon``, ``RssFile``) and, with
    glibc, the heap's bytes in live allocations and the bytes it holds (a
    resident set that grows while the bytes in use stay flat is the
    allocator keeping or fragmenting free memory, not a leak); CUDA:
    also ``torch.cuda.memory_allocated`` and its peak. The values go to the
    message hub (so the logger prints them as ``rss_mib`` etc.), and every
    record is written to ``<work_dir>/memory.json`` when training ends.

    Args:
        interval (int): Record every this many iterations (and at iteration
            1). Defaults to 50.
        record_iters (Sequence[int]): Iterations that are always recorded
            (1-based, e.g. ``(100, 2000)``). Defaults to ().
    """

    # before LoggerHook (BELOW_NORMAL), so the logged values are this iteration's
    priority = 'NORMAL'

    def __init__(self, interval: int = 50, record_iters: Sequence[int] = ()) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f'interval must be a positive int, got {interval!r}')
        record_iters = tuple(record_iters)
        if not all(isinstance(i, int) and i >= 1 for i in record_iters):
            raise ValueError(f'record_iters must be positive ints, got {record_iters!r}')
        self.interval = interval
        self.record_iters = frozenset(record_iters)
        self.records: List[Dict[str, float]] = []

    def snapshot(self) -> Dict[str, float]:
        values = {'rss_mib': proc_status_mib('VmRSS'), 'peak_rss_mib': proc_status_mib('VmHWM'),
                  # resident anonymous memory vs pages of mapped files (library code)
                  'rss_anon_mib': proc_status_mib('RssAnon'),
                  'rss_file_mib': proc_status_mib('RssFile')}
        heap = malloc_heap_mib()
        if heap is not None:
            values['heap_in_use_mib'] = heap['in_use']
            values['heap_held_mib'] = heap['held']
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            values['cuda_mib'] = torch.cuda.memory_allocated() / 2**20
            values['cuda_peak_mib'] = torch.cuda.max_memory_allocated() / 2**20
        return {k: v for k, v in values.items() if v is not None}

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        iteration = runner.iter + 1  # runner.iter counts finished iterations after this hook
        if iteration != 1 and iteration % self.interval and iteration not in self.record_iters:
            return
        values = self.snapshot()
        for key, value in values.items():
            runner.message_hub.update_scalar(f'train/{key}', value)
        self.records.append(dict(iter=iteration, **values))

    def after_train(self, runner) -> None:
        if not self.records:
            return
        payload = json.dumps(self.records, indent=1).encode()
        write_atomically(osp.join(runner.work_dir, 'memory.json'), lambda f: f.write(payload))
