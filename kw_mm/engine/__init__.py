from .hooks import KWFinetuneHook, KWTemperatureHook

__all__ = ['KWTemperatureHook', 'KWFinetuneHook']
