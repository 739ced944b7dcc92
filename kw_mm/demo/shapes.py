"""A small synthetic COCO-format instance segmentation set: shapes with masks.

Images hold 1–4 non-overlapping circles, squares and triangles of random
size and colour on a noisy background. Every instance is a polygon, so the
box, the mask and the drawn pixels agree exactly. The set is written once
(into a temporary folder renamed into place, so an interrupted run never
leaves a half-written dataset) and reused afterwards.
"""
from __future__ import annotations

import json
import math
import os
import os.path as osp
import shutil
import tempfile
from typing import Callable, Dict, List, Tuple

import numpy as np

CLASSES = ('circle', 'square', 'triangle')
PALETTE = [(220, 20, 60), (0, 130, 200), (60, 180, 75)]


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    if kind == 'circle':
        t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
    elif kind == 'square':
        t = angle + np.arange(4) * math.pi / 2 + math.pi / 4
    else:
        t = angle + np.arange(3) * 2 * math.pi / 3
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.normal(110, 25, (size, size, 3)).clip(0, 255).astype(np.uint8)


def _image(rng: np.random.Generator, size: int, ann_id: int, image_id: int
           ) -> Tuple[np.ndarray, List[Dict]]:
    import cv2
    img = _background(rng, size)
    occupied = np.zeros((size, size), np.uint8)
    anns = []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(20):
            label = int(rng.integers(len(CLASSES)))
            r = rng.uniform(0.08, 0.22) * size
            cx, cy = rng.uniform(r + 2, size - r - 2, 2)
            poly = _polygon(CLASSES[label], cx, cy, r, rng.uniform(0, math.pi))
            mask = np.zeros_like(occupied)
            cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 1)
            if mask.sum() < 30 or (mask & occupied).any():
                continue
            occupied |= cv2.dilate(mask, np.ones((5, 5), np.uint8))
            colour = np.array(PALETTE[label]) + rng.integers(-40, 40, 3)
            img[mask.astype(bool)] = colour.clip(0, 255).astype(np.uint8)
            ys, xs = np.nonzero(mask)
            x0, y0 = float(xs.min()), float(ys.min())
            w, h = float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)
            anns.append(dict(id=ann_id + len(anns), image_id=image_id, category_id=label + 1,
                             bbox=[x0, y0, w, h], area=float(mask.sum()), iscrowd=0,
                             segmentation=[np.round(poly, 1).flatten().tolist()]))
            break
    return img, anns


def _write_split(root: str, split: str, num_images: int, size: int, seed: int) -> None:
    import cv2
    rng = np.random.default_rng(seed)
    os.makedirs(osp.join(root, split), exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        img, anns = _image(rng, size, len(annotations) + 1, image_id)
        name = f'{image_id:05d}.png'
        cv2.imwrite(osp.join(root, split, name), img)
        images.append(dict(id=image_id, file_name=name, width=size, height=size))
        annotations.extend(anns)
    categories = [dict(id=i + 1, name=n) for i, n in enumerate(CLASSES)]
    with open(osp.join(root, 'annotations', f'{split}.json'), 'w') as f:
        json.dump(dict(images=images, annotations=annotations, categories=categories), f)


def make_shapes_dataset(root: str, num_train: int = 180, num_val: int = 48, size: int = 128,
                        seed: int = 0) -> str:
    """Create the dataset under ``root`` unless it is already complete.

    Returns:
        str: ``root``.
    """
    def fill(tmp: str) -> None:
        os.makedirs(osp.join(tmp, 'annotations'))
        _write_split(tmp, 'train', num_train, size, seed)
        _write_split(tmp, 'val', num_val, size, seed + 1)
    return _create_once(root, fill, num_train=num_train, num_val=num_val, size=size, seed=seed)


def _create_once(root: str, fill: Callable[[str], None], **params) -> str:
    """Run ``fill`` on a temporary folder beside ``root`` and rename it into
    place, unless ``root`` is already complete (its ``.complete`` marker
    records ``params``)."""
    if osp.exists(osp.join(root, '.complete')):
        return root
    parent = osp.dirname(osp.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='.' + osp.basename(osp.abspath(root)) + '-', dir=parent)
    try:
        fill(tmp)
        with open(osp.join(tmp, '.complete'), 'w') as f:
            f.write(json.dumps(params))
        if osp.exists(root):
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if osp.exists(tmp):
            shutil.rmtree(tmp)
    return root


def make_shapes_classification(root: str, num_train: int = 300, num_val: int = 90,
                               size: int = 64, seed: int = 0) -> str:
    """A classification set in mmpretrain's ``CustomDataset`` folder layout.

    Each image holds one shape (``root/{train,val}/<class>/NNNNN.png``), for
    the embedded pretraining demo (pretrain → fine-tune in miniature).
    """
    import cv2

    def fill(tmp: str) -> None:
        for split, count, split_seed in (('train', num_train, seed), ('val', num_val, seed + 1)):
            rng = np.random.default_rng(split_seed)
            for name in CLASSES:
                os.makedirs(osp.join(tmp, split, name))
            for i in range(count):
                label = i % len(CLASSES)
                img = _background(rng, size)
                r = rng.uniform(0.2, 0.4) * size
                cx, cy = rng.uniform(r + 1, size - r - 1, 2)
                poly = _polygon(CLASSES[label], cx, cy, r, rng.uniform(0, math.pi))
                colour = np.array(PALETTE[label]) + rng.integers(-60, 60, 3)
                cv2.fillPoly(img, [np.round(poly).astype(np.int32)],
                             colour.clip(0, 255).tolist())
                cv2.imwrite(osp.join(tmp, split, CLASSES[label], f'{i:05d}.png'), img)
    return _create_once(root, fill, num_train=num_train, num_val=num_val, size=size, seed=seed)
