"""Mean attention maps of KW layers, per warehouse (paper Figure 3, appendix A.5).

Every KW layer's attention module returns, per sample, the attentions
``α [m, n]`` of its ``m`` linear mixtures over the ``n`` cells of the
warehouse it draws from (the zero cell dropped). This module runs a model in
eval mode over batches, averages α over all samples with forward hooks on the
attention modules (float64 running sums; no batch is kept), and draws one
heatmap per warehouse: the rows are the linear mixtures of all layers sharing
the warehouse, stacked in the order of the warehouse plan (the β walk), the
columns are its cells. CAF attentions are signed, so the colour map diverges
around 0.

    maps = collect_attention_maps(model, batches)   # batches: iterable of model inputs
    render_attention_maps(maps, 'attention.png')
    save_attention_arrays(maps, 'attention.npz')

Warehouses are numbered in ``model.modules()`` order, which for a backbone is
the order of ``backbone.warehouses``; a layer with a private warehouse (for
example the KW classifier of :class:`kw_mm.models.heads.KWLinearClsHead`)
contributes a warehouse of its own at its place in that order. In a warehouse
without sharing (each mixture attends only to its own ``k`` cells) the rows
are spread over the warehouse's columns, with 0 for the cells a mixture
cannot use.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..checkpoint.io import write_atomically
from ..layers.attention import KWAttention
from ..layers.partition import ZERO_CELL
from ..layers.warehouse import KernelWarehouse

#: size of one warehouse's panel in the figure, in inches (width, height).
PANEL_SIZE = (7.0, 5.0)
#: panels per figure row (fewer when there are fewer warehouses).
PANELS_PER_ROW = 2
#: the diverging colour map (blue negative, white 0, red positive).
COLOUR_MAP = 'RdBu_r'


class NoKWLayersError(ValueError):
    """Raised for a model that contains no KernelWarehouse layer."""


@dataclass
class WarehouseAttention:
    """Mean attentions of the layers that share one warehouse.

    Attributes:
        index (int): Position of the warehouse in ``model.modules()`` order
            (for a backbone, its index in ``backbone.warehouses``).
        num_cells (int): Cells ``n`` of the warehouse (the columns).
        layer_names (list[str]): Module paths of the sharing layers, in the
            warehouse plan's (β-walk) order.
        layer_mixtures (list[int]): Linear mixtures of each layer (its rows).
        mean (np.ndarray): float64 ``[Σ mixtures, n]``, the mean of α over
            all samples, layers stacked in ``layer_names`` order.
        beta (np.ndarray): float64 ``[Σ mixtures, n]``, each attention's
            initialisation β (zero cell dropped).
        beta_cell (np.ndarray): int64 ``[Σ mixtures]``, the cell that each
            mixture starts from in the plan, or -1 for the zero cell.
        num_samples (int): Samples averaged over.
    """
    index: int
    num_cells: int
    layer_names: List[str]
    layer_mixtures: List[int]
    mean: np.ndarray
    beta: np.ndarray
    beta_cell: np.ndarray
    num_samples: int

    @property
    def layer_boundaries(self) -> List[int]:
        """Row index where each layer starts, plus the total row count."""
        return [0] + np.cumsum(self.layer_mixtures).tolist()


def is_kw_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a KW layer (a KWConv*d, a KWLinear or alike)."""
    return isinstance(getattr(module, 'attention', None), KWAttention) and isinstance(
        getattr(module, 'kw_warehouse', None), KernelWarehouse)


def find_kw_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(module path, layer)`` of every KW layer in ``model``, in ``modules()`` order.

    Raises:
        NoKWLayersError: when ``model`` has none.
    """
    layers = [(name, module) for name, module in model.named_modules() if is_kw_layer(module)]
    if not layers:
        raise NoKWLayersError(
            f'model {type(model).__name__} contains no KernelWarehouse layer (KWConv1d/2d/3d, '
            'KWLinear), so it has no attention maps; build it with a kw_cfg (e.g. '
            "backbone kw_cfg=dict(budget=1)) or a KW head")
    return layers


def _group_by_warehouse(model: nn.Module, layers: Sequence[Tuple[str, nn.Module]]
                        ) -> List[Tuple[KernelWarehouse, List[Tuple[str, nn.Module]]]]:
    """Layers grouped by the warehouse they draw from (identity), warehouses in
    ``model.modules()`` order, layers in the order of the warehouse plan."""
    groups: Dict[int, Tuple[KernelWarehouse, List[Tuple[str, nn.Module]]]] = {}
    for name, layer in layers:
        warehouse = layer.kw_warehouse
        groups.setdefault(id(warehouse), (warehouse, []))[1].append((name, layer))
    order = {id(m): i for i, m in enumerate(model.modules()) if isinstance(m, KernelWarehouse)}
    # a warehouse held outside ``model`` (not possible for kw_mm backbones) goes last
    ranked = sorted(groups.values(), key=lambda g: order.get(id(g[0]), len(order)))
    result = []
    for warehouse, members in ranked:
        plan_order = {lp.kernel.name: i for i, lp in enumerate(warehouse.plan.layers)}
        members.sort(key=lambda item: plan_order[item[1].layer_plan.kernel.name])
        result.append((warehouse, members))
    return result


class AttentionCollector:
    """Forward hooks that accumulate the mean of α per KW layer.

    Use as a context manager (the hooks are removed on exit)::

        with AttentionCollector(model) as collector:
            for batch in batches:
                model(batch)
        maps = collector.result()

    Args:
        model (nn.Module): The model whose KW layers are watched.

    Raises:
        NoKWLayersError: when ``model`` contains no KW layer.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = find_kw_layers(model)
        self._sums: Dict[int, torch.Tensor] = {}
        self._counts: Dict[int, int] = {}
        self._handles: List[Any] = []
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        for _, layer in self.layers:
            num_mixtures, num_cells = layer.attention.num_mixtures, layer.attention.num_cells
            self._sums[id(layer)] = torch.zeros(num_mixtures, num_cells, dtype=torch.float64)
            self._counts[id(layer)] = 0

    def _hook(self, layer: nn.Module) -> Callable:
        key = id(layer)

        def accumulate(module: nn.Module, inputs: Any, alpha: torch.Tensor) -> None:
            alpha = alpha.detach()
            self._sums[key] += alpha.to(device='cpu', dtype=torch.float64).sum(0)
            self._counts[key] += alpha.shape[0]
        return accumulate

    def __enter__(self) -> 'AttentionCollector':
        for _, layer in self.layers:
            self._handles.append(layer.attention.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def result(self) -> List[WarehouseAttention]:
        """The mean attentions, one :class:`WarehouseAttention` per warehouse.

        Raises:
            RuntimeError: when a KW layer saw no sample (nothing was run, or
                the forward did not reach that layer).
        """
        unseen = [name for name, layer in self.layers if self._counts[id(layer)] == 0]
        if unseen:
            raise RuntimeError(f'no sample reached the KW layer(s) {unseen}; run the model (or '
                               'the part that contains them) on at least one batch')
        maps = []
        for index, (warehouse, members) in enumerate(_group_by_warehouse(self.model,
                                                                          self.layers)):
            means, betas, beta_cells = [], [], []
            for _, layer in members:
                mean = self._sums[id(layer)] / self._counts[id(layer)]
                beta = layer.attention.beta[:, :-1].detach().to('cpu', torch.float64)
                beta_cell = torch.tensor(layer.layer_plan.beta, dtype=torch.int64)
                private = getattr(warehouse.plan, 'private_cells', 0)
                if private:
                    mean, beta, beta_cell = _spread_private(mean, beta, beta_cell, private)
                means.append(mean)
                betas.append(beta)
                beta_cells.append(beta_cell)
            maps.append(WarehouseAttention(
                index=index, num_cells=warehouse.num_cells,
                layer_names=[name for name, _ in members],
                layer_mixtures=[layer.attention.num_mixtures for _, layer in members],
                mean=torch.cat(means).numpy(), beta=torch.cat(betas).numpy(),
                beta_cell=torch.cat(beta_cells).numpy(),
                num_samples=min(self._counts[id(layer)] for _, layer in members)))
        return maps


def _spread_private(mean: torch.Tensor, beta: torch.Tensor, beta_cell: torch.Tensor,
                    cells_per_mixture: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Warehouse-wide columns for a warehouse without sharing.

    There mixture ``i`` attends only to its own cells ``[i·k, (i+1)·k)`` (its
    attention row has ``k`` entries, and β indexes them); every other cell
    gets attention 0 and β 0.
    """
    num_mixtures, k = mean.shape[0], cells_per_mixture
    rows = torch.arange(num_mixtures).unsqueeze(1)
    columns = rows * k + torch.arange(k)
    spread = []
    for local in (mean, beta):
        full = torch.zeros(num_mixtures, num_mixtures * k, dtype=local.dtype)
        full[rows, columns] = local
        spread.append(full)
    beta_cell = torch.where(beta_cell == ZERO_CELL, beta_cell,
                            torch.arange(num_mixtures) * k + beta_cell)
    return spread[0], spread[1], beta_cell


def collect_attention_maps(model: nn.Module, batches: Iterable[Any],
                           forward: Optional[Callable[[Any], Any]] = None
                           ) -> List[WarehouseAttention]:
    """Run ``model`` in eval mode over ``batches`` and average α per warehouse.

    Args:
        model (nn.Module): A model (classifier, detector backbone, bare
            backbone, single layer) containing KW layers.
        batches (Iterable): Inputs, one item per forward call.
        forward (callable, optional): ``forward(batch)`` runs the model on
            one item; defaults to ``model(batch)``.

    Returns:
        list[WarehouseAttention]: One entry per warehouse.

    Raises:
        NoKWLayersError: when ``model`` contains no KW layer.
        RuntimeError: when ``batches`` is empty or a KW layer saw no sample.
    """
    run = forward if forward is not None else model
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with AttentionCollector(model) as collector, torch.no_grad():
            for batch in batches:
                run(batch)
    finally:  # restore every module's own mode (frozen parts stay in eval)
        for module, training in modes:
            module.training = training
    return collector.result()


def figure_size(num_warehouses: int) -> Tuple[float, float]:
    """Size in inches of the figure for ``num_warehouses`` panels.

    Panels of :data:`PANEL_SIZE` in rows of :data:`PANELS_PER_ROW`; the PNG
    is ``figure_size × dpi`` pixels.
    """
    if num_warehouses < 1:
        raise ValueError(f'num_warehouses must be at least 1, got {num_warehouses!r}')
    columns = min(num_warehouses, PANELS_PER_ROW)
    rows = math.ceil(num_warehouses / columns)
    return columns * PANEL_SIZE[0], rows * PANEL_SIZE[1]


def _draw_panel(fig, ax, entry: WarehouseAttention) -> None:
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.ticker import MaxNLocator

    # symmetric limits, so white is exactly 0 (CAF attentions are signed)
    limit = float(np.abs(entry.mean).max())
    limit = limit if limit > 0 else 1.0
    image = ax.imshow(entry.mean, aspect='auto', interpolation='nearest', cmap=COLOUR_MAP,
                      norm=TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit))
    bounds = entry.layer_boundaries
    for row in bounds[1:-1]:
        ax.axhline(row - 0.5, color='black', linewidth=0.6)
    centres = [(start + end - 1) / 2 for start, end in zip(bounds[:-1], bounds[1:])]
    # a layer label must fit in its share of the panel height (72 points per inch)
    label_points = PANEL_SIZE[1] * 72 * 0.8 / max(len(entry.layer_names), 1)
    ax.set_yticks(centres)
    ax.set_yticklabels(entry.layer_names, fontsize=max(min(7.0, label_points * 0.8), 2.0))
    ax.tick_params(axis='y', length=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=10))
    ax.tick_params(axis='x', labelsize=7)
    ax.set_xlabel('cell', fontsize=8)
    layers = len(entry.layer_names)
    ax.set_title(f'warehouse {entry.index}: {entry.num_cells} cells, {layers} '
                 f"layer{'s' if layers > 1 else ''}, {len(entry.mean)} mixtures", fontsize=9)
    colour_bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    colour_bar.ax.tick_params(labelsize=7)
    colour_bar.set_label('mean α', fontsize=8)


def render_attention_maps(maps: Sequence[WarehouseAttention], out_file: Union[str, os.PathLike],
                          title: Optional[str] = None, dpi: int = 100) -> Tuple[int, int]:
    """Draw one heatmap per warehouse into a PNG, written atomically.

    Rows are the linear mixtures of all layers sharing the warehouse (in plan
    order, separated by horizontal lines and labelled with the layer names),
    columns its cells; a diverging colour map centred at 0 with symmetric
    limits per warehouse, and a colour bar per panel.

    Args:
        maps (Sequence[WarehouseAttention]): From :func:`collect_attention_maps`.
        out_file (str | PathLike): The PNG to write.
        title (str, optional): Figure title (e.g. model, checkpoint, data).
        dpi (int): Resolution. Defaults to 100.

    Returns:
        tuple[int, int]: The image size in pixels (width, height).
    """
    if not maps:
        raise ValueError('maps is empty: there is no warehouse to draw')
    if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi < 1:
        raise ValueError(f'dpi must be a positive int, got {dpi!r}')
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = figure_size(len(maps))
    columns = min(len(maps), PANELS_PER_ROW)
    rows = math.ceil(len(maps) / columns)
    # a Figure with an Agg canvas: no pyplot state, no GUI backend
    fig = Figure(figsize=(width, height), dpi=dpi, layout='constrained')
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, entry in zip(axes, maps):
        _draw_panel(fig, ax, entry)
    for ax in axes[len(maps):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    write_atomically(out_file, lambda f: fig.savefig(f, format='png', dpi=dpi))
    return int(round(width * dpi)), int(round(height * dpi))


def attention_arrays(maps: Sequence[WarehouseAttention]) -> Dict[str, np.ndarray]:
    """The maps as flat named arrays (the layout of :func:`save_attention_arrays`).

    Keys per warehouse ``k``: ``warehouse{k}_mean``, ``warehouse{k}_beta``,
    ``warehouse{k}_beta_cell``, ``warehouse{k}_layer_names``,
    ``warehouse{k}_layer_mixtures``, ``warehouse{k}_num_samples``; plus
    ``num_warehouses``. All plain arrays (no pickling needed to load them).
    """
    arrays: Dict[str, np.ndarray] = {'num_warehouses': np.array(len(maps))}
    for entry in maps:
        prefix = f'warehouse{entry.index}_'
        arrays[prefix + 'mean'] = entry.mean
        arrays[prefix + 'beta'] = entry.beta
        arrays[prefix + 'beta_cell'] = entry.beta_cell
        arrays[prefix + 'layer_names'] = np.array(entry.layer_names, dtype=str)
        arrays[prefix + 'layer_mixtures'] = np.array(entry.layer_mixtures, dtype=np.int64)
        arrays[prefix + 'num_samples'] = np.array(entry.num_samples)
    return arrays


def save_attention_arrays(maps: Sequence[WarehouseAttention],
                          out_file: Union[str, os.PathLike]) -> None:
    """Write :func:`attention_arrays` to an ``.npz`` file, atomically.

    Load with ``np.load(out_file)`` (no ``allow_pickle`` needed).
    """
    arrays = attention_arrays(maps)
    write_atomically(out_file, lambda f: np.savez(f, **arrays))


__all__ = [
    'AttentionCollector', 'NoKWLayersError', 'WarehouseAttention', 'attention_arrays',
    'collect_attention_maps', 'figure_size', 'find_kw_layers', 'is_kw_layer',
    'render_attention_maps', 'save_attention_arrays', 'PANEL_SIZE', 'PANELS_PER_ROW',
    'COLOUR_MAP'
]
