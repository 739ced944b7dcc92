"""Building models from kw_mm's (mmpretrain or mmdet) configs."""
from __future__ import annotations

import copy
from typing import Any, Mapping, Optional

import torch


def load_config(path: str, cfg_options: Optional[Mapping] = None):
    """The ``mmengine.Config`` at ``path`` with ``cfg_options`` (``--cfg-options``)
    merged in; a missing file is a ``FileNotFoundError`` naming it."""
    import os.path as osp

    from mmengine.config import Config
    if not osp.isfile(path):
        raise FileNotFoundError(f'config not found: {path}')
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def build_from_config(config_path: Any, device: str = 'cpu',
                      cfg_options: Optional[Mapping] = None) -> torch.nn.Module:
    """Build the model of an mmpretrain or mmdet config (on ``device``; 'meta' is cheap).

    ``config_path`` is a config file or an already loaded ``mmengine.Config``;
    ``cfg_options`` (``--cfg-options``) are merged into the config first.
    """
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    if isinstance(config_path, Config):
        cfg = copy.deepcopy(config_path) if cfg_options else config_path
        config_path = cfg.filename or 'given as a Config'
    else:
        cfg = Config.fromfile(config_path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if 'model' not in cfg:
        raise ValueError(f'config {config_path} defines no `model`')
    import kw_mm  # noqa: F401  (registers the KW modules)
    scope = cfg.get('default_scope', 'mmpretrain')
    if scope not in ('mmpretrain', 'mmdet'):
        raise ValueError(f"config {config_path} has default_scope={scope!r}; only 'mmpretrain' "
                         f"and 'mmdet' configs are supported")
    init_default_scope(scope)
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    with torch.device(device):
        return registry.build(cfg.model)


__all__ = ['build_from_config', 'load_config']
