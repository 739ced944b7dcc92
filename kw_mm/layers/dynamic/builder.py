"""A backbone's ``dynamic_cfg``: which dynamic convolution, with which options,
built for which layers (the backbone's layout for the method)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Mapping, Optional, Type

from torch import nn

from .base import DynamicConv2d
from .condconv import CondConv2d
from .dyconv import DYConv2d
from .odconv import ODConv2d

#: ``dynamic_cfg['type']`` → layer class.
DYNAMIC_CONVS: Dict[str, Type[DynamicConv2d]] = {
    'ODConv': ODConv2d, 'CondConv': CondConv2d, 'DYConv': DYConv2d}


@dataclass(frozen=True)
class DynamicConvConfig:
    """A checked ``dynamic_cfg``.

    Args:
        method (str): One of :data:`DYNAMIC_CONVS` (``'ODConv'``).
        options (dict): The layer options, checked (``kernel_num``, ...).
    """
    method: str
    options: Dict[str, Any] = field(default_factory=dict)

    @property
    def layer_class(self) -> Type[DynamicConv2d]:
        return DYNAMIC_CONVS[self.method]

    def as_dict(self) -> Dict[str, Any]:
        """The ``dynamic_cfg`` dict (``type`` and the options given)."""
        return dict(type=self.method, **self.options)


def parse_dynamic_cfg(dynamic_cfg: Optional[Mapping[str, Any]]) -> Optional[DynamicConvConfig]:
    """A backbone's ``dynamic_cfg`` checked; None stays None.

    Raises:
        TypeError: ``dynamic_cfg`` is not a dict.
        ValueError: a missing or unknown ``type``, an unknown option of the
            method or a bad value, each named (``dynamic_cfg.kernel_num``).
    """
    if dynamic_cfg is None:
        return None
    if not isinstance(dynamic_cfg, Mapping):
        raise TypeError(f'dynamic_cfg must be a dict or None, got {type(dynamic_cfg).__name__}')
    options = dict(dynamic_cfg)
    method = options.pop('type', None)
    if method not in DYNAMIC_CONVS:
        raise ValueError(f'dynamic_cfg.type must be one of {sorted(DYNAMIC_CONVS)}, got '
                         f'{method!r}')
    options = DYNAMIC_CONVS[method].check_options(options, 'dynamic_cfg.')
    return DynamicConvConfig(method, options)


class DynamicConvBuilder:
    """Builds a backbone's convolutions: the method's layer for the names of
    its layout, ``nn.Conv2d`` for every other one (the counterpart of
    :class:`~kw_mm.layers.builder.WarehouseBuilder` for ``dynamic_cfg``).

    Args:
        names (Iterable[str]): The layers (module paths) that are dynamic.
        config (DynamicConvConfig): The method and its options.
        blocks (dict, optional): Layer name → its block, for methods whose
            layers of one block share their attention (CondConv's routing,
            computed from the block's input by the block's first layer built,
            which must also be the first to run). Defaults to every layer
            its own.
    """

    def __init__(self, names: Iterable[str], config: DynamicConvConfig,
                 blocks: Optional[Mapping[str, str]] = None) -> None:
        self.names = list(names)
        if len(set(self.names)) != len(self.names):
            raise ValueError('layer names in a backbone layout must be unique')
        self.config = config
        self.blocks = dict(blocks or {})
        self._built: set = set()
        self._first_of_block: Dict[str, DynamicConv2d] = {}

    def conv(self, name: str, in_channels: int, out_channels: int, kernel_size, stride=1,
             padding=0, dilation=1, groups: int = 1, bias: bool = False,
             ndim: int = 2) -> nn.Module:
        """A dynamic convolution when ``name`` is in the layout, a plain one otherwise."""
        if name not in self.names:
            plain = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[ndim]
            return plain(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias)
        if ndim != 2:
            raise ValueError(f'{self.config.method} layers are 2-d; layer {name!r} is {ndim}-d')
        if name in self._built:
            raise ValueError(f'layer {name!r} was built twice')
        self._built.add(name)
        cls = self.config.layer_class
        extra = {}
        block = self.blocks.get(name)
        if cls.shares_attention and block is not None and block in self._first_of_block:
            extra['shared_attention'] = self._first_of_block[block].attention
        layer = cls(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                    dilation=dilation, groups=groups, bias=bias, **self.config.options, **extra)
        if block is not None:
            self._first_of_block.setdefault(block, layer)
        return layer

    def check_complete(self) -> None:
        """Raise when a layer of the layout was never built (a layout bug)."""
        missing = [name for name in self.names if name not in self._built]
        if missing:
            raise RuntimeError(f'planned {self.config.method} layers were not built: {missing}')
