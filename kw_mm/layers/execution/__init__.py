"""How a KW convolution runs: its geometry, one dispatcher and one module per
execution path (see :mod:`.dispatch`)."""
from .dispatch import conv_forward
from .export import batch_agnostic_conv, export_mode, is_exporting
from .geometry import ConvGeometry, conv_geometry

__all__ = ['conv_forward', 'batch_agnostic_conv', 'export_mode', 'is_exporting', 'ConvGeometry',
           'conv_geometry']
