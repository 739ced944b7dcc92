"""Which model a checkpoint holds, and refusing one that does not fit.

Two checks compare tensor names and shapes:

- :func:`identify` finds the released model a converted checkpoint is, among
  the models built from their configs (on the meta device, so cheaply).
- :func:`check_state_dict_fits` refuses a state dict whose KW tensors
  (warehouses, attentions) or any tensor shapes differ from a backbone's.
  The KW backbones call it whenever a state dict is loaded into them, so
  every loading path (``load_state_dict``, mmengine's ``load_checkpoint``
  with ``strict=False``, ``load_from``, resume, ``init_cfg`` ``Pretrained``)
  refuses a checkpoint of another variant, naming the variant found and the
  one expected, instead of leaving the convolutions at random values.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .released import RELEASED_MODELS, ReleasedModel

Shapes = Mapping[str, Tuple[int, ...]]


class CheckpointMismatchError(ValueError):
    """A checkpoint does not match the model it was expected to be."""


def _shapes(state: Mapping[str, torch.Tensor]) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, 'shape')}


def compare_shapes(found: Shapes, expected: Shapes) -> List[str]:
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
    if not candidates:
        raise ValueError('candidates must name at least one released model, got none')
    found = _shapes(converted)
    best: Optional[Tuple[int, ReleasedModel, List[str]]] = None
    for candidate in candidates:
        problems = compare_shapes(found, _released_shapes(candidate))
        if not problems:
            return candidate
        if best is None or len(problems) < best[0]:
            best = (len(problems), candidate, problems)
    _, closest, problems = best
    shown = '\n  '.join(problems[:15])
    more = f'\n  ... and {len(problems) - 15} more' if len(problems) > 15 else ''
    raise CheckpointMismatchError(
        f'the checkpoint matches none of the known released models '
        f'({", ".join(c.name for c in candidates)}). Closest is {closest.name} '
        f'({closest.config}); these tensors did not match:\n  {shown}{more}')


@functools.lru_cache(maxsize=None)
def _released_shapes(model: ReleasedModel) -> Dict[str, Tuple[int, ...]]:
    """Name → shape of a released model's kw_mm state dict (built on the meta device)."""
    from ..apis import build_from_config
    return _shapes(build_from_config(model.config_path, 'meta').state_dict())


# --------------------------------------------------------------------------- backbone fit


def is_kw_key(key: str) -> bool:
    """Whether a backbone state-dict key belongs to KernelWarehouse: a
    warehouse (``warehouses.N.cells``) or a KW layer's attention."""
    parts = key.split('.')
    return parts[0] == 'warehouses' or 'attention' in parts[:-1]


def fit_problems(found: Shapes, expected: Shapes) -> List[str]:
    """What keeps ``found`` (a checkpoint's backbone tensors) from fitting
    ``expected`` (the backbone's): every tensor whose shape differs, and the
    KW tensors one side has and the other lacks. Warehouses come first.

    Non-KW tensors missing on either side are not problems here: a checkpoint
    may legitimately lack or add norms or heads (mmengine reports those).
    """
    def kw(key: str) -> bool:
        return is_kw_key(key) and not key.endswith('num_batches_tracked')
    problems = [f'{k}: found {list(found[k])}, expected {list(expected[k])}'
                for k in sorted(set(found) & set(expected)) if found[k] != expected[k]]
    problems += [f'missing {k} {list(expected[k])}'
                 for k in sorted(set(expected) - set(found)) if kw(k)]
    problems += [f'unexpected {k} {list(found[k])}'
                 for k in sorted(set(found) - set(expected)) if kw(k)]
    problems.sort(key=lambda p: 'warehouses.' not in p)  # the telling ones first
    return problems


def _warehouses(shapes: Shapes) -> List[str]:
    """Each ``warehouses.N.cells`` tensor in warehouse order, as 'C cells of AxBxHxW'."""
    cells = {}
    for key, shape in shapes.items():
        parts = key.split('.')
        if len(parts) == 3 and parts[0] == 'warehouses' and parts[2] == 'cells' and shape:
            cells[parts[1]] = shape
    order = sorted(cells, key=lambda n: (0, int(n), '') if n.isdigit() else (1, 0, n))
    return [f'{cells[n][0]} cells of {"x".join(map(str, cells[n][1:]))}' for n in order]


def released_backbone(shapes: Shapes, family: str = '') -> Optional[ReleasedModel]:
    """The released ImageNet model whose backbone's KW tensors have exactly
    ``shapes``' KW names and shapes, or None (also for a plain backbone).

    ``family`` ('resnet', 'mobilenetv2', 'convnext') limits the search to the
    released models whose names contain it; each candidate is built once per
    process on the meta device.
    """
    kw = {k: s for k, s in shapes.items() if is_kw_key(k)}
    if not kw:
        return None
    for model in RELEASED_MODELS:
        if family not in model.name:
            continue
        theirs = {k[len('backbone.'):]: s for k, s in _released_shapes(model).items()
                  if k.startswith('backbone.') and is_kw_key(k[len('backbone.'):])}
        if theirs == kw:
            return model
    return None


def dynamic_layers(shapes: Shapes) -> Dict[str, Tuple[str, int]]:
    """The dynamic convolutions (``dynamic_cfg``: ODConv, CondConv, DY-Conv) of
    a state dict: layer name → (method, number of kernels). Such a layer has
    a kernel bank ``<layer>.weight [n, out, in/groups, kh, kw]`` and an
    ``<layer>.attention``, whose tensors tell the method apart."""
    layers = {}
    for key, shape in shapes.items():
        if not key.endswith('.weight') or len(shape) != 5:
            continue
        layer = key[:-len('.weight')]
        if f'{layer}.attention.channel_fc.weight' in shapes:
            layers[layer] = ('ODConv', shape[0])
        elif f'{layer}.attention.fc2.weight' in shapes:
            layers[layer] = ('DY-Conv', shape[0])
        elif f'{layer}.attention.fc.weight' in shapes:
            layers[layer] = ('CondConv', shape[0])
    if any(method == 'CondConv' for method, _ in layers.values()):
        # the other layers of a CondConv block use the routing of the block's first
        layers.update((key[:-len('.weight')], ('CondConv', shape[0])) for key, shape in
                      shapes.items() if key.endswith('.weight') and len(shape) == 5
                      and key[:-len('.weight')] not in layers)
    return layers


def describe_variant(shapes: Shapes, family: str = '') -> str:
    """A backbone variant in words, from its state dict's names and shapes:
    plain, another dynamic convolution (ODConv, CondConv, DY-Conv) or KW,
    its warehouses' cell counts, and the released model (of ``family``, see
    :func:`released_backbone`) it equals, if any."""
    if not any(is_kw_key(k) for k in shapes):
        return 'a plain backbone (no KW tensors, as with kw_cfg=None)'
    dynamic = dynamic_layers(shapes)
    if dynamic and not _warehouses(shapes):
        methods = sorted({method for method, _ in dynamic.values()})
        kernels = sorted({n for _, n in dynamic.values()})
        name = '/'.join(methods)
        article = 'an' if name[0] in 'AEIOU' else 'a'
        return (f'{article} {name} backbone (dynamic_cfg: {len(dynamic)} dynamic layer(s) of '
                f'{"/".join(map(str, kernels))} kernels, no KW warehouses)')
    warehouses = _warehouses(shapes)
    text = (f'a KW backbone with {len(warehouses)} warehouse(s) ({", ".join(warehouses)})'
            if warehouses else 'a KW backbone without warehouses')
    try:
        released = released_backbone(shapes, family)
    except Exception:  # naming the released model is a courtesy; never hide the refusal
        released = None
    if released is not None:
        text += f' (the released {released.name}, {released.config})'
    return text


def _key_prefix(found: Shapes, expected: Shapes) -> str:
    """The prefix that ``found``'s keys carry when they are ``expected``'s
    under a prefix (a whole model's checkpoint loaded into its backbone), or ''."""
    if set(found) & set(expected):
        return ''
    for key in found:
        for name in expected:
            if key.endswith('.' + name):
                return key[:-len(name)]
    return ''


def check_state_dict_fits(module: torch.nn.Module, state_dict: Mapping[str, object],
                          prefix: str = '', source: Optional[str] = None) -> None:
    """Refuse loading ``state_dict`` into ``module`` when it holds another variant.

    Args:
        module (nn.Module): A KW backbone (or any module with KW layers).
        state_dict (Mapping): The state dict being loaded; only the entries
            under ``prefix`` are the module's.
        prefix (str): ``module``'s prefix in ``state_dict``.
        source (str, optional): Where the state dict comes from, for the message.

    Raises:
        CheckpointMismatchError: The entries under ``prefix`` have a tensor of
            another shape than ``module``'s, or KW tensors that ``module``
            lacks, or lack KW tensors that ``module`` has. Nothing is checked
            when no entry is under ``prefix``.
    """
    found = {k[len(prefix):]: tuple(v.shape) for k, v in state_dict.items()
             if isinstance(k, str) and k.startswith(prefix) and hasattr(v, 'shape')}
    if not found:
        return
    expected = _shapes(module.state_dict())
    problems = fit_problems(found, expected)
    if not problems:
        return
    name = type(module).__name__
    family = name.lower().replace('kw', '', 1)
    shown = '\n  '.join(problems[:12])
    more = f'\n  ... and {len(problems) - 12} more' if len(problems) > 12 else ''
    origin = f'checkpoint {source}' if source else 'the checkpoint'
    key_prefix = _key_prefix(found, expected)
    hint = ''
    if key_prefix:
        found = {k[len(key_prefix):]: s for k, s in found.items() if k.startswith(key_prefix)}
        hint = (f"\nIts keys carry the prefix {key_prefix!r}; load it with "
                f"init_cfg=dict(type='Pretrained', checkpoint=..., prefix={key_prefix!r}).")
    raise CheckpointMismatchError(
        f'{origin} does not fit this {name}: it holds {describe_variant(found, family)}, but '
        f'this {name} is {describe_variant(expected, family)}. Use the config of the '
        "checkpoint's variant (tools/convert_official_kw.py prints it for released "
        "checkpoints) or a checkpoint of this variant. Found vs expected:\n  "
        f'{shown}{more}{hint}')


__all__ = [
    'CheckpointMismatchError', 'compare_shapes', 'identify', 'is_kw_key', 'fit_problems',
    'released_backbone', 'describe_variant', 'dynamic_layers', 'check_state_dict_fits'
]
