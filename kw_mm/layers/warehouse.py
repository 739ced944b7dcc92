"""The kernel warehouse: the cells that a group of layers mixes their kernels from."""
from __future__ import annotations

import math

import torch
from torch import nn

from .partition import WarehousePlan


class KernelWarehouse(nn.Module):
    """Owns the ``n`` cells of one warehouse as a single parameter.

    The parameter ``cells`` has the layout of the authors' released models,
    ``[n, cell_out, cell_in, 1, ...]``, so their checkpoints load by name.

    Args:
        plan (WarehousePlan): Cell shape, cell count and the sharing layers.
    """

    def __init__(self, plan: WarehousePlan) -> None:
        super().__init__()
        self.plan = plan
        self.cells = nn.Parameter(torch.empty(plan.cell_shape))
        self.reset_parameters()

    @property
    def num_cells(self) -> int:
        return self.plan.num_cells

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan-out) initialisation over each layer's own cells.

        As in the authors' code, each layer's range of cells is initialised as
        if it were a convolution weight of shape ``[cells · cell_out,
        cell_in, *cell_kernel]``: ``std = sqrt(2 / (cells · cell_out · |cell_kernel|))``
        (whole-kernel cells, kernel partition off, count their spatial extent too).
        """
        with torch.no_grad():
            for start, end in self.plan.cell_slices():
                if end <= start:
                    continue
                fan_out = (end - start) * self.plan.cell_out * math.prod(self.plan.cell_spatial)
                self.cells[start:end].normal_(0.0, math.sqrt(2.0 / fan_out))

    def extra_repr(self) -> str:
        p = self.plan
        shape = (p.cell_out, p.cell_in) + (() if p.partitioned else p.cell_kernel)
        cell = 'x'.join(map(str, shape))
        return (f'cells={p.num_cells}, cell={cell}, budget={p.budget:g}, '
                f'layers={len(p.layers)}, mixtures={p.total_mixtures}')
