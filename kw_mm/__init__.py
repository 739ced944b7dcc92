"""kw_mm: KernelWarehouse dynamic convolution (Li & Yao, ICML 2024) for OpenMMLab.

Importing the package registers its layers, backbones and hooks in
mmengine's root registries, so ``type='KWResNet'`` etc. build from mmdet and
mmpretrain configs (``custom_imports=dict(imports=['kw_mm'])``), lets configs
inherit kw_mm's (``_base_ = 'kw_mm::kw_resnet/...'``) and registers kw_mm's
model index with mmpretrain, so ``mmpretrain.get_model('kw1x-resnet18_8xb32_in1k')``
and ``mmpretrain.list_models('*kw*')`` know its configs by name.
"""
import warnings

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
from .utils.config_paths import find_config, register_mim_package
from .utils.model_zoo import register_model_index
from .version import __version__

register_mim_package()  # configs may inherit _base_ = 'kw_mm::<folder>/<config>.py'
try:  # mmpretrain.get_model / list_models / inferencers know kw_mm's configs by name
    register_model_index()
except (ValueError, FileNotFoundError) as error:  # the layers and configs work without it
    warnings.warn(f'kw_mm configs are not registered with mmpretrain by name: {error}',
                  stacklevel=2)

__all__ = [
    '__version__', 'set_temperature', 'get_temperature', 'KernelWarehouse', 'KWConv1d',
    'KWConv2d', 'KWConv3d', 'KWLinear', 'KWOptions', 'KWTemperatureHook', 'KWFinetuneHook',
    'find_config', 'ODConv2d', 'CondConv2d', 'DYConv2d', 'DynamicConvTemperatureHook'
]
