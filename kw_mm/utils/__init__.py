from .allocator import tune_cpu_allocator
from .atomic_backend import AtomicLocalBackend
from .data_check import check_dataset_paths

__all__ = ['AtomicLocalBackend', 'check_dataset_paths', 'tune_cpu_allocator']
