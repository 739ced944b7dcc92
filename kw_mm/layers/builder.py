"""Build a backbone's warehouses from data that says which layers share them.

A backbone first lists its KW layers as :class:`LayerSpec` records (name,
shape, sharing key) in ``model.modules()`` order, then asks a
:class:`WarehouseBuilder` for each layer by name while it constructs itself.
No name parsing and no walking of a half-built network: sharing is the
``warehouse`` key of each spec.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from torch import nn

from .kw_conv import KWConv1d, KWConv2d, KWConv3d, KWLinear
from .options import PER_WAREHOUSE_KEYS, SHARING_RANGES, KWOptions  # noqa: F401
from .partition import KernelShape, WarehousePlan, plan_warehouse
from .warehouse import KernelWarehouse

_CONV_CLASSES = {1: KWConv1d, 2: KWConv2d, 3: KWConv3d}
_PLAIN_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def parse_kw_cfg(kw_cfg: Optional[Mapping[str, Any]], extra_keys: Iterable[str] = ()
                 ) -> Optional[Dict[str, Any]]:
    """A ``kw_cfg`` checked and completed with the defaults, as a dict; None stays None.

    The dict form of :meth:`KWOptions.from_kw_cfg`, for code that reads a
    ``kw_cfg`` by key.
    """
    options = KWOptions.from_kw_cfg(kw_cfg, extra_keys)
    return None if options is None else options.as_dict()


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
        options (KWOptions | dict | None): The KW options (a dict is read
            as a ``kw_cfg``); ``sharing``, ``share_across_shapes`` and the
            options planning each warehouse apply here, and every layer gets
            the object. None (a backbone without ``kw_cfg``): no warehouses,
            every layer plain.
        warehouse_order (Sequence[Hashable], optional): Order in which the
            warehouses are numbered; defaults to first appearance in ``specs``.
        per_warehouse (dict, optional): Budget / cell-ratio overrides per key.
    """

    def __init__(self, specs: Sequence[LayerSpec],
                 options: Union[KWOptions, Mapping[str, Any], None],
                 warehouse_order: Optional[Sequence[Hashable]] = None,
                 per_warehouse: Optional[Mapping[Hashable, Mapping[str, Any]]] = None) -> None:
        if not isinstance(options, KWOptions):
            options = KWOptions.from_kw_cfg(options)
        if options is None:
            specs, options, warehouse_order, per_warehouse = [], KWOptions(), None, None
        self.options: KWOptions = options
        self.specs = {spec.name: spec for spec in specs}
        if len(self.specs) != len(specs):
            raise ValueError('layer names in a backbone layout must be unique')
        sharing = options.sharing
        across_shapes = options.share_across_shapes
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
            values = {k: getattr(options, k) for k in PER_WAREHOUSE_KEYS}
            values.update(per_warehouse.get(layout_key[key], {}))
            self.plans[key] = plan_warehouse([s.kernel for s in groups[key]], values['budget'],
                                             values['cell_in_ratio'], values['cell_out_ratio'],
                                             options.init, options.kernel_partition,
                                             private=sharing == 'none')
        self.warehouses = nn.ModuleList(KernelWarehouse(self.plans[key]) for key in order)
        self._by_key = dict(zip(order, self.warehouses))
        self._built: set = set()

    def _spec(self, name: str) -> Optional[LayerSpec]:
        spec = self.specs.get(name)
        if spec is not None:
            if name in self._built:
                raise ValueError(f'layer {name!r} was built twice')
            self._built.add(name)
        return spec

    def conv(self, name: str, in_channels: int, out_channels: int, kernel_size, stride=1,
             padding=0, dilation=1, groups: int = 1, bias: bool = False,
             ndim: int = 2) -> nn.Module:
        """A KW convolution when ``name`` is a KW layer, a plain one otherwise."""
        spec = self._spec(name)
        if spec is None:
            return _PLAIN_CONVS[ndim](in_channels, out_channels, kernel_size, stride=stride,
                                      padding=padding, dilation=dilation, groups=groups, bias=bias)
        return _CONV_CLASSES[ndim](in_channels, out_channels, kernel_size, stride=stride,
                                   padding=padding, dilation=dilation, groups=groups, bias=bias,
                                   options=self.options,
                                   warehouse=self._by_key[self._key_of[name]], name=name)

    def linear(self, name: str, in_features: int, out_features: int,
               bias: bool = True) -> nn.Module:
        """A KW linear layer when ``name`` is a KW layer, ``nn.Linear`` otherwise."""
        spec = self._spec(name)
        if spec is None:
            return nn.Linear(in_features, out_features, bias=bias)
        return KWLinear(in_features, out_features, bias=bias, options=self.options,
                        warehouse=self._by_key[self._key_of[name]], name=name)

    def check_complete(self) -> None:
        """Raise when a planned layer was never built (a layout bug)."""
        missing = [name for name in self.specs if name not in self._built]
        if missing:
            raise RuntimeError(f'planned KW layers were not built: {missing}')
