"""Classification heads (need mmpretrain; skipped when it is not installed)."""
from importlib.util import find_spec

__all__ = []

if find_spec('mmpretrain') is not None:
    from .condconv_head import CondConvLinearClsHead  # noqa: F401
    from .kw_linear_head import KWLinearClsHead  # noqa: F401
    __all__ += ['KWLinearClsHead', 'CondConvLinearClsHead']
