from .kw_resnet import KWResNet

__all__ = ['KWResNet']
