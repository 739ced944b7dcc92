"""Argument checks and freezing shared by the KW backbones."""
from __future__ import annotations

from typing import Iterable, Sequence, Tuple

from torch import nn

from ...layers.kw_conv import _KWLayer


def check_out_indices(out_indices, num_stages: int, name: str = 'out_indices') -> Tuple[int, ...]:
    """Normalise ``out_indices`` (negative indices allowed) or raise ValueError."""
    if isinstance(out_indices, int):
        out_indices = [out_indices]
    if not isinstance(out_indices, Sequence) or not out_indices:
        raise ValueError(f'{name} must be an int or a non-empty sequence of ints, '
                         f'got {out_indices!r}')
    result = []
    for index in out_indices:
        if not isinstance(index, int) or not -num_stages <= index < num_stages:
            raise ValueError(f'{name} entries must be ints in [{-num_stages}, {num_stages - 1}] '
                             f'(the backbone has {num_stages} stages), got {index!r} in '
                             f'{tuple(out_indices)}')
        result.append(index % num_stages)
    return tuple(result)


def check_frozen_stages(frozen_stages, num_stages: int) -> int:
    if not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= num_stages:
        raise ValueError(f'frozen_stages must be an int in [-1, {num_stages}] (-1 freezes '
                         f'nothing, 0 the stem, i the stem and stages 1..i), got {frozen_stages!r}')
    return frozen_stages


def freeze_modules(modules: Iterable[nn.Module]) -> None:
    """Put ``modules`` in eval mode and stop their gradients.

    Warehouses that any KW layer inside ``modules`` draws from are frozen too,
    so the frozen layers keep exactly their kernels even when a warehouse is
    shared with a layer outside them (that layer then adapts only through its
    attention).
    """
    for module in modules:
        module.eval()
        for param in module.parameters():
            param.requires_grad = False
        for layer in module.modules():
            if isinstance(layer, _KWLayer):
                layer.kw_warehouse.cells.requires_grad = False
