"""Fail early, naming the path, when a config's dataset is not on disk."""
from __future__ import annotations

import os.path as osp
from typing import Iterator, List, Tuple


def _datasets(cfg, loaders=('train_dataloader', 'val_dataloader', 'test_dataloader')
              ) -> Iterator[Tuple[str, dict]]:
    for loader in loaders:
        loader_cfg = cfg.get(loader)
        if not loader_cfg or 'dataset' not in loader_cfg:
            continue
        stack = [(loader, loader_cfg['dataset'])]
        while stack:
            where, ds = stack.pop()
            if not isinstance(ds, dict):
                continue
            yield where, ds
            if 'dataset' in ds:  # wrappers such as RepeatDataset / ClassBalancedDataset
                stack.append((where, ds['dataset']))
            for i, sub in enumerate(ds.get('datasets', []) or []):  # ConcatDataset
                stack.append((f'{where}[{i}]', sub))


def _prefixes(ds) -> List[str]:
    """``data_prefix`` values: mmdet uses a dict (``img=...``), mmpretrain may use a str."""
    prefix = ds.get('data_prefix') or {}
    return list(prefix.values()) if isinstance(prefix, dict) else [prefix]


def _join(root, path):
    if not path:
        return None
    return path if (osp.isabs(path) or not root) else osp.join(root, path)


def check_dataset_paths(cfg, loaders=('train_dataloader', 'val_dataloader', 'test_dataloader')
                        ) -> None:
    """Raise FileNotFoundError listing every dataset path a config needs but lacks.

    Looks at ``data_root``, ``ann_file`` and ``data_prefix`` entries of the
    datasets of the given dataloaders (wrappers included). Remote paths
    (``s3://`` etc.) are not checked.
    """
    missing: List[str] = []
    for where, ds in _datasets(cfg, loaders):
        root = ds.get('data_root') or ''
        if root and '://' not in root and not osp.isdir(root):
            inside = [p for p in (ds.get('ann_file'), *_prefixes(ds)) if isinstance(p, str) and p]
            hint = f" (expected inside: {', '.join(inside)})" if inside else ''
            missing.append(f'{where}.dataset.data_root: {root}{hint}')
            continue
        ann = _join(root, ds.get('ann_file'))
        if ann and '://' not in ann and not osp.exists(ann):
            missing.append(f'{where}.dataset.ann_file: {ann}')
        prefix = ds.get('data_prefix') or {}
        items = prefix.items() if isinstance(prefix, dict) else [(None, prefix)]
        for key, value in items:
            path = _join(root, value) if isinstance(value, str) else None
            if path and '://' not in path and not osp.isdir(path):
                name = 'data_prefix' + (f'.{key}' if key else '')
                missing.append(f'{where}.dataset.{name}: {path}')
    if missing:
        lines = '\n  '.join(dict.fromkeys(missing))
        raise FileNotFoundError(
            f'dataset path(s) not found:\n  {lines}\n'
            'Put the dataset there (README.md, "Training and testing", shows the layout) or point '
            'the config at it, e.g. --cfg-options train_dataloader.dataset.data_root=/path/')
