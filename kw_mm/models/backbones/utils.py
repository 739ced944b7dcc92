"""Argument checks and freezing shared by the KW backbones."""
from __future__ import annotations

from typing import Iterable, Sequence, Tuple

from mmengine.model import BaseModule
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ...layers.kw_conv import KWLayer


def check_out_indices(out_indices, num_stages: int, name: str = 'out_indices') -> Tuple[int, ...]:
    """Normalise ``out_indices`` (negative indices allowed) or raise ValueError."""
    if isinstance(out_indices, int):
        out_indices = [out_indices]
    if not isinstance(out_indices, Sequence) or not out_indices:
        raise ValueError(f'{name} must be an int or a non-empty sequence of ints, '
                         f'got {out_indices!r}')
    result = []
    for index in out_indices:
        if not isinstance(index, int) or not -num_stages <= index < num_stages:
            raise ValueError(f'{name} entries must be ints in [{-num_stages}, {num_stages - 1}] '
                             f'(the backbone has {num_stages} stages), got {index!r} in '
                             f'{tuple(out_indices)}')
        result.append(index % num_stages)
    return tuple(result)


def check_frozen_stages(frozen_stages, num_stages: int) -> int:
    if not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= num_stages:
        raise ValueError(f'frozen_stages must be an int in [-1, {num_stages}] (-1 freezes '
                         f'nothing, 0 the stem, i the stem and stages 1..i), got {frozen_stages!r}')
    return frozen_stages


def freeze_modules(modules: Iterable[nn.Module]) -> None:
    """Put ``modules`` in eval mode and stop their gradients.

    Warehouses that any KW layer inside ``modules`` draws from are frozen too,
    so the frozen layers keep exactly their kernels even when a warehouse is
    shared with a layer outside them (that layer then adapts only through its
    attention).
    """
    for module in modules:
        module.eval()
        for param in module.parameters():
            param.requires_grad = False
        for layer in module.modules():
            if isinstance(layer, KWLayer):
                layer.kw_warehouse.cells.requires_grad = False


def pretrained_cfg(init_cfg):
    """The ``Pretrained`` entry of an mmengine ``init_cfg`` (dict or list), or None."""
    cfgs = init_cfg if isinstance(init_cfg, (list, tuple)) else [init_cfg]
    for cfg in cfgs:
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            return cfg
    return None


def check_pretrained(module: nn.Module, init_cfg) -> None:
    """Refuse a ``Pretrained`` checkpoint whose KW tensors do not fit ``module``.

    mmengine loads pretrained weights non-strictly and only logs mismatches,
    so a checkpoint of another KW variant (another budget, depth or family)
    would leave the warehouses at their random initialisation without a
    clear sign. This check runs first and raises, naming what was found and
    what was expected.
    """
    cfg = pretrained_cfg(init_cfg)
    if cfg is None or not cfg.get('checkpoint'):
        return
    from mmengine.runner.checkpoint import CheckpointLoader

    from ...convert import CheckpointMismatchError, compare_shapes
    checkpoint = CheckpointLoader.load_checkpoint(cfg['checkpoint'], map_location='cpu')
    state = checkpoint.get('state_dict', checkpoint) if isinstance(checkpoint, dict) else {}
    prefix = cfg.get('prefix')
    if prefix:
        prefix = prefix if prefix.endswith('.') else prefix + '.'
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    found = {k: tuple(v.shape) for k, v in state.items() if hasattr(v, 'shape')}
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    kw_keys = {k for k in expected if k.startswith('warehouses.') or '.attention.' in k}
    problems = compare_shapes({k: v for k, v in found.items() if k in expected},
                              {k: v for k, v in expected.items() if k in found or k in kw_keys})
    if problems:
        problems.sort(key=lambda p: 'warehouses.' not in p)  # the telling ones first
        shown = '\n  '.join(problems[:12])
        more = f'\n  ... and {len(problems) - 12} more' if len(problems) > 12 else ''
        raise CheckpointMismatchError(
            f"init_cfg checkpoint {cfg['checkpoint']!r} (prefix {cfg.get('prefix')!r}) does not "
            f'fit this {type(module).__name__}; found vs expected:\n  {shown}{more}')


def reset_kw_attentions(module: nn.Module) -> None:
    """Give every KW layer in ``module`` its own attention initialisation back.

    Classifier-level init configs such as mmpretrain's
    ``TruncNormal(layer=['Conv2d', 'Linear'])`` also hit the attentions' FC
    layers; backbones call this after ``super().init_weights()``.
    """
    for layer in module.modules():
        if isinstance(layer, KWLayer):
            layer.attention.reset_parameters()


class KWBaseBackbone(BaseModule):
    """What the KW backbones share: the pretrained-checkpoint check, the
    attentions' own initialisation after mmengine's, and ``train()`` that
    re-applies ``frozen_stages`` and ``norm_eval``.

    Subclasses implement ``_freeze_stages`` and may set ``self.norm_eval``.
    """

    norm_eval: bool = False

    def _freeze_stages(self) -> None:
        raise NotImplementedError

    def init_weights(self) -> None:
        check_pretrained(self, self.init_cfg)
        super().init_weights()
        if pretrained_cfg(self.init_cfg) is None:
            reset_kw_attentions(self)

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self
