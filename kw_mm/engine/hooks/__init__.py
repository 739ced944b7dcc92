from .memory_hook import KWMemoryHook
from .temperature_hook import KWFinetuneHook, KWTemperatureHook, set_runner_temperature

__all__ = ['KWTemperatureHook', 'KWFinetuneHook', 'KWMemoryHook', 'set_runner_temperature']
