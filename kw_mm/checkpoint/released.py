"""The authors' released KernelWarehouse models and the kw_mm configs that build them."""
from __future__ import annotations

import os.path as osp
from dataclasses import dataclass
from typing import Tuple

from ..utils.config_paths import find_config

#: the folder holding kw_mm's ``configs/`` (the repository root in a checkout)
REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def config_path(config: str) -> str:
    """The file of a kw_mm config given relative to the repository root
    (``configs/kw_resnet/...``): in a checkout or in the installed package
    (:func:`kw_mm.utils.config_paths.find_config`)."""
    return find_config(f'kw_mm::{config}')


#: the tasks of the released models: ImageNet classification (mmpretrain) and
#: COCO detection / instance segmentation with Mask R-CNN (mmdet)
TASKS = ('classification', 'detection')


@dataclass(frozen=True)
class ReleasedModel:
    """A released model and the kw_mm config that builds it."""
    name: str
    config: str  # relative to the repository root
    task: str = 'classification'  # one of TASKS

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f'task must be one of {TASKS}, got {self.task!r}')

    @property
    def config_path(self) -> str:
        return config_path(self.config)


RELEASED_MODELS: Tuple[ReleasedModel, ...] = tuple(
    ReleasedModel(name, f'configs/kw_resnet/{cfg}')
    for name, cfg in (
        ('kw1d4x_resnet18', 'kw1d4x-resnet18_8xb32_in1k.py'),
        ('kw1d2x_resnet18', 'kw1d2x-resnet18_8xb32_in1k.py'),
        ('kw1x_resnet18', 'kw1x-resnet18_8xb32_in1k.py'),
        ('kw2x_resnet18', 'kw2x-resnet18_8xb32_in1k.py'),
        ('kw4x_resnet18', 'kw4x-resnet18_8xb32_in1k.py'),
        ('kw1d2x_resnet50', 'kw1d2x-resnet50_8xb32_in1k.py'),
        ('kw1x_resnet50', 'kw1x-resnet50_8xb32_in1k.py'),
        ('kw4x_resnet50', 'kw4x-resnet50_8xb32_in1k.py'),
    ))
RELEASED_MODELS += (
    ReleasedModel('kw1x_convnext_tiny', 'configs/kw_convnext/kw1x-convnext-tiny_32xb128_in1k.py'),
)
RELEASED_MODELS += tuple(
    ReleasedModel(name, f'configs/kw_mobilenet_v2/{cfg}')
    for name, cfg in (
        ('kw1d2x_mobilenetv2_050', 'kw1d2x-mobilenet-v2-w0.5_8xb32_in1k.py'),
        ('kw1x_mobilenetv2_050', 'kw1x-mobilenet-v2-w0.5_8xb32_in1k.py'),
        ('kw4x_mobilenetv2_050', 'kw4x-mobilenet-v2-w0.5_8xb32_in1k.py'),
        ('kw1d2x_mobilenetv2_100', 'kw1d2x-mobilenet-v2_8xb32_in1k.py'),
        ('kw1x_mobilenetv2_100', 'kw1x-mobilenet-v2_8xb32_in1k.py'),
        ('kw4x_mobilenetv2_100', 'kw4x-mobilenet-v2_8xb32_in1k.py'),
    ))

#: the authors' released Mask R-CNN models (mmdet 2.x, named after their configs
#: ``mask_rcnn_<name>_adamw_1x_coco.py``) and the kw_mm configs with the same model
#: and the same training recipe (AdamW, multi-scale + crop, 1x).
RELEASED_DETECTION_MODELS: Tuple[ReleasedModel, ...] = tuple(
    ReleasedModel(name, f'configs/mask_rcnn/{cfg}', 'detection')
    for name, cfg in (
        ('mask_rcnn_kw1x_resnet50', 'mask-rcnn_kw1x-resnet50_fpn_paper-ms-crop-1x_coco.py'),
        ('mask_rcnn_kw4x_resnet50', 'mask-rcnn_kw4x-resnet50_fpn_paper-ms-crop-1x_coco.py'),
        ('mask_rcnn_kw1x_mobilenetv2_100',
         'mask-rcnn_kw1x-mobilenet-v2_fpn_paper-ms-crop-1x_coco.py'),
        ('mask_rcnn_kw4x_mobilenetv2_100',
         'mask-rcnn_kw4x-mobilenet-v2_fpn_paper-ms-crop-1x_coco.py'),
        ('mask_rcnn_kw1x_convnext_tiny',
         'mask-rcnn_kw1x-convnext-t_fpn_paper-ms-crop-1x_coco.py'),
    ))
