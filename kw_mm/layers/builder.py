"""Build a backbone's warehouses from data that says which layers share them.

A backbone first lists its KW layers as :class:`LayerSpec` records (name,
shape, sharing key) in ``model.modules()`` order, then asks a
:class:`WarehouseBuilder` for each layer by name while it constructs itself.
No name parsing and no walking of a half-built network: sharing is the
``warehouse`` key of each spec.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Tuple

from torch import nn

from .kw_conv import KWConv1d, KWConv2d, KWConv3d, KWLinear
from .partition import KernelShape, WarehousePlan, check_budget, plan_warehouse
from .warehouse import KernelWarehouse

#: options a ``kw_cfg`` dict may hold, with their defaults.
KW_CFG_DEFAULTS: Dict[str, Any] = dict(
    budget=1.0,
    reduction=1 / 16,
    min_hidden=16,
    cell_in_ratio=None,
    cell_out_ratio=None,
    norm='BN',
    nonlocal_basis_ratio=0.0,
    temperature=1.0,
    attention_fn='caf',
    init='one_to_one',
    sharing='stage',
    share_across_shapes=True,
    kernel_partition=True,
    recompute_kernels=True,
    inference_basis=True,
)

#: warehouse sharing ranges (paper Table 6). 'stage': the backbone's layout
#: (same-stage layers share); 'block': the layers of one residual /
#: inverted-residual block (the authors' code's per-block keys); 'layer': each
#: layer owns a warehouse ("within each layer"); 'none': each linear mixture
#: owns int(b) cells ("without sharing").
SHARING_RANGES = ('stage', 'block', 'layer', 'none')

#: options that may differ per warehouse (``kw_cfg['warehouses'][key]``).
PER_WAREHOUSE_KEYS = ('budget', 'cell_in_ratio', 'cell_out_ratio')

_CONV_CLASSES = {1: KWConv1d, 2: KWConv2d, 3: KWConv3d}
_PLAIN_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def parse_kw_cfg(kw_cfg: Optional[Mapping[str, Any]], extra_keys: Iterable[str] = ()
                 ) -> Optional[Dict[str, Any]]:
    """Validate a ``kw_cfg`` and fill in defaults; ``None`` stays ``None``.

    Raises:
        ValueError: for unknown keys (a typo must not be silently ignored) or
            an invalid budget.
    """
    if kw_cfg is None:
        return None
    if not isinstance(kw_cfg, Mapping):
        raise TypeError(f'kw_cfg must be a dict or None, got {type(kw_cfg).__name__}')
    allowed = set(KW_CFG_DEFAULTS) | set(extra_keys)
    unknown = sorted(set(kw_cfg) - allowed)
    if unknown:
        raise ValueError(f'kw_cfg has unknown key(s) {unknown}; allowed keys are {sorted(allowed)}')
    cfg = dict(KW_CFG_DEFAULTS)
    cfg.update(kw_cfg)
    cfg['budget'] = check_budget(cfg['budget'], 'kw_cfg.budget')
    if cfg['norm'] not in ('BN', 'LN'):
        raise ValueError(f"kw_cfg.norm must be 'BN' or 'LN', got {cfg['norm']!r}")
    ratio = cfg['nonlocal_basis_ratio']
    if not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f'kw_cfg.nonlocal_basis_ratio must be in [0, 1), got {ratio!r}')
    if ratio > 0 and cfg['budget'] >= 1:
        raise ValueError(f'kw_cfg.nonlocal_basis_ratio={ratio!r} needs a budget below 1 (its '
                         f"layers own int(b·m) local cells), got budget={cfg['budget']!r}")
    from .attention import ATTENTION_FUNCTIONS
    if cfg['attention_fn'] not in ATTENTION_FUNCTIONS:
        raise ValueError(f"kw_cfg.attention_fn must be one of {ATTENTION_FUNCTIONS}, "
                         f"got {cfg['attention_fn']!r}")
    from .partition import INIT_STRATEGIES
    if cfg['init'] not in INIT_STRATEGIES:
        raise ValueError(f"kw_cfg.init must be one of {INIT_STRATEGIES}, got {cfg['init']!r}")
    temperature = cfg['temperature']
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 1:
        raise ValueError(f'kw_cfg.temperature must be in [0, 1], got {temperature!r}')
    if cfg['sharing'] not in SHARING_RANGES:
        raise ValueError(f"kw_cfg.sharing must be one of {SHARING_RANGES}, got {cfg['sharing']!r}")
    for key in ('share_across_shapes', 'kernel_partition', 'recompute_kernels',
                'inference_basis'):
        if not isinstance(cfg[key], bool):
            raise ValueError(f'kw_cfg.{key} must be True or False, got {cfg[key]!r}')
    if not cfg['kernel_partition'] and ratio > 0:
        raise ValueError(f'kw_cfg.nonlocal_basis_ratio={ratio!r} needs kernel_partition=True')
    return cfg


@dataclass(frozen=True)
class LayerSpec:
    """One KW layer of a backbone, as data.

    Args:
        name (str): Module path inside the backbone (``'layer2.0.conv1'``).
        out_channels (int): Output channels.
        in_channels (int): Input channels per group.
        kernel_size (tuple[int, ...]): Kernel extent (``(1,)`` for linear).
        warehouse (Hashable): Sharing key; layers with equal keys share.
        block (str, optional): The residual or inverted-residual block the
            layer belongs to, used by ``kw_cfg.sharing='block'``. Defaults to
            the layer itself.
    """
    name: str
    out_channels: int
    in_channels: int
    kernel_size: Tuple[int, ...]
    warehouse: Hashable
    block: Optional[str] = None

    @property
    def kernel(self) -> KernelShape:
        return KernelShape(self.name, self.out_channels, self.in_channels, self.kernel_size)


def sharing_key(spec: LayerSpec, sharing: str, share_across_shapes: bool) -> Hashable:
    """The warehouse a layer draws from under a sharing range (paper Tables 6 and 7).

    The layout's own key (``'stage'``) is kept as is, so released layouts and
    their per-warehouse overrides are untouched; narrower ranges split it.
    """
    key: Hashable = spec.warehouse
    if sharing == 'block':
        key = (spec.warehouse, spec.block or spec.name)
    elif sharing in ('layer', 'none'):
        key = (spec.warehouse, spec.name)
    if not share_across_shapes:
        key = (key, (spec.out_channels, spec.in_channels) + tuple(spec.kernel_size))
    return key


class WarehouseBuilder:
    """Plans the warehouses for a list of layer specs and builds the layers.

    Args:
        specs (Sequence[LayerSpec]): Every KW layer, in ``modules()`` order.
        kw_cfg (dict): A parsed ``kw_cfg`` (see :func:`parse_kw_cfg`).
        warehouse_order (Sequence[Hashable], optional): Order in which the
            warehouses are numbered; defaults to first appearance in ``specs``.
        per_warehouse (dict, optional): Budget / cell-ratio overrides per key.
    """

    def __init__(self, specs: Sequence[LayerSpec], kw_cfg: Mapping[str, Any],
                 warehouse_order: Optional[Sequence[Hashable]] = None,
                 per_warehouse: Optional[Mapping[Hashable, Mapping[str, Any]]] = None) -> None:
        self.kw_cfg = dict(kw_cfg)
        self.specs = {spec.name: spec for spec in specs}
        if len(self.specs) != len(specs):
            raise ValueError('layer names in a backbone layout must be unique')
        sharing = self.kw_cfg.get('sharing', 'stage')
        across_shapes = self.kw_cfg.get('share_across_shapes', True)
        groups: Dict[Hashable, List[LayerSpec]] = {}
        layout_key: Dict[Hashable, Hashable] = {}
        self._key_of: Dict[str, Hashable] = {}
        for spec in specs:
            key = sharing_key(spec, sharing, across_shapes)
            groups.setdefault(key, []).append(spec)
            layout_key[key] = spec.warehouse
            self._key_of[spec.name] = key
        layout_keys = list(dict.fromkeys(spec.warehouse for spec in specs))
        layout_order = list(warehouse_order) if warehouse_order is not None else layout_keys
        if sorted(map(repr, layout_order)) != sorted(map(repr, layout_keys)):
            raise ValueError(f'warehouse_order {layout_order} does not list the warehouses '
                             f'{layout_keys}')
        # Narrower sharing splits a layout warehouse in place: the pieces keep
        # its position in warehouse_order, in order of first appearance.
        rank = {repr(key): i for i, key in enumerate(layout_order)}
        order = sorted(groups, key=lambda k: rank[repr(layout_key[k])])
        per_warehouse = per_warehouse or {}
        self.keys = order
        self.plans: Dict[Hashable, WarehousePlan] = {}
        for key in order:
            options = {k: self.kw_cfg[k] for k in PER_WAREHOUSE_KEYS}
            options.update(per_warehouse.get(layout_key[key], {}))
            self.plans[key] = plan_warehouse([s.kernel for s in groups[key]], options['budget'],
                                             options['cell_in_ratio'], options['cell_out_ratio'],
                                             self.kw_cfg.get('init', 'one_to_one'),
                                             self.kw_cfg.get('kernel_partition', True),
                                             private=sharing == 'none')
        self.warehouses = nn.ModuleList(KernelWarehouse(self.plans[key]) for key in order)
        self._by_key = dict(zip(order, self.warehouses))
        self._built: set = set()

    def _kw_options(self) -> Dict[str, Any]:
        return {k: self.kw_cfg[k] for k in ('reduction', 'min_hidden', 'norm',
                                            'nonlocal_basis_ratio', 'temperature',
                                            'attention_fn', 'recompute_kernels')}

    def _spec(self, name: str) -> Optional[LayerSpec]:
        spec = self.specs.get(name)
        if spec is not None:
            if name in self._built:
                raise ValueError(f'layer {name!r} was built twice')
            self._built.add(name)
        return spec

    def conv(self, name: str, in_channels: int, out_channels: int, kernel_size, stride=1,
             padding=0, dilation=1, groups: int = 1, bias: bool = False, ndim: int = 2) -> nn.Module:
        """A KW convolution when ``name`` is a KW layer, a plain one otherwise."""
        spec = self._spec(name)
        if spec is None:
            return _PLAIN_CONVS[ndim](in_channels, out_channels, kernel_size, stride=stride,
                                      padding=padding, dilation=dilation, groups=groups, bias=bias)
        return _CONV_CLASSES[ndim](in_channels, out_channels, kernel_size, stride=stride,
                                   padding=padding, dilation=dilation, groups=groups, bias=bias,
                                   warehouse=self._by_key[self._key_of[name]], name=name,
                                   inference_basis=self.kw_cfg['inference_basis'],
                                   **self._kw_options())

    def linear(self, name: str, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        """A KW linear layer when ``name`` is a KW layer, ``nn.Linear`` otherwise."""
        spec = self._spec(name)
        if spec is None:
            return nn.Linear(in_features, out_features, bias=bias)
        return KWLinear(in_features, out_features, bias=bias,
                        warehouse=self._by_key[self._key_of[name]], name=name,
                        **self._kw_options())

    def check_complete(self) -> None:
        """Raise when a planned layer was never built (a layout bug)."""
        missing = [name for name in self.specs if name not in self._built]
        if missing:
            raise RuntimeError(f'planned KW layers were not built: {missing}')
