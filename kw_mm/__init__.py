"""kw_mm: KernelWarehouse dynamic convolution (Li & Yao, ICML 2024) for OpenMMLab.

Importing the package registers its layers, backbones and hooks in
mmengine's root registries, so ``type='KWResNet'`` etc. build from mmdet and
mmpretrain configs (``custom_imports=dict(imports=['kw_mm'])``).
"""
from . import checkpoint  # noqa: F401  (safe loading of mmengine checkpoints)
from .engine import DynamicConvTemperatureHook, KWFinetuneHook, KWTemperatureHook
from .layers import (
                     KernelWarehouse,
                     KWConv1d,
                     KWConv2d,
                     KWConv3d,
                     KWLinear,
                     KWOptions,
                     get_temperature,
                     set_temperature,
)
from .layers.dynamic import CondConv2d, DYConv2d, ODConv2d
from .models import *  # noqa: F401,F403
from .utils.config_paths import register_mim_package
from .version import __version__

register_mim_package()  # configs may inherit _base_ = 'kw_mm::<folder>/<config>.py'

__all__ = [
    '__version__', 'set_temperature', 'get_temperature', 'KernelWarehouse', 'KWConv1d',
    'KWConv2d', 'KWConv3d', 'KWLinear', 'KWOptions', 'KWTemperatureHook', 'KWFinetuneHook',
    'ODConv2d', 'CondConv2d', 'DYConv2d', 'DynamicConvTemperatureHook'
]
