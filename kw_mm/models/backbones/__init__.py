from .kw_convnext import KWConvNeXt
from .kw_mobilenet_v2 import KWMobileNetV2
from .kw_resnet import KWResNet

__all__ = ['KWResNet', 'KWConvNeXt', 'KWMobileNetV2']
