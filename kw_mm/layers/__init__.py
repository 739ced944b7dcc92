from .attention import KWAttention, caf, get_temperature, set_temperature
from .builder import LayerSpec, WarehouseBuilder, parse_kw_cfg
from .kw_conv import KWConv1d, KWConv2d, KWConv3d, KWLayer, KWLinear
from .options import KWOptions
from .partition import KernelShape, LayerPlan, WarehousePlan, assign_beta, plan_warehouse
from .warehouse import KernelWarehouse

__all__ = [
    'KWAttention', 'caf', 'set_temperature', 'get_temperature', 'LayerSpec', 'WarehouseBuilder',
    'parse_kw_cfg', 'KWConv1d', 'KWConv2d', 'KWConv3d', 'KWLayer', 'KWLinear', 'KWOptions',
    'KernelShape', 'LayerPlan', 'WarehousePlan', 'assign_beta', 'plan_warehouse',
    'KernelWarehouse'
]
