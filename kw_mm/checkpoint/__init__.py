"""Checkpoints: reading and writing files (:mod:`.io`), the released models
(:mod:`.released`), checking that a checkpoint fits a model (:mod:`.verify`)
and converting the authors' released checkpoints (:mod:`.convert`).

Importing this package lets torch's safe loading read mmengine checkpoints
and registers the atomic file backend ``kw_atomic_local``.
"""
from .convert import (
                      DETECTION_PREFIXES,
                      KW_CLASSIFIER_PREFIX,
                      UNUSED_DETECTION_PREFIXES,
                      checkpoint_task,
                      convert_file,
                      extract_detection_state_dict,
                      extract_state_dict,
                      is_detection_state_dict,
                      kw_classifier_warehouse,
                      load_checkpoint_file,
                      official_backbone_entries,
                      official_detection_to_mmdet,
                      official_to_mmpretrain,
                      unused_detection_keys,
)
from .io import (
                      AtomicLocalBackend,
                      CheckpointFileError,
                      allow_mmengine_checkpoints,
                      check_writable_destination,
                      history_buffer_getattr,
                      mmengine_checkpoint_globals,
                      read_checkpoint_file,
                      sweep_stale_temps,
                      write_atomically,
                      write_checkpoint_file,
)
from .released import (
                      RELEASED_DETECTION_MODELS,
                      RELEASED_MODELS,
                      REPO_ROOT,
                      TASKS,
                      ReleasedModel,
                      config_path,
)
from .verify import (
                      CheckpointMismatchError,
                      check_state_dict_fits,
                      compare_shapes,
                      describe_variant,
                      fit_problems,
                      identify,
                      is_kw_key,
                      released_backbone,
)

__all__ = [
    'AtomicLocalBackend', 'CheckpointFileError', 'CheckpointMismatchError',
    'DETECTION_PREFIXES', 'KW_CLASSIFIER_PREFIX', 'RELEASED_DETECTION_MODELS', 'RELEASED_MODELS',
    'REPO_ROOT', 'TASKS', 'UNUSED_DETECTION_PREFIXES', 'ReleasedModel',
    'allow_mmengine_checkpoints', 'check_state_dict_fits', 'check_writable_destination',
    'checkpoint_task', 'compare_shapes', 'config_path', 'convert_file', 'describe_variant',
    'extract_detection_state_dict', 'extract_state_dict', 'fit_problems',
    'history_buffer_getattr', 'identify', 'is_detection_state_dict', 'is_kw_key',
    'kw_classifier_warehouse', 'load_checkpoint_file', 'mmengine_checkpoint_globals',
    'official_backbone_entries', 'official_detection_to_mmdet', 'official_to_mmpretrain',
    'read_checkpoint_file', 'released_backbone', 'sweep_stale_temps', 'unused_detection_keys',
    'write_atomically', 'write_checkpoint_file'
]
