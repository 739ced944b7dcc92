"""Convert the authors' released KernelWarehouse checkpoints to kw_mm.

**ImageNet models.** The released files store a state dict (under ``model``
and, when trained with EMA, ``model_ema``, or bare) whose KW layers already
use kw_mm's module names; only the warehouse container, the classifier and
(ConvNeXt) the final norm differ:

==============================  =====================================
authors                         kw_mm (mmpretrain ``ImageClassifier``)
==============================  =====================================
``warehouse_manager.weights.N`` ``backbone.warehouses.N.cells``
``fc.*`` / ``classifier.*``     ``head.fc.*``
``classifier.1.conv.*`` (KW)    ``head.fc.*`` (``KWLinearClsHead``, MobileNetV2 1/2x)
last ``weights.N`` (KW head)    ``head.fc.warehouse.cells`` (the classifier's own)
``head.*`` (ConvNeXt)           ``head.fc.*``
``norm.*`` (ConvNeXt)           ``backbone.norm3.*``
everything else                 ``backbone.`` + key
(no τ stored)                   ``backbone.<layer>.attention.temperature`` = 0
==============================  =====================================

**Mask R-CNN models** (mmdet 2.x checkpoints: ``state_dict`` with
``backbone.``, ``neck.``, ``rpn_head.`` and ``roi_head.`` keys, plus
``meta``). Their backbones are the ImageNet ones with the classifier left in
place (ResNet, MobileNetV2) or replaced by one LayerNorm per output stage
(ConvNeXt, ``norm0`` … ``norm3``, the names kw_mm's ``KWConvNeXt`` uses);
the FPN neck and the RPN, box and mask heads have the same names and shapes
in mmdet 2.x and 3.x:

============================================  ==============================================
authors (mmdet 2.x ``MaskRCNN``)              kw_mm (mmdet 3.x ``MaskRCNN``)
============================================  ==============================================
``backbone.warehouse_manager.weights.N``      ``backbone.warehouses.N.cells``
``backbone.fc.*`` (ResNet)                    dropped (ImageNet classifier, never used)
``backbone.classifier.*`` (MobileNetV2)       dropped (ImageNet classifier, never used)
other ``backbone.*`` (``norm0`` … ``norm3``)  unchanged
``neck.*``, ``rpn_head.*``, ``roi_head.*``    unchanged
(no τ stored)                                 ``backbone.<layer>.attention.temperature`` = 0
============================================  ==============================================

τ is stored as 0 for every KW layer: the authors' attentions keep τ as a
plain attribute (not in the state dict), set to 0 after ImageNet training
and at construction of their detection backbones, and kw_mm's fine-tuning
configs pin it to 0 (``KWFinetuneHook``).

Which released model a file holds is found from tensor shapes alone: the
converted dict is compared with the state dict of every known model of its
task, built on the meta device from its config.
"""
from __future__ import annotations

import argparse
import os.path as osp
from typing import Dict, List, Mapping, Optional

import torch

from .io import check_writable_destination, read_checkpoint_file, write_checkpoint_file
from .released import RELEASED_DETECTION_MODELS, ReleasedModel
from .verify import CheckpointMismatchError, identify


def extract_state_dict(checkpoint: Mapping, prefer_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The model state dict inside a released checkpoint file's contents."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointMismatchError(
            f'expected a dict-like checkpoint, got {type(checkpoint).__name__}')
    order = ('model_ema', 'model', 'state_dict') if prefer_ema else ('model', 'model_ema',
                                                                      'state_dict')
    for key in order:
        if isinstance(checkpoint.get(key), Mapping):
            return dict(checkpoint[key])
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return dict(checkpoint)
    raise CheckpointMismatchError(
        f"no state dict found: expected a 'model', 'model_ema' or 'state_dict' entry or a bare "
        f'state dict, got keys {sorted(checkpoint)[:10]}')


#: the authors' KW classifier (MobileNetV2 1/2x): ``classifier = [Dropout, KWLinear]``,
#: and their KWLinear wraps a 1-d KW convolution called ``conv``.
KW_CLASSIFIER_PREFIX = 'classifier.1.conv.'


def kw_classifier_warehouse(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Index (as text) of the warehouse of the authors' KW classifier, or None.

    The authors number warehouses in construction order and build the
    classifier last, so with a KW classifier the last warehouse is its own.
    """
    keys = [k[len('module.'):] if k.startswith('module.') else k for k in state_dict]
    if not any(k.startswith(KW_CLASSIFIER_PREFIX) for k in keys):
        return None
    indices = [int(k.rsplit('.', 1)[1]) for k in keys
               if k.startswith('warehouse_manager.weights.')]
    return str(max(indices)) if indices else None


def _strip_module(key: str) -> str:
    """``key`` without the ``module.`` prefix that (Distributed)DataParallel adds."""
    return key[len('module.'):] if key.startswith('module.') else key


def official_backbone_entries(key: str, value: torch.Tensor,
                              temperature: float) -> Dict[str, torch.Tensor]:
    """kw_mm entries for one tensor of an authors' backbone.

    Args:
        key (str): The authors' name relative to the backbone
            (``warehouse_manager.weights.3``, ``layer1.0.conv2.attention.fc1.weight``).
        value (Tensor): The tensor.
        temperature (float): τ stored for a KW layer, whose
            ``attention.fc1.weight`` brings its ``attention.temperature``.

    Returns:
        dict: ``backbone.``-prefixed kw_mm names → tensors (one or two entries).
    """
    if key.startswith('warehouse_manager.weights.'):
        return {f'backbone.warehouses.{key.rsplit(".", 1)[1]}.cells': value}
    entries = {'backbone.' + key: value}
    if key.endswith('.attention.fc1.weight'):
        layer = key[:-len('.fc1.weight')]
        entries[f'backbone.{layer}.temperature'] = torch.tensor(float(temperature))
    return entries


def official_to_mmpretrain(state_dict: Mapping[str, torch.Tensor],
                           temperature: float = 0.0) -> Dict[str, torch.Tensor]:
    """Rename an authors' state dict to an mmpretrain ``ImageClassifier``'s."""
    out: Dict[str, torch.Tensor] = {}
    head_warehouse = kw_classifier_warehouse(state_dict)
    for key, value in state_dict.items():
        key = _strip_module(key)
        if key.startswith('warehouse_manager.weights.'):
            if key.rsplit('.', 1)[1] == head_warehouse:  # the KW classifier's own warehouse
                out['head.fc.warehouse.cells'] = value
                continue
            out.update(official_backbone_entries(key, value, temperature))
        elif key.startswith(KW_CLASSIFIER_PREFIX):  # MobileNetV2 1/2x: KWLinear's ``conv``
            out['head.fc.' + key[len(KW_CLASSIFIER_PREFIX):]] = value
            if key.endswith('.attention.fc1.weight'):
                out['head.fc.attention.temperature'] = torch.tensor(float(temperature))
        elif key.startswith('fc.'):
            out['head.fc.' + key[3:]] = value
        elif key.startswith('classifier.'):
            out['head.fc.' + key[len('classifier.'):]] = value
        elif key.startswith('head.'):  # ConvNeXt classifier
            out['head.fc.' + key[len('head.'):]] = value
        elif key.startswith('norm.'):  # ConvNeXt final norm (after pooling): mmpretrain's norm3
            out['backbone.norm3.' + key[len('norm.'):]] = value
        else:
            out.update(official_backbone_entries(key, value, temperature))
    return out


#: the parts every mmdet 2.x two-stage detector's state dict has
DETECTION_PREFIXES = ('backbone.', 'neck.', 'rpn_head.')

#: tensors of the authors' detection backbones that no detector uses: the ImageNet
#: classifier that their ``KW_ResNet`` (``fc``) and ``KW_MobileNetV2`` (``classifier``)
#: build and load with the pretrained weights (ConvNeXt has none)
UNUSED_DETECTION_PREFIXES = ('backbone.fc.', 'backbone.classifier.')


def is_detection_state_dict(state_dict: Mapping) -> bool:
    """Whether a state dict is an mmdet detector's (backbone, neck and RPN head keys)."""
    keys = [_strip_module(k) for k in state_dict if isinstance(k, str)]
    return all(any(k.startswith(prefix) for k in keys) for prefix in DETECTION_PREFIXES)


def checkpoint_task(checkpoint: Mapping) -> str:
    """'detection' for an mmdet checkpoint (``state_dict`` holding a detector's
    keys, or such a state dict bare), else 'classification'."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointMismatchError(
            f'expected a dict-like checkpoint, got {type(checkpoint).__name__}')
    inner = checkpoint.get('state_dict')
    if (isinstance(inner, Mapping) and not isinstance(checkpoint.get('model'), Mapping)
            and is_detection_state_dict(inner)):
        return 'detection'
    if (checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values())
            and is_detection_state_dict(checkpoint)):
        return 'detection'
    return 'classification'


def extract_detection_state_dict(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    """The detector's state dict inside an mmdet checkpoint's contents."""
    if checkpoint_task(checkpoint) != 'detection':
        raise CheckpointMismatchError(
            f"not an mmdet detection checkpoint: expected a 'state_dict' (or a bare state dict) "
            f"with keys starting with {', '.join(DETECTION_PREFIXES)}; got keys "
            f'{sorted(map(str, checkpoint))[:10]}')
    inner = checkpoint.get('state_dict')
    return dict(inner) if isinstance(inner, Mapping) else dict(checkpoint)


def unused_detection_keys(state_dict: Mapping[str, torch.Tensor]) -> List[str]:
    """The authors' detection tensors that :func:`official_detection_to_mmdet` drops."""
    return sorted(k for k in map(_strip_module, state_dict)
                  if k.startswith(UNUSED_DETECTION_PREFIXES))


def official_detection_to_mmdet(state_dict: Mapping[str, torch.Tensor],
                                temperature: float = 0.0) -> Dict[str, torch.Tensor]:
    """Rename an authors' mmdet 2.x Mask R-CNN state dict to kw_mm's mmdet 3.x one.

    The backbone goes through :func:`official_backbone_entries` (warehouses,
    τ), its unused ImageNet classifier is dropped (:func:`unused_detection_keys`),
    and the neck and heads keep their names: mmdet 3.x's ``FPN``, ``RPNHead``,
    ``Shared2FCBBoxHead`` and ``FCNMaskHead`` have the modules and shapes of
    mmdet 2.x (the background class is last in ``fc_cls`` in both).
    """
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = _strip_module(key)
        if key.startswith(UNUSED_DETECTION_PREFIXES):
            continue
        if key.startswith('backbone.'):
            out.update(official_backbone_entries(key[len('backbone.'):], value, temperature))
        else:
            out[key] = value
    return out


def load_checkpoint_file(src: str) -> Mapping:
    """The contents of a released checkpoint file, loaded safely (weights_only).

    Raises :class:`FileNotFoundError` for a missing file and
    :class:`~kw_mm.checkpoint.io.CheckpointFileError`, naming the file and the
    problem, for one that is empty, truncated, not a PyTorch file or holds
    objects that safe loading refuses.
    """
    # the authors' training checkpoints also hold their argparse options
    return read_checkpoint_file(src, extra_safe_globals=[argparse.Namespace],
                                role='checkpoint SRC')


def _dataset_meta(checkpoint: Mapping) -> Optional[Dict[str, tuple]]:
    """mmdet 3.x ``dataset_meta`` from an mmdet 2.x checkpoint's ``meta['CLASSES']``."""
    meta = checkpoint.get('meta')
    classes = meta.get('CLASSES') if isinstance(meta, Mapping) else None
    if isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes):
        return dict(classes=tuple(classes))
    return None


def convert_file(src: str, dst: str, prefer_ema: bool = False) -> ReleasedModel:
    """Convert a released checkpoint file; returns the model it was found to be.

    An mmdet 2.x detection checkpoint (see :func:`checkpoint_task`) becomes an
    mmdet 3.x one for the matching ``RELEASED_DETECTION_MODELS`` config, any
    other file an mmpretrain one for the matching ``RELEASED_MODELS`` config.
    DST holds ``{'state_dict': ..., 'meta': {...}}`` and is written atomically:
    a failed or killed conversion leaves DST as it was, and the temporary file
    of a killed one is removed by the next conversion to DST.

    Raises:
        FileNotFoundError: SRC does not exist.
        CheckpointFileError: SRC cannot be read as a checkpoint (empty,
            truncated, not a PyTorch file, unsafe objects), or DST cannot be
            written (SRC itself, a directory, under a file, a folder without
            write permission, a failed write). Checked before any conversion
            work for DST.
        CheckpointMismatchError: SRC is not one of the released models.
    """
    check_writable_destination(dst, protect=[src], role='output DST')
    checkpoint = load_checkpoint_file(src)
    task = checkpoint_task(checkpoint)
    meta: Dict[str, object] = dict(source=osp.basename(src), converter='kw_mm.convert',
                                   task=task)
    if task == 'detection':
        if prefer_ema:
            raise CheckpointMismatchError(
                f'{src} is an mmdet detection checkpoint, which holds one set of weights '
                "('state_dict') and no EMA copy; convert it without prefer_ema (--ema)")
        state_dict = extract_detection_state_dict(checkpoint)
        converted = official_detection_to_mmdet(state_dict, temperature=0.0)
        model = identify(converted, RELEASED_DETECTION_MODELS)
        meta.update(dropped_keys=unused_detection_keys(state_dict), temperature=0.0)
        dataset_meta = _dataset_meta(checkpoint)
        if dataset_meta is not None:
            meta['dataset_meta'] = dataset_meta
    else:
        converted = official_to_mmpretrain(extract_state_dict(checkpoint, prefer_ema))
        model = identify(converted)
    meta.update(released_model=model.name, config=model.config)
    # atomic: a crash mid-write never leaves a truncated file under DST
    write_checkpoint_file(dst, dict(state_dict=converted, meta=meta), role='output DST')
    return model


__all__ = [
    'DETECTION_PREFIXES', 'KW_CLASSIFIER_PREFIX', 'UNUSED_DETECTION_PREFIXES', 'checkpoint_task',
    'convert_file', 'extract_detection_state_dict', 'extract_state_dict',
    'is_detection_state_dict', 'kw_classifier_warehouse', 'load_checkpoint_file',
    'official_backbone_entries', 'official_detection_to_mmdet', 'official_to_mmpretrain',
    'unused_detection_keys'
]
