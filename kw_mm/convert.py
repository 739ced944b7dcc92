"""Compatibility module: the converter of the authors' released checkpoints
now lives in :mod:`kw_mm.checkpoint` (``convert``, ``released``, ``verify``)
and ``build_from_config`` in :mod:`kw_mm.apis`; the names stay importable here."""
from .apis import build_from_config  # noqa: F401
from .checkpoint.convert import *  # noqa: F401,F403
from .checkpoint.convert import _dataset_meta, _strip_module  # noqa: F401
from .checkpoint.released import (RELEASED_DETECTION_MODELS, RELEASED_MODELS,  # noqa: F401
                                  REPO_ROOT, TASKS, ReleasedModel, config_path)
from .checkpoint.verify import (CheckpointMismatchError, _shapes, compare_shapes,  # noqa: F401
                                identify)
