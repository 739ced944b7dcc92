from .hooks import KWFinetuneHook, KWMemoryHook, KWTemperatureHook

__all__ = ['KWTemperatureHook', 'KWFinetuneHook', 'KWMemoryHook']
