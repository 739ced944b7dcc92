"""Argument checks and freezing shared by the KW backbones."""
from __future__ import annotations

from typing import Any, Dict, Hashable, Iterable, Mapping, Optional, Sequence, Tuple

from mmengine.model import BaseModule
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ...checkpoint.verify import CheckpointMismatchError, check_state_dict_fits
from ...layers import KWLayer
from ...layers.dynamic import DynamicConv2d, DynamicConvConfig, parse_dynamic_cfg
from ...layers.options import PER_WAREHOUSE_KEYS, KWOptions

#: the backbones' default ``kw_cfg`` (KW at b = 1); a backbone given
#: ``dynamic_cfg`` and this very object builds no KW layers.
DEFAULT_KW_CFG = dict(budget=1.0)


def conv_configs(backbone: str, kw_cfg, dynamic_cfg, defaults=None
                 ) -> Tuple[Optional[KWOptions], Optional[DynamicConvConfig]]:
    """A backbone's checked ``kw_cfg`` and ``dynamic_cfg``, which exclude each other.

    ``kw_cfg`` left at its default (:data:`DEFAULT_KW_CFG`) counts as None when
    ``dynamic_cfg`` is given.

    Raises:
        ValueError: both are given (naming them), or either is invalid.
    """
    dynamic = parse_dynamic_cfg(dynamic_cfg)
    if dynamic is not None and kw_cfg is DEFAULT_KW_CFG:
        kw_cfg = None
    if dynamic is not None and kw_cfg is not None:
        given = dict(kw_cfg) if isinstance(kw_cfg, Mapping) else kw_cfg
        raise ValueError(f'{backbone}: kw_cfg and dynamic_cfg are mutually exclusive (a layer is '
                         f'either KernelWarehouse or another dynamic convolution), got '
                         f'kw_cfg={given!r} and dynamic_cfg={dict(dynamic_cfg)!r}; set '
                         f'kw_cfg=None to build {dynamic.method}')
    return KWOptions.from_kw_cfg(kw_cfg, defaults=defaults), dynamic


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



def add_warehouse_overrides(overrides: Dict[Hashable, Dict[str, Any]],
                            kw_warehouses: Optional[Mapping[str, Mapping[str, Any]]],
                            names: Sequence[Hashable], layout: str
                            ) -> Dict[Hashable, Dict[str, Any]]:
    """``overrides`` updated with a backbone's ``kw_warehouses`` argument, checked.

    Args:
        overrides (dict): The backbone's own per-warehouse overrides; updated in place.
        kw_warehouses (dict, optional): Per-warehouse ``budget`` / cell-ratio
            overrides by warehouse name.
        names (Sequence): The warehouse names of the backbone's layout.
        layout (str): How the error messages name the layout.
    """
    if kw_warehouses is None:
        return overrides
    if not isinstance(kw_warehouses, Mapping):
        raise TypeError(f'kw_warehouses must be a dict or None, got '
                        f'{type(kw_warehouses).__name__}')
    for name, options in kw_warehouses.items():
        if name not in names:
            raise ValueError(f'kw_warehouses has unknown warehouse {name!r}; {layout} has '
                             f'{list(names)}')
        if not isinstance(options, Mapping) or set(options) - set(PER_WAREHOUSE_KEYS):
            raise ValueError(f'kw_warehouses[{name!r}] must be a dict with keys among '
                             f'{PER_WAREHOUSE_KEYS}, got {options!r}')
        overrides.setdefault(name, {}).update(options)
    return overrides


def pretrained_cfg(init_cfg):
    """The ``Pretrained`` entry of an mmengine ``init_cfg`` (dict or list), or None."""
    cfgs = init_cfg if isinstance(init_cfg, (list, tuple)) else [init_cfg]
    for cfg in cfgs:
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            return cfg
    return None


def reset_kw_attentions(module: nn.Module) -> None:
    """Give every KW layer and dynamic convolution in ``module`` its own
    attention initialisation back.

    Classifier-level init configs such as mmpretrain's
    ``TruncNormal(layer=['Conv2d', 'Linear'])`` also hit the attentions' FC
    layers; backbones call this after ``super().init_weights()``.
    """
    for layer in module.modules():
        if isinstance(layer, KWLayer):
            layer.attention.reset_parameters()
        elif isinstance(layer, DynamicConv2d) and 'attention' in layer._modules:
            layer.attention.reset_parameters()  # (a shared one: by the layer owning it)


class KWBaseBackbone(BaseModule):
    """What the KW backbones share: refusing checkpoints of another variant,
    the attentions' own initialisation after mmengine's, and ``train()`` that
    re-applies ``frozen_stages`` and ``norm_eval``.

    Every state dict loaded into the backbone, whatever the path (torch's
    ``load_state_dict``, mmengine's ``load_checkpoint`` and ``load_state_dict``
    with ``strict=False``, ``load_from``, resume, ``init_cfg`` ``Pretrained``,
    the EMA copy), goes through ``_load_from_state_dict``; there the backbone's
    entries are checked by :func:`~kw_mm.checkpoint.verify.check_state_dict_fits`
    before anything is copied. mmengine would only log the mismatches and
    leave the convolutions random.

    Subclasses implement ``_freeze_stages`` and may set ``self.norm_eval``.
    """

    norm_eval: bool = False

    def _freeze_stages(self) -> None:
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        check_state_dict_fits(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def init_weights(self) -> None:
        cfg = pretrained_cfg(self.init_cfg)
        try:
            super().init_weights()
        except CheckpointMismatchError as err:
            if cfg is None:
                raise
            raise CheckpointMismatchError(
                f"init_cfg checkpoint {cfg.get('checkpoint')!r} (prefix {cfg.get('prefix')!r}): "
                f'{err}') from None
        if cfg is None:
            reset_kw_attentions(self)

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self
