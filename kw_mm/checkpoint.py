"""Let torch ≥ 2.6's safe checkpoint loading read mmengine's own checkpoints.

torch.load defaults to ``weights_only=True`` since torch 2.6, and mmengine
0.10.7 does not override it; its checkpoints (resume, ``load_from``,
``tools/test.py``) also hold the message hub's ``HistoryBuffer`` objects,
which contain numpy arrays and refer to the buffer's statistics functions
(``HistoryBuffer.min`` etc., pickled as ``getattr(HistoryBuffer, 'min')``).
Instead of switching the protection off, kw_mm allow-lists exactly the
classes such checkpoints contain, and maps the pickled ``getattr`` to a
function that only resolves those statistics functions.
"""
from __future__ import annotations

import pickle
from typing import List

import numpy as np
import torch


def mmengine_checkpoint_globals() -> List[object]:
    """The non-tensor classes that an mmengine training checkpoint holds."""
    from mmengine.logging.history_buffer import HistoryBuffer
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
    dtype_classes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32,
                                                  np.bool_)]
    return [HistoryBuffer, _reconstruct, scalar, np.ndarray, np.dtype, *dtype_classes]


def history_buffer_getattr(owner, name: str):
    """``getattr`` restricted to ``HistoryBuffer``'s registered statistics.

    Anything else raises, so a crafted checkpoint cannot reach other
    attributes through this entry.
    """
    from mmengine.logging.history_buffer import HistoryBuffer
    if owner is HistoryBuffer and isinstance(name, str) and (
            name in HistoryBuffer._statistics_methods or name in ('min', 'max', 'current',
                                                                  'mean')):
        return getattr(owner, name)
    raise pickle.UnpicklingError(
        f'kw_mm refuses getattr({owner!r}, {name!r}) while loading a checkpoint with '
        'weights_only=True: only HistoryBuffer statistics are allowed')


def allow_mmengine_checkpoints() -> None:
    """Register :func:`mmengine_checkpoint_globals` with ``torch.serialization``."""
    add = getattr(torch.serialization, 'add_safe_globals', None)
    if add is None:  # torch < 2.4 loads everything anyway
        return
    add(mmengine_checkpoint_globals())
    add([(history_buffer_getattr, '__builtin__.getattr'),
         (history_buffer_getattr, 'builtins.getattr')])


allow_mmengine_checkpoints()
