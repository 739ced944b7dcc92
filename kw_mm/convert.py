"""Convert the authors' released KernelWarehouse checkpoints to kw_mm.

The released ImageNet models store a state dict (under ``model`` and, when
trained with EMA, ``model_ema``, or bare) whose KW layers already use kw_mm's
module names; only the warehouse container, the classifier and (ConvNeXt) the final norm differ:

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

Which released model a file holds is found from tensor shapes alone: the
converted dict is compared with the state dict of every known model, built
on the meta device from its config.
"""
from __future__ import annotations

import os.path as osp
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .utils.atomic_backend import write_atomically

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


@dataclass(frozen=True)
class ReleasedModel:
    """A released ImageNet model and the kw_mm config that builds it."""
    name: str
    config: str  # relative to the repository root

    @property
    def config_path(self) -> str:
        return osp.join(REPO_ROOT, self.config)


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


class CheckpointMismatchError(ValueError):
    """A checkpoint does not match the model it was expected to be."""


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


def official_to_mmpretrain(state_dict: Mapping[str, torch.Tensor],
                           temperature: float = 0.0) -> Dict[str, torch.Tensor]:
    """Rename an authors' state dict to an mmpretrain ``ImageClassifier``'s."""
    out: Dict[str, torch.Tensor] = {}
    head_warehouse = kw_classifier_warehouse(state_dict)
    for key, value in state_dict.items():
        key = key[len('module.'):] if key.startswith('module.') else key
        if key.startswith('warehouse_manager.weights.'):
            index = key.rsplit('.', 1)[1]
            if index == head_warehouse:  # KWLinearClsHead owns the classifier's warehouse
                out['head.fc.warehouse.cells'] = value
                continue
            out[f'backbone.warehouses.{index}.cells'] = value
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
            out['backbone.' + key] = value
            if key.endswith('.attention.fc1.weight'):
                layer = key[:-len('.fc1.weight')]
                out[f'backbone.{layer}.temperature'] = torch.tensor(float(temperature))
    return out


def build_from_config(config_path: str, device: str = 'cpu') -> torch.nn.Module:
    """Build the model of an mmpretrain config (on ``device``; 'meta' is cheap)."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    cfg = Config.fromfile(config_path)
    import kw_mm  # noqa: F401  (registers the KW modules)
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    from mmpretrain.registry import MODELS
    with torch.device(device):
        return MODELS.build(cfg.model)


def _shapes(state: Mapping[str, torch.Tensor]) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def compare_shapes(found: Mapping[str, Tuple[int, ...]],
                   expected: Mapping[str, Tuple[int, ...]]) -> List[str]:
    """Human-readable differences between two key → shape tables."""
    problems = []
    for key in sorted(set(expected) - set(found)):
        problems.append(f'missing {key} {list(expected[key])}')
    for key in sorted(set(found) - set(expected)):
        problems.append(f'unexpected {key} {list(found[key])}')
    for key in sorted(set(found) & set(expected)):
        if found[key] != expected[key]:
            problems.append(f'{key}: found {list(found[key])}, expected {list(expected[key])}')
    return problems


def identify(converted: Mapping[str, torch.Tensor],
             candidates: Sequence[ReleasedModel] = RELEASED_MODELS) -> ReleasedModel:
    """The released model whose tensors all match ``converted`` by name and shape."""
    found = _shapes(converted)
    best: Optional[Tuple[int, ReleasedModel, List[str]]] = None
    for candidate in candidates:
        expected = _shapes(build_from_config(candidate.config_path, 'meta').state_dict())
        problems = compare_shapes(found, expected)
        if not problems:
            return candidate
        if best is None or len(problems) < best[0]:
            best = (len(problems), candidate, problems)
    assert best is not None
    _, closest, problems = best
    shown = '\n  '.join(problems[:15])
    more = f'\n  ... and {len(problems) - 15} more' if len(problems) > 15 else ''
    raise CheckpointMismatchError(
        f'the checkpoint matches none of the known released models '
        f'({", ".join(c.name for c in candidates)}). Closest is {closest.name} '
        f'({closest.config}); these tensors did not match:\n  {shown}{more}')


def convert_file(src: str, dst: str, prefer_ema: bool = False) -> ReleasedModel:
    """Convert a released checkpoint file; returns the model it was found to be."""
    if not osp.isfile(src):
        raise FileNotFoundError(f'checkpoint SRC not found: {src}')
    import argparse
    import pickle
    try:
        # the authors' training checkpoints also hold their argparse options
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(src, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointMismatchError(
            f'{src} holds objects that safe loading (weights_only=True) refuses: {first_line}. '
            'Save just its state dict (torch.save(ckpt["model"], path)) and convert that.')
    converted = official_to_mmpretrain(extract_state_dict(checkpoint, prefer_ema))
    model = identify(converted)
    meta = dict(source=osp.basename(src), released_model=model.name, config=model.config,
                converter='kw_mm.convert')
    # atomic: a crash mid-write never leaves a truncated file under DST
    write_atomically(dst, lambda f: torch.save(dict(state_dict=converted, meta=meta), f))
    return model
