"""Compatibility module: atomic writes now live in :mod:`kw_mm.checkpoint.io`."""
from ..checkpoint.io import AtomicLocalBackend, write_atomically  # noqa: F401

__all__ = ['AtomicLocalBackend', 'write_atomically']
