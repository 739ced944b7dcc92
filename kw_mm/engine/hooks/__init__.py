from .memory_hook import KWMemoryHook
from .temperature_hook import (
    DynamicConvTemperatureHook,
    KWFinetuneHook,
    KWTemperatureHook,
    set_dynamic_temperature,
    set_runner_temperature,
)

__all__ = ['KWTemperatureHook', 'KWFinetuneHook', 'KWMemoryHook', 'DynamicConvTemperatureHook',
           'set_runner_temperature', 'set_dynamic_temperature']
