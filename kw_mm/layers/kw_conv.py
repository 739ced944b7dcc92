"""KernelWarehouse convolutions (1d/2d/3d) and linear layer.

A KW layer has the constructor and output shape of its ``torch.nn``
counterpart; its kernel is assembled per sample from warehouse cells
(paper Eq. 3 and Algorithm 1 part B)::

    W_b[mixture i] = Σ_j α_b[i, j] · e_j

and the batch is convolved as one grouped convolution whose groups are the
samples (the usual dynamic-convolution trick: sample ``b`` only sees the
kernel assembled for it).

A layer either owns a private warehouse (built standalone, e.g. through
``mmcv.cnn.build_conv_layer(dict(type='KWConv2d', budget=1), ...)``), or
draws from a warehouse owned by its backbone. In the second case it keeps a
plain (unregistered) reference, so the cells appear once in ``state_dict``
and ``copy.deepcopy`` of the backbone re-points every layer at the copied
warehouse (deepcopy's memo maps the shared object once).
"""
from __future__ import annotations

from functools import cached_property
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch import nn

from .. import native
from .attention import KWAttention
from .execution.dispatch import conv_forward
from .execution.export import is_exporting
from .execution.geometry import CONV_FUNCTIONS, ConvGeometry, conv_geometry, mixture_to_kernel
from .execution.kernel_basis import KernelBasisCache
from .partition import KernelShape, LayerPlan, plan_warehouse
from .recompute import run_with_kernel
from .warehouse import KernelWarehouse

IntOrTuple = Union[int, Sequence[int]]


def _tuple(value: IntOrTuple, ndim: int, name: str) -> Tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * ndim
    value = tuple(value)
    if len(value) != ndim or not all(isinstance(v, int) for v in value):
        raise ValueError(f'{name} must be an int or a tuple of {ndim} ints, got {value!r}')
    return value


class _KWLayer(nn.Module):
    """Shared machinery of KW convolutions and the KW linear layer."""

    ndim: int = 2

    def _setup_kw(self, kernel: KernelShape, in_channels: int,
                  warehouse: Optional[KernelWarehouse], budget: float,
                  reduction: float, min_hidden: int, cell_in_ratio: Optional[float],
                  cell_out_ratio: Optional[float], norm: str,
                  nonlocal_basis_ratio: float, temperature: float, attention_fn: str = 'caf',
                  init: str = 'one_to_one', kernel_partition: bool = True,
                  recompute_kernels: bool = True) -> None:
        if not isinstance(recompute_kernels, bool):
            raise ValueError(f'recompute_kernels must be True or False, got {recompute_kernels!r}')
        self.recompute_kernels = recompute_kernels
        if warehouse is None:
            plan = plan_warehouse([kernel], budget, cell_in_ratio, cell_out_ratio, init,
                                  kernel_partition)
            self.warehouse = KernelWarehouse(plan)
        else:
            if not isinstance(warehouse, KernelWarehouse):
                raise TypeError(f'warehouse must be a KernelWarehouse, got {type(warehouse).__name__}')
            # Not registered: the backbone owns the warehouse (see module docstring).
            object.__setattr__(self, '_shared_warehouse', warehouse)
        plan = self.kw_warehouse.plan
        layer_plan = plan.layer(kernel.name)
        if layer_plan.kernel != kernel:
            raise ValueError(f'layer {kernel.name!r} was planned as {layer_plan.kernel} but is built '
                             f'as {kernel}')
        self.layer_plan: LayerPlan = layer_plan
        self.attention = KWAttention(
            # without sharing, a mixture's attention row covers its own cells only
            in_channels, layer_plan, plan.private_cells or plan.num_cells, budget=plan.budget,
            reduction=reduction, min_hidden=min_hidden, norm=norm,
            nonlocal_basis_ratio=nonlocal_basis_ratio, temperature=temperature,
            attention_fn=attention_fn, init=plan.init)

    @property
    def kw_warehouse(self) -> KernelWarehouse:
        """The warehouse this layer draws from (owned or shared)."""
        shared = self.__dict__.get('_shared_warehouse')
        return shared if shared is not None else self.warehouse

    def init_weights(self) -> None:
        """Re-initialise the attention (cells are initialised by their warehouse).

        Defined so that mmcv's ``ConvModule`` and mmengine's ``BaseModule``
        leave this layer's initialisation to it.
        """
        self.attention.reset_parameters()
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def mix_cells(self, alpha: torch.Tensor) -> torch.Tensor:
        """The mixtures ``[B, m, cell numel]`` (paper Eq. 3), in the warehouse's layout."""
        plan = self.layer_plan
        wh = self.kw_warehouse.plan
        cells = self.kw_warehouse.cells.reshape(wh.num_cells, -1).to(alpha.dtype)
        if wh.private_cells:  # mixture i mixes its own cells [i·k, (i+1)·k) only
            cells = cells.view(plan.num_mixtures, wh.private_cells, -1)
            return torch.einsum('bmk,mkd->bmd', alpha, cells)
        if is_exporting():
            return torch.matmul(alpha, cells)
        return native.matmul(alpha, cells)  # torch.matmul where the C kernels do not apply

    @cached_property
    def geometry(self) -> ConvGeometry:
        """The layer's :class:`~.execution.geometry.ConvGeometry` (built on first use)."""
        return self._geometry()  # defined by each layer type

    def mixture_to_kernel(self, mixed: torch.Tensor) -> torch.Tensor:
        """Kernels ``[..., out, in/groups, *k]`` from mixtures ``[..., m, cell numel]``."""
        return mixture_to_kernel(self.geometry, mixed)

    def assemble_kernel(self, alpha: torch.Tensor) -> torch.Tensor:
        """Per-sample kernels ``[B, out, in/groups, *k]`` from attentions ``[B, m, n]``."""
        return self.mixture_to_kernel(self.mix_cells(alpha))


class _KWConvNd(_KWLayer):

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrTuple,
                 stride: IntOrTuple = 1, padding: Union[IntOrTuple, str] = 0,
                 dilation: IntOrTuple = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = 'zeros', *, budget: float = 1.0,
                 reduction: float = 1 / 16, min_hidden: int = 16,
                 cell_in_ratio: Optional[float] = None, cell_out_ratio: Optional[float] = None,
                 norm: str = 'BN', nonlocal_basis_ratio: float = 0.0, temperature: float = 1.0,
                 attention_fn: str = 'caf', init: str = 'one_to_one',
                 kernel_partition: bool = True, recompute_kernels: bool = True,
                 inference_basis: bool = True,
                 warehouse: Optional[KernelWarehouse] = None, name: Optional[str] = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(inference_basis, bool):
            raise ValueError(f'inference_basis must be True or False, got {inference_basis!r}')
        self.inference_basis = inference_basis
        nd = self.ndim
        for label, value in (('in_channels', in_channels), ('out_channels', out_channels),
                             ('groups', groups)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f'{label} must be a positive int, got {value!r}')
        if in_channels % groups or out_channels % groups:
            raise ValueError(f'in_channels={in_channels} and out_channels={out_channels} must both '
                             f'be divisible by groups={groups}')
        if padding_mode != 'zeros':
            raise ValueError(f"padding_mode must be 'zeros' for KW convolutions, got {padding_mode!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _tuple(kernel_size, nd, 'kernel_size')
        self.stride = _tuple(stride, nd, 'stride')
        self.padding = padding if isinstance(padding, str) else _tuple(padding, nd, 'padding')
        self.dilation = _tuple(dilation, nd, 'dilation')
        self.groups = groups
        self.padding_mode = padding_mode
        self.transposed = False
        self.output_padding = (0,) * nd
        kernel = KernelShape(name or type(self).__name__, out_channels, in_channels // groups,
                             self.kernel_size)
        self._setup_kw(kernel, in_channels, warehouse, budget, reduction, min_hidden,
                       cell_in_ratio, cell_out_ratio, norm, nonlocal_basis_ratio, temperature,
                       attention_fn, init, kernel_partition, recompute_kernels)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def _geometry(self) -> ConvGeometry:
        return conv_geometry(self.layer_plan, self.kw_warehouse.plan, self.in_channels,
                             self.out_channels, self.kernel_size, self.stride, self.padding,
                             self.dilation, self.groups)

    @cached_property
    def _kernel_basis(self) -> KernelBasisCache:
        """The cached kernel basis of inference (:mod:`.execution.kernel_basis`)."""
        return KernelBasisCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.ndim + 2:
            raise ValueError(f'{type(self).__name__} expects a {self.ndim + 2}-D input '
                             f'[B, C, ...], got shape {tuple(x.shape)}')
        return conv_forward(self.geometry, x, self.attention, self.kw_warehouse.cells, self.bias,
                            self.mix_cells, self.assemble_kernel, self.recompute_kernels,
                            self._kernel_basis, self.inference_basis)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The straightforward computation, kept for tests of the fast paths:
        assemble each sample's kernel and convolve each sample on its own."""
        weight = self.assemble_kernel(self.attention(x).to(x.dtype))
        bias = None if self.bias is None else self.bias.to(x.dtype)
        conv = CONV_FUNCTIONS[self.ndim]
        return torch.cat([conv(x[b:b + 1], weight[b], bias, self.stride, self.padding,
                               self.dilation, self.groups) for b in range(x.shape[0])])

    def extra_repr(self) -> str:
        s = (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, '
             f'stride={self.stride}, padding={self.padding}')
        if self.dilation != (1,) * self.ndim:
            s += f', dilation={self.dilation}'
        if self.groups != 1:
            s += f', groups={self.groups}'
        if self.bias is None:
            s += ', bias=False'
        p = self.layer_plan
        return s + f', mixtures={p.num_mixtures}, warehouse_cells={self.kw_warehouse.num_cells}'


@MODELS.register_module()
class KWConv1d(_KWConvNd):
    """KernelWarehouse counterpart of :class:`torch.nn.Conv1d`."""
    ndim = 1


@MODELS.register_module()
class KWConv2d(_KWConvNd):
    """KernelWarehouse counterpart of :class:`torch.nn.Conv2d`.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation,
        groups, bias, padding_mode: As :class:`torch.nn.Conv2d`
            (``padding_mode`` must be ``'zeros'``).
        budget (float): Parameter budget b of a private warehouse.
            Defaults to 1.
        reduction (float): Attention hidden width / in_channels. Defaults to 1/16.
        min_hidden (int): Smallest attention hidden width. Defaults to 16.
        cell_in_ratio (float, optional): Cell input channels / gcd. Defaults
            to 1 for b ≥ 1 and 1/2 below.
        cell_out_ratio (float, optional): Same for output channels.
        norm (str): Attention norm, ``'BN'`` or ``'LN'``. Defaults to ``'BN'``.
        nonlocal_basis_ratio (float): Low-rank attention over other layers'
            cells (released ResNet50 1/2x). Defaults to 0.
        temperature (float): Initial τ. Defaults to 1 (start of training).
        attention_fn (str): 'caf' (default), 'softmax', 'sigmoid' or
            'relu_norm' (paper Table 8 ablation).
        init (str): β strategy of a private warehouse: 'one_to_one'
            (default), 'all_to_one', 'none', 'n_to_one' (b ≥ 2) or
            'one_to_n' (b < 1) (paper Table 13 ablation).
        kernel_partition (bool): ``False`` makes the private warehouse hold
            ``int(b)`` whole kernels mixed by one attention row (vanilla
            dynamic convolution, e.g. DY-Conv with b = 4; paper §3.5).
            Defaults to True.
        recompute_kernels (bool): While training, rebuild the per-sample
            kernels in the backward pass instead of keeping them: saves
            ``B ×`` the layer's kernel in memory for one extra assembly (on
            CPU the forward then runs fused where that applies, never storing
            them; ResNet50 at batch 8: peak memory 1.0x instead of 1.65x the
            plain model's, the training step about 5% slower). Defaults to
            True; False keeps them.
        inference_basis (bool): In inference on CPU, mix each sample's kernels
            from a cached basis of ``m·(d + 2)`` cell-sized rows (d: the
            attention's hidden width) instead of the warehouse's n cells, where
            that at most halves the work and the basis is at most 1.25× the
            warehouse (:mod:`kw_mm.layers.basis`; ResNet50's third stage:
            17–18 rows instead of 138, about 350 MB of bases for the model).
            Defaults to True.
        warehouse (KernelWarehouse, optional): A shared warehouse whose plan
            includes a layer called ``name``; when None the layer owns one.
        name (str, optional): The layer's name in the warehouse plan.
    """
    ndim = 2


@MODELS.register_module()
class KWConv3d(_KWConvNd):
    """KernelWarehouse counterpart of :class:`torch.nn.Conv3d`."""
    ndim = 3


@MODELS.register_module()
class KWLinear(_KWLayer):
    """KernelWarehouse counterpart of :class:`torch.nn.Linear`.

    The same machinery as a 1-d convolution with kernel size 1 over a
    length-1 input; warehouse cells are ``[n, cell_out, cell_in, 1]``. Inputs
    ``[B, in]`` or ``[B, *, in]`` (the attention pools over ``*``).

    Args:
        in_features (int): Input features.
        out_features (int): Output features.
        bias (bool): Whether to add a learnt bias. Defaults to True.
        **kw: The KW options of :class:`KWConv2d` (budget, reduction, ...,
            warehouse, name).
    """
    ndim = 1

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 budget: float = 1.0, reduction: float = 1 / 16, min_hidden: int = 16,
                 cell_in_ratio: Optional[float] = None, cell_out_ratio: Optional[float] = None,
                 norm: str = 'BN', nonlocal_basis_ratio: float = 0.0, temperature: float = 1.0,
                 attention_fn: str = 'caf', init: str = 'one_to_one',
                 kernel_partition: bool = True, recompute_kernels: bool = True,
                 warehouse: Optional[KernelWarehouse] = None, name: Optional[str] = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        for label, value in (('in_features', in_features), ('out_features', out_features)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f'{label} must be a positive int, got {value!r}')
        self.in_features = in_features
        self.out_features = out_features
        kernel = KernelShape(name or 'KWLinear', out_features, in_features, (1,))
        self._setup_kw(kernel, in_features, warehouse, budget, reduction, min_hidden,
                       cell_in_ratio, cell_out_ratio, norm, nonlocal_basis_ratio, temperature,
                       attention_fn, init, kernel_partition, recompute_kernels)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def _geometry(self) -> ConvGeometry:
        return conv_geometry(self.layer_plan, self.kw_warehouse.plan, self.in_features,
                             self.out_features, (1,), (1,), (0,), (1,), 1)

    @staticmethod
    def _tokens(x: torch.Tensor) -> torch.Tensor:
        """``x [B, *, in]`` as ``[B, tokens, in]`` (also for B = 0)."""
        return x.unsqueeze(1) if x.dim() == 2 else x.flatten(1, -2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[-1] != self.in_features:
            raise ValueError(f'KWLinear expects input [..., {self.in_features}], got shape '
                             f'{tuple(x.shape)}')
        tokens = self._tokens(x)
        alpha = self.attention(tokens.mean(1)).to(x.dtype)
        out = run_with_kernel(alpha, lambda w: torch.bmm(tokens, w.flatten(2).transpose(1, 2)),
                              self.assemble_kernel, self.recompute_kernels)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample ``F.linear`` with each sample's assembled weight (for tests)."""
        tokens = self._tokens(x)
        weight = self.assemble_kernel(self.attention(tokens.mean(1)).to(x.dtype)).flatten(2)
        out = torch.stack([F.linear(tokens[b], weight[b], self.bias) for b in range(x.shape[0])])
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f'in_features={self.in_features}, out_features={self.out_features}, '
                f'bias={self.bias is not None}, mixtures={self.layer_plan.num_mixtures}, '
                f'warehouse_cells={self.kw_warehouse.num_cells}')
