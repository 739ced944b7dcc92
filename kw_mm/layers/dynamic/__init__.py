"""The dynamic convolutions the paper compares KernelWarehouse with (ODConv,
CondConv, DY-Conv), selectable in the KW backbones by ``dynamic_cfg``."""
from .base import DynamicConv2d
from .builder import DYNAMIC_CONVS, DynamicConvBuilder, DynamicConvConfig, parse_dynamic_cfg
from .condconv import CondConv2d
from .dyconv import DYConv2d
from .odconv import ODConv2d

__all__ = ['DynamicConv2d', 'ODConv2d', 'CondConv2d', 'DYConv2d', 'DYNAMIC_CONVS',
           'DynamicConvBuilder', 'DynamicConvConfig', 'parse_dynamic_cfg']
