from .hooks import (
    DynamicConvTemperatureHook,
    KWFinetuneHook,
    KWMemoryHook,
    KWTemperatureHook,
    set_dynamic_temperature,
)

__all__ = ['KWTemperatureHook', 'KWFinetuneHook', 'KWMemoryHook', 'DynamicConvTemperatureHook',
           'set_dynamic_temperature']
