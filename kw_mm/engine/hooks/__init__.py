from .temperature_hook import KWFinetuneHook, KWTemperatureHook, set_runner_temperature

__all__ = ['KWTemperatureHook', 'KWFinetuneHook', 'set_runner_temperature']
