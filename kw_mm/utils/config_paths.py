"""Where kw_mm's configs are, in a checkout and in an installed package.

A checkout keeps the configs in the repository's ``configs/`` folder. An
installed package carries a copy under ``kw_mm/.mim/configs`` (``setup.py``
puts it there at build time, as mmdet and mmpretrain do), which is also where
mmengine looks for the bases of a user's config that inherits
``_base_ = 'kw_mm::kw_resnet/kw1x-resnet18_8xb32_in1k.py'``.
"""
from __future__ import annotations

import os
import os.path as osp
from typing import List, Optional, Tuple

#: the ``kw_mm`` package directory
PACKAGE_DIR = osp.dirname(osp.dirname(osp.abspath(__file__)))
#: files shipped for MIM and for ``kw_mm::`` config bases (see ``setup.py``)
MIM_DIR = osp.join(PACKAGE_DIR, '.mim')
#: the prefix mmengine gives configs of an installed OpenMMLab package
PREFIX = 'kw_mm::'


def _checkout_root() -> Optional[str]:
    """The repository root when kw_mm runs from a checkout, else None."""
    root = osp.dirname(PACKAGE_DIR)
    if osp.isfile(osp.join(root, 'setup.py')) and osp.isdir(osp.join(root, 'configs')):
        return root
    return None


def config_root() -> str:
    """The folder holding kw_mm's configs.

    The repository's ``configs/`` when kw_mm is imported from a checkout (so
    edits to the configs take effect at once), else the installed package's
    ``kw_mm/.mim/configs``.

    Raises:
        FileNotFoundError: Neither exists (a package built without its configs).
    """
    checkout = _checkout_root()
    if checkout is not None:
        return osp.join(checkout, 'configs')
    installed = osp.join(MIM_DIR, 'configs')
    if osp.isdir(installed):
        return installed
    raise FileNotFoundError(
        f'kw_mm has no configs: {PACKAGE_DIR} is neither in a checkout (configs/ beside it) nor '
        f'an installed package with .mim/configs; reinstall kw_mm with `pip install .`')


def _by_name(root: str, name: str) -> List[str]:
    """Configs under ``root`` whose file name is ``name``."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        if name in files:
            found.append(osp.join(folder, name))
    return found


def find_config(name_or_path: str) -> str:
    """Resolve a config given by path, by its path in kw_mm, or by name.

    In order:

    - ``'kw_mm::<path>'`` is always one of kw_mm's configs, ``<path>`` relative
      to :func:`config_root` (a leading ``configs/`` is allowed), as in
      mmengine's ``_base_ = 'kw_mm::...'``;
    - an existing file is returned as it is;
    - otherwise the argument is looked up among kw_mm's configs: as a path
      relative to :func:`config_root` (``'kw_resnet/kw1x-resnet18_8xb32_in1k.py'``,
      ``'configs/kw_resnet/...'``), or as a bare config name, with or without
      ``.py`` (``'kw1x-resnet18_8xb32_in1k'``), which must be unique.

    Args:
        name_or_path (str): A config file, a path inside kw_mm's configs, or
            a config name.

    Returns:
        str: The absolute path of the config file.

    Raises:
        FileNotFoundError: No such config.
        ValueError: A bare name that several configs share.
    """
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f'name_or_path must be a non-empty str, got {name_or_path!r}')
    packaged = name_or_path.startswith(PREFIX)
    rel = name_or_path[len(PREFIX):] if packaged else name_or_path
    if not packaged and osp.isfile(rel):
        return osp.abspath(rel)
    rel = rel.replace('\\', '/')
    if rel.startswith('configs/'):
        rel = rel[len('configs/'):]
    root = config_root()
    candidates = [rel] if rel.endswith('.py') else [rel, f'{rel}.py']
    for candidate in candidates:
        path = osp.join(root, candidate)
        if osp.isfile(path):
            return osp.abspath(path)
    if '/' not in rel:
        found = _by_name(root, candidates[-1])
        if len(found) == 1:
            return osp.abspath(found[0])
        if found:
            shown = ', '.join(osp.relpath(f, root) for f in found)
            raise ValueError(f'config name {name_or_path!r} is ambiguous in {root}: {shown}; '
                             f'give its folder too')
    where = f'among kw_mm\'s configs in {root}'
    if not packaged:
        where = f'as a file, nor {where}'
    raise FileNotFoundError(f'config {name_or_path!r} not found {where}')


def _get_cfg_path(cfg_path: str, filename: str) -> Tuple[str, Optional[str]]:
    """``mmengine.config.Config._get_cfg_path`` with ``kw_mm::`` bases found by
    :func:`find_config` (see :func:`register_mim_package`).

    A ``kw_mm::`` base gets no scope of its own: kw_mm's configs take theirs
    from their mmpretrain or mmdet bases, and kw_mm has no registry of its own
    (its modules are in mmengine's root registries).
    """
    if cfg_path.startswith(PREFIX):
        return find_config(cfg_path), None
    return _mmengine_get_cfg_path(cfg_path, filename)


_mmengine_get_cfg_path = None


def register_mim_package() -> None:
    """Let mmengine resolve ``_base_ = 'kw_mm::<path>'`` in configs.

    mmengine accepts ``<package>::`` only for the packages in its
    ``MODULE2PACKAGE`` table, then reads the base from ``.mim/configs`` in
    the folder it takes for the installed package, which for an editable
    install (pip's, which maps the package with an import hook) or a checkout
    on ``PYTHONPATH`` holds no configs. So kw_mm also has mmengine resolve
    ``kw_mm::`` bases with :func:`find_config`: the installed package's
    configs, or the checkout's ``configs/`` when kw_mm runs from a checkout.
    Other bases are resolved as before. Called when kw_mm is imported, so a
    config parsed after ``import kw_mm`` may inherit kw_mm's configs; calling
    it again changes nothing.
    """
    global _mmengine_get_cfg_path
    from mmengine.config import Config, utils
    utils.MODULE2PACKAGE.setdefault('kw_mm', 'kw_mm')
    if Config._get_cfg_path is not _get_cfg_path:
        _mmengine_get_cfg_path = Config._get_cfg_path
        Config._get_cfg_path = staticmethod(_get_cfg_path)
