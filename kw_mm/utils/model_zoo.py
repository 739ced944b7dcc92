"""kw_mm's configs as mmpretrain models: ``model-index.yml`` and ModelHub.

``model-index.yml`` (at the repository root in a checkout, in
``kw_mm/.mim`` in an installed package) imports one ``metafile.yml`` per config
folder, in mmpretrain's format: for each config its name (the file name
without ``.py``), its measured parameter count, the paper's result and its
``Config`` path. Importing kw_mm registers the index with
:class:`mmpretrain.apis.ModelHub`, so that mmpretrain's model API knows kw_mm's
configs by name::

    import kw_mm
    from mmpretrain import get_model, list_models
    list_models('*kw*')
    model = get_model('kw1x-resnet18_8xb32_in1k', pretrained='kw1x_resnet18_mm.pth')

kw_mm hosts no checkpoints: ``pretrained=True`` finds no weights; pass the
path of a converted checkpoint (``tools/convert_official_kw.py``) or one of
your own.
"""
from __future__ import annotations

import os.path as osp
from typing import List, Optional

from . import config_paths

#: the model index registered with mmpretrain's ModelHub by this process, and its names
_registered_index: Optional[str] = None
_registered_names: List[str] = []


def model_index_path() -> str:
    """The ``model-index.yml`` of this kw_mm: the checkout's or the installed package's.

    Returns:
        str: The absolute path of the file.

    Raises:
        FileNotFoundError: The file is missing (a package built without it).
    """
    checkout = config_paths._checkout_root()
    root = checkout if checkout is not None else config_paths.MIM_DIR
    path = osp.join(root, 'model-index.yml')
    if not osp.isfile(path):
        raise FileNotFoundError(
            f'kw_mm has no model index at {path}; reinstall kw_mm with `pip install .`')
    return path


def load_model_index(path: Optional[str] = None):
    """Load a kw_mm model index and check it.

    Args:
        path (str, optional): The ``model-index.yml`` to load. Defaults to
            :func:`model_index_path`.

    Returns:
        modelindex.models.ModelIndex.ModelIndex: The index, its models
        completed with their collection's metadata.

    Raises:
        ValueError: The index or one of the metafiles it imports is missing or
            malformed (modelindex would otherwise leave those models out without
            a word), or two models share a name.
    """
    from modelindex.load_model_index import load

    path = model_index_path() if path is None else path
    index = load(path)
    problems = list(index.check(silent=True))
    names = [model.name.lower() for model in index.models]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        problems.append(f'model names used more than once: {", ".join(twice)}')
    if problems:
        raise ValueError(f'kw_mm model index {path} is not valid:\n  ' + '\n  '.join(problems))
    return index


def register_model_index(path: Optional[str] = None) -> List[str]:
    """Register kw_mm's configs with mmpretrain's ``ModelHub``.

    After this, ``mmpretrain.list_models``, ``mmpretrain.get_model(name)``
    and the inferencers (``ImageClassificationInferencer(name, ...)``) know
    every model of the index by name. ``import kw_mm`` calls it. It registers
    once per process: later calls return the names registered before.

    Args:
        path (str, optional): The ``model-index.yml``. Defaults to
            :func:`model_index_path`. Its ``Config`` paths are relative to
            its folder.

    Returns:
        List[str]: The registered model names (lower case, as ModelHub keeps
        them).

    Raises:
        ValueError: The index is not valid (see :func:`load_model_index`), or
            ModelHub already holds one of its names for another config.
    """
    global _registered_index, _registered_names
    from mmpretrain.apis import ModelHub

    path = osp.abspath(model_index_path() if path is None else path)
    if _registered_index is not None:
        if path != _registered_index:
            raise ValueError(f'kw_mm registered its model index {_registered_index} already; '
                             f'cannot also register {path}')
        return list(_registered_names)
    index = load_model_index(path)
    prefix = osp.dirname(path)
    names = sorted(model.name.lower() for model in index.models)
    taken, present = [], []
    for model in index.models:
        known = ModelHub._models_dict.get(model.name.lower())
        if known is None:
            continue
        if getattr(known, 'config', None) == ModelHub._expand_config_path(model, prefix):
            present.append(model.name)
        else:
            taken.append(f'{model.name} (registered for {known.config})')
    if taken:
        raise ValueError(f'cannot register kw_mm model index {path}: ModelHub already has '
                         f'models named ' + ', '.join(taken))
    if present and len(present) < len(names):
        raise ValueError(f'cannot register kw_mm model index {path}: ModelHub holds only some '
                         f'of its models ({", ".join(present)})')
    if not present:
        ModelHub.register_model_index(path, config_prefix=prefix)
    _registered_index, _registered_names = path, names
    return list(names)
