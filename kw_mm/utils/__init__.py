from .allocator import tune_cpu_allocator
from .data_check import check_dataset_paths

__all__ = ['check_dataset_paths', 'tune_cpu_allocator']
