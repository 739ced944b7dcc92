"""Kernel partition and warehouse planning (paper §3.2–3.3, Algorithm 1 part A).

Everything here is pure: layer shapes go in, cell shapes, mixture counts,
warehouse sizes and the β (attention initialisation) assignment come out.
Modules in :mod:`kw_mm.layers` only consume these plans, so the arithmetic
can be tested without building any network.

Terminology (paper notation in brackets):

* *cell* [kernel cell e_j]: a ``cell_out × cell_in`` matrix with a unit
  spatial extent; a warehouse holds ``n`` of them.
* *mixture* [linear mixture w_i]: one cell-sized block of a layer's static
  kernel, assembled as ``Σ_j α_ij e_j``. A layer with kernel ``f × c × k×k``
  (``c`` input channels per group) has ``m = (f/cell_out)·(c/cell_in)·k·k``.
* *zero cell* [e_z]: an extra attention column that never contributes to the
  kernel; it absorbs β for mixtures that get no cell when ``b < 1``.

With kernel partition switched off (paper §3.5, Table 5) a cell is a whole
static kernel ``f × c × k×k`` and every layer is a single mixture (m = 1):
KernelWarehouse then degenerates into vanilla dynamic convolution (DY-Conv
with n = b kernels per layer when each layer owns its warehouse).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import reduce
from typing import Optional, Sequence, Tuple

#: mixture index of the zero cell e_z in a β assignment.
ZERO_CELL = -1


@dataclass(frozen=True)
class KernelShape:
    """The static kernel of one layer that draws its kernel from a warehouse.

    Args:
        name (str): Name used in error messages (e.g. ``'layer1.0.conv2'``).
        out_channels (int): Output channels ``f``.
        in_channels (int): Input channels per group ``c / groups``.
        kernel_size (tuple[int, ...]): Spatial extent, one entry per dim.
    """
    name: str
    out_channels: int
    in_channels: int
    kernel_size: Tuple[int, ...]

    @property
    def spatial_positions(self) -> int:
        return math.prod(self.kernel_size)

    @property
    def ndim(self) -> int:
        return len(self.kernel_size)


@dataclass(frozen=True)
class LayerPlan:
    """How one layer is partitioned into mixtures over its warehouse.

    Mixture ``i = (s·out_groups + o)·in_groups + c`` covers output channels
    ``[o·cell_out, (o+1)·cell_out)``, input channels
    ``[c·cell_in, (c+1)·cell_in)`` at spatial position ``s`` (row-major in the
    kernel). ``beta[i]`` is the warehouse cell that mixture ``i`` starts from
    (or :data:`ZERO_CELL`); ``first_cell`` is the warehouse's running cell
    counter when this layer's turn came in the β walk.
    """
    kernel: KernelShape
    out_groups: int
    in_groups: int
    beta: Tuple[int, ...]
    first_cell: int
    partitioned: bool = True

    @property
    def spatial_mixtures(self) -> int:
        """Mixtures along the kernel's spatial extent (1 when cells are whole kernels)."""
        return self.kernel.spatial_positions if self.partitioned else 1

    @property
    def num_mixtures(self) -> int:
        return self.out_groups * self.in_groups * self.spatial_mixtures


@dataclass(frozen=True)
class WarehousePlan:
    """A warehouse and the layers that share it, in β-walk order."""
    cell_out: int
    cell_in: int
    ndim: int
    budget: float
    num_cells: int
    layers: Tuple[LayerPlan, ...] = field(repr=False)
    init: str = 'one_to_one'
    #: spatial extent of a cell: all ones with kernel partition, the whole
    #: kernel without it (``None`` means all ones).
    cell_kernel: Optional[Tuple[int, ...]] = None
    #: cells each mixture owns when nothing is shared (paper Table 6 "without
    #: sharing"; mixture i mixes cells [i·k, (i+1)·k) only); 0: all shared.
    private_cells: int = 0

    @property
    def partitioned(self) -> bool:
        """Whether kernels are partitioned into cells (``False``: cells are whole kernels)."""
        return self.cell_kernel is None

    @property
    def total_mixtures(self) -> int:
        return sum(layer.num_mixtures for layer in self.layers)

    @property
    def cell_shape(self) -> Tuple[int, ...]:
        """Shape of the warehouse parameter: ``[n, out, in, 1, ...]`` (or ``[n, out, in, *k]``)."""
        return (self.num_cells, self.cell_out, self.cell_in) + self.cell_spatial

    @property
    def cell_spatial(self) -> Tuple[int, ...]:
        return self.cell_kernel if self.cell_kernel is not None else (1,) * self.ndim

    def layer(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.kernel.name == name:
                return layer
        raise KeyError(f'layer {name!r} does not draw from this warehouse')

    def cell_slices(self) -> Tuple[Tuple[int, int], ...]:
        """Consecutive cell ranges each layer owns for initialisation.

        A layer owns the cells from its ``first_cell`` up to the next layer's;
        the last layer also owns any cells left over by rounding. The authors
        initialise each range with the fan-out of the layer that owns it.
        """
        starts = [layer.first_cell for layer in self.layers]
        ends = starts[1:] + [self.num_cells]
        return tuple((min(s, self.num_cells), min(max(e, s), self.num_cells))
                     for s, e in zip(starts, ends))


def check_budget(budget: float, name: str = 'budget') -> float:
    """Validate a parameter budget b and return it as a float."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f'{name} must be a positive number (e.g. 0.25, 0.5, 1, 2, 4), '
                        f'got {budget!r} of type {type(budget).__name__}')
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f'{name} must be a positive finite number (e.g. 0.25, 0.5, 1, 2, 4), '
                         f'got {budget!r}')
    return float(budget)


def default_cell_ratio(budget: float) -> float:
    """Cell channel ratio of the paper's appendix A.3: half-gcd cells for b < 1."""
    return 1.0 if budget >= 1 else 0.5


def _cell_size(gcd: int, ratio: float, what: str, kernels: Sequence[KernelShape]) -> int:
    size = gcd * ratio
    if size < 1 or abs(size - round(size)) > 1e-9:
        names = ', '.join(k.name for k in kernels)
        raise ValueError(
            f'cell_{what}_ratio={ratio!r} does not give a whole number of channels: '
            f'the gcd of the {what}put channels of the layers sharing this warehouse '
            f'({names}) is {gcd}, and {gcd} × {ratio} = {size}; choose a ratio r '
            f'with {gcd}·r a positive integer dividing {gcd}')
    size = int(round(size))
    if gcd % size:
        raise ValueError(f'cell_{what}_ratio={ratio!r} gives {size}-channel cells, which do not '
                         f'divide the {what}put-channel gcd {gcd} of layers '
                         f'{[k.name for k in kernels]}')
    return size


#: attention initialisation strategies (paper Table 13 and appendix A.2)
INIT_STRATEGIES = ('one_to_one', 'all_to_one', 'none', 'n_to_one', 'one_to_n')


def assign_beta(mixture_counts: Sequence[int], num_cells: int, budget: float,
                strategy: str = 'one_to_one') -> Tuple[Tuple[Tuple[int, ...], int], ...]:
    """One-to-one β assignment of appendix A.2 for layers sharing a warehouse.

    Layers are walked in order with a running "next cell" counter starting
    at 0. For ``b ≥ 1`` every mixture gets the next cell and the counter steps
    by ``int(b)``. For ``b < 1``, with ``r = int(1/b)``, mixture ``i`` of a
    layer gets the next cell (counter + 1) when ``i mod r == (i div r) mod r``
    and the zero cell otherwise. Once the ``n`` cells are used up, remaining
    mixtures get the zero cell (paper §3.4: "the remaining linear mixtures
    always have β = 0 once n kernel cells are used up").

    With ``strategy='one_to_n'`` (the b < 1 alternative of Figure 6(b)),
    each run of r consecutive mixtures shares the next cell instead. The
    other strategies use the one-to-one walk here and act in the attention
    (see :class:`kw_mm.layers.attention.KWAttention`).

    Returns:
        tuple: one ``(beta, first_cell)`` pair per layer.
    """
    counter = 0
    out = []
    if strategy == 'one_to_n':
        r = int(1.0 / budget)
        for m in mixture_counts:
            first = counter
            beta = []
            for i in range(m):
                cell = counter + i // r
                beta.append(cell if cell < num_cells else ZERO_CELL)
            counter += -(-m // r)
            out.append((tuple(beta), first))
    elif budget >= 1:
        step = int(budget)
        for m in mixture_counts:
            first = counter
            beta = []
            for _ in range(m):
                beta.append(counter if counter < num_cells else ZERO_CELL)
                counter += step
            out.append((tuple(beta), first))
    else:
        r = int(1.0 / budget)
        for m in mixture_counts:
            first = counter
            beta = []
            for i in range(m):
                if i % r == (i // r) % r and counter < num_cells:
                    beta.append(counter)
                    counter += 1
                else:
                    beta.append(ZERO_CELL)
            out.append((tuple(beta), first))
    return tuple(out)


def check_init_strategy(strategy: str, budget: float) -> str:
    """Validate an attention initialisation strategy for a budget."""
    if strategy not in INIT_STRATEGIES:
        raise ValueError(f'init must be one of {INIT_STRATEGIES}, got {strategy!r}')
    if strategy == 'n_to_one' and budget < 2:
        raise ValueError(f"init='n_to_one' needs a budget of at least 2 (several cells per "
                         f'mixture), got budget={budget!r}')
    if strategy == 'one_to_n' and budget >= 1:
        raise ValueError(f"init='one_to_n' needs a budget below 1 (fewer cells than "
                         f'mixtures), got budget={budget!r}')
    return strategy


def plan_warehouse(kernels: Sequence[KernelShape], budget: float,
                   cell_in_ratio: Optional[float] = None,
                   cell_out_ratio: Optional[float] = None,
                   init: str = 'one_to_one', partition: bool = True,
                   private: bool = False) -> WarehousePlan:
    """Plan the kernel partition and the warehouse for layers that share it.

    Args:
        kernels (Sequence[KernelShape]): The sharing layers in β-walk order
            (``model.modules()`` order).
        budget (float): Convolutional parameter budget b = n / m_t; the
            warehouse gets n = int(b · m_t) cells, which must be at least 1.
        cell_in_ratio (float, optional): Cell input channels as a fraction of
            the gcd of the layers' per-group input channels. Defaults to 1 for
            b ≥ 1 and 1/2 for b < 1 (paper appendix A.3).
        cell_out_ratio (float, optional): Same for output channels.
        init (str): Attention initialisation strategy, one of
            :data:`INIT_STRATEGIES`. Defaults to the paper's one-to-one.
        partition (bool): Partition kernels into cells (the paper's method).
            ``False`` makes each cell a whole kernel and each layer a single
            mixture (paper §3.5 / Table 5); the layers sharing the warehouse
            must then have equal kernel shapes, and the cell ratios must be
            left unset. Defaults to True.
        private (bool): No sharing at all (paper Table 6, "without
            sharing"): each mixture owns ``int(b)`` cells and attends only
            to them, so ``b`` must be a whole number and one layer uses the
            warehouse. Defaults to False.

    Returns:
        WarehousePlan: cell shape, n, and every layer's partition and β.
    """
    budget = check_budget(budget)
    check_init_strategy(init, budget)
    if not kernels:
        raise ValueError('a warehouse needs at least one layer')
    ndims = {k.ndim for k in kernels}
    if len(ndims) != 1:
        raise ValueError('layers sharing a warehouse must have the same number of spatial '
                         f'dims, got {[(k.name, k.kernel_size) for k in kernels]}')
    for k in kernels:
        if k.out_channels < 1 or k.in_channels < 1 or min(k.kernel_size) < 1:
            raise ValueError(f'layer {k.name}: channels and kernel size must be positive, got '
                             f'out={k.out_channels}, in={k.in_channels}, kernel={k.kernel_size}')
    if not isinstance(partition, bool):
        raise TypeError(f'kernel_partition must be True or False, got {partition!r}')
    if private:
        _check_private(kernels, budget, init)
    if not partition:
        plan = _plan_unpartitioned(kernels, budget, cell_in_ratio, cell_out_ratio, init)
        return _privatise(plan) if private else plan
    ratio = default_cell_ratio(budget)
    if cell_in_ratio is None:
        cell_in_ratio = ratio
    else:
        cell_in_ratio = check_budget(cell_in_ratio, 'cell_in_ratio')
    if cell_out_ratio is None:
        cell_out_ratio = ratio
    else:
        cell_out_ratio = check_budget(cell_out_ratio, 'cell_out_ratio')
    gcd_out = reduce(math.gcd, (k.out_channels for k in kernels))
    gcd_in = reduce(math.gcd, (k.in_channels for k in kernels))
    cell_out = _cell_size(gcd_out, cell_out_ratio, 'out', kernels)
    cell_in = _cell_size(gcd_in, cell_in_ratio, 'in', kernels)
    counts = [(k.out_channels // cell_out) * (k.in_channels // cell_in) * k.spatial_positions
              for k in kernels]
    total = sum(counts)
    num_cells = int(budget * total)
    if num_cells < 1:
        names = ', '.join(k.name for k in kernels)
        raise ValueError(
            f'budget={budget!r} gives zero cells for the warehouse of {names}: n = int(b · m_t) '
            f'with m_t = {total} mixtures; the budget must be at least 1/{total} '
            f'(= {1 / total:.4g}) for these layers')
    betas = assign_beta(counts, num_cells, budget, init)
    layers = tuple(
        LayerPlan(kernel=k, out_groups=k.out_channels // cell_out,
                  in_groups=k.in_channels // cell_in, beta=beta, first_cell=first)
        for k, (beta, first) in zip(kernels, betas))
    plan = WarehousePlan(cell_out=cell_out, cell_in=cell_in, ndim=ndims.pop(),
                         budget=budget, num_cells=num_cells, layers=layers, init=init)
    return _privatise(plan) if private else plan


def _check_private(kernels: Sequence[KernelShape], budget: float, init: str) -> None:
    if len(kernels) != 1:
        raise ValueError('a warehouse without sharing serves one layer, got '
                         f'{[k.name for k in kernels]}')
    if budget < 1 or budget != int(budget):
        raise ValueError(f"sharing='none' gives each mixture int(b) cells of its own, so the "
                         f'budget must be a whole number ≥ 1, got budget={budget!r}')
    if init not in ('one_to_one', 'all_to_one', 'none', 'n_to_one'):
        raise ValueError(f"init={init!r} cannot be used with sharing='none'")


def _privatise(plan: WarehousePlan) -> WarehousePlan:
    """Give every mixture of the (single) layer its own int(b) cells.

    β then indexes the mixture's own cells: the first of them (one-to-one),
    or all of them (n-to-one / all-to-one, set by the attention).
    """
    per_mixture = int(plan.budget)
    (layer,) = plan.layers
    layer = LayerPlan(kernel=layer.kernel, out_groups=layer.out_groups,
                      in_groups=layer.in_groups, beta=(0,) * layer.num_mixtures, first_cell=0,
                      partitioned=layer.partitioned)
    return WarehousePlan(cell_out=plan.cell_out, cell_in=plan.cell_in, ndim=plan.ndim,
                         budget=plan.budget, num_cells=per_mixture * layer.num_mixtures,
                         layers=(layer,), init=plan.init, cell_kernel=plan.cell_kernel,
                         private_cells=per_mixture)


def _plan_unpartitioned(kernels: Sequence[KernelShape], budget: float,
                        cell_in_ratio: Optional[float], cell_out_ratio: Optional[float],
                        init: str) -> WarehousePlan:
    """Warehouse of whole kernels: m = 1 per layer, n = int(b · l) for l layers."""
    for label, ratio in (('cell_in_ratio', cell_in_ratio), ('cell_out_ratio', cell_out_ratio)):
        if ratio is not None:
            raise ValueError(f'{label}={ratio!r} has no meaning with kernel_partition=False '
                             '(a cell is a whole kernel); leave it unset')
    shapes = {(k.out_channels, k.in_channels, k.kernel_size) for k in kernels}
    if len(shapes) != 1:
        found = ', '.join(f'{k.name}: {k.out_channels}x{k.in_channels}x'
                          f"{'x'.join(map(str, k.kernel_size))}" for k in kernels)
        raise ValueError(
            'kernel_partition=False needs the layers sharing a warehouse to have equal kernel '
            f'shapes (a cell is a whole kernel), got {found}; share only same-shaped kernels '
            "(kw_cfg share_across_shapes=False) or none (kw_cfg sharing='none')")
    out_channels, in_channels, kernel_size = shapes.pop()
    num_cells = int(budget * len(kernels))
    if num_cells < 1:
        raise ValueError(
            f'budget={budget!r} gives zero cells for the warehouse of '
            f"{', '.join(k.name for k in kernels)}: without kernel partition n = int(b · l) "
            f'for l = {len(kernels)} layers; the budget must be at least 1/{len(kernels)}')
    betas = assign_beta([1] * len(kernels), num_cells, budget, init)
    layers = tuple(
        LayerPlan(kernel=k, out_groups=1, in_groups=1, beta=beta, first_cell=first,
                  partitioned=False)
        for k, (beta, first) in zip(kernels, betas))
    return WarehousePlan(cell_out=out_channels, cell_in=in_channels, ndim=len(kernel_size),
                         budget=budget, num_cells=num_cells, layers=layers, init=init,
                         cell_kernel=kernel_size)
