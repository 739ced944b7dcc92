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

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch import nn

from .. import native
from .attention import KWAttention
from .execution.dispatch import conv_forward, omni_kernels
from .execution.export import is_exporting
from .execution.geometry import CONV_FUNCTIONS, ConvGeometry, conv_geometry, mixture_to_kernel
from .execution.kernel_basis import KernelBasisCache
from .options import SHARING_KEYS, IntOrTuple, KWOptions, layer_options, set_conv_attributes
from .partition import KernelShape, LayerPlan, plan_warehouse
from .recompute import run_with_kernel
from .warehouse import KernelWarehouse


class KWLayer(nn.Module):
    """What KW convolutions and the KW linear layer share: a warehouse (owned
    or shared), the attention, and the assembly of per-sample kernels.

    Attributes:
        kw_options (KWOptions): The options the layer was built with.
        recompute_kernels (bool): ``kw_options.recompute_kernels``; may be
            changed on a built layer.
    """

    ndim: int = 2

    def _setup_kw(self, kernel: KernelShape, in_channels: int,
                  warehouse: Optional[KernelWarehouse], options: KWOptions) -> None:
        self.kw_options = options
        self.recompute_kernels = options.recompute_kernels
        # the inference kernel basis, built on first use (:mod:`.execution.kernel_basis`)
        self._kernel_basis = KernelBasisCache()
        if warehouse is None:
            plan = plan_warehouse([kernel], options.budget, options.cell_in_ratio,
                                  options.cell_out_ratio, options.init, options.kernel_partition)
            self.warehouse = KernelWarehouse(plan)
        else:
            if not isinstance(warehouse, KernelWarehouse):
                raise TypeError(f'warehouse must be a KernelWarehouse, got '
                                f'{type(warehouse).__name__}')
            # Not registered: the backbone owns the warehouse (see module docstring).
            object.__setattr__(self, '_shared_warehouse', warehouse)
        plan = self.kw_warehouse.plan
        layer_plan = plan.layer(kernel.name)
        if layer_plan.kernel != kernel:
            raise ValueError(f'layer {kernel.name!r} was planned as {layer_plan.kernel} but is '
                             f'built as {kernel}')
        self.layer_plan: LayerPlan = layer_plan
        self.attention = KWAttention(
            # without sharing, a mixture's attention row covers its own cells only
            in_channels, layer_plan, plan.private_cells or plan.num_cells, budget=plan.budget,
            init=plan.init, options=options)

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

    def mixture_to_kernel(self, mixed: torch.Tensor) -> torch.Tensor:
        """Kernels ``[..., out, in/groups, *k]`` from mixtures ``[..., m, cell numel]``."""
        return mixture_to_kernel(self.geometry, mixed)

    def assemble_kernel(self, alpha: torch.Tensor) -> torch.Tensor:
        """Per-sample kernels ``[B, out, in/groups, *k]`` from attentions ``[B, m, n]``."""
        return self.mixture_to_kernel(self.mix_cells(alpha))


class _KWConvNd(KWLayer):
    """KernelWarehouse counterpart of ``torch.nn.Conv{1,2,3}d``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation,
        groups, bias, padding_mode: As ``torch.nn.Conv2d``, checked as it
            does (``padding`` an int, a tuple, ``'same'`` (stride 1 only) or
            ``'valid'``; ``padding_mode`` must be ``'zeros'``).
        options (KWOptions, optional): The KW options; defaults to
            ``KWOptions()``.
        warehouse (KernelWarehouse, optional): A shared warehouse whose plan
            includes a layer called ``name``; when None the layer owns one,
            planned from ``options`` (``budget``, cell ratios, ``init``,
            ``kernel_partition``).
        name (str, optional): The layer's name in the warehouse plan.
        device, dtype: As ``torch.nn.Conv2d``.
        **kw_options: Any option of :class:`~kw_mm.layers.options.KWOptions`
            but ``sharing`` and ``share_across_shapes`` (e.g. ``budget=2``),
            overriding ``options``; how ``mmcv.cnn.build_conv_layer(dict(
            type='KWConv2d', budget=2), ...)`` passes them.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrTuple,
                 stride: IntOrTuple = 1, padding: Union[IntOrTuple, str] = 0,
                 dilation: IntOrTuple = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = 'zeros', *, options: Optional[KWOptions] = None,
                 warehouse: Optional[KernelWarehouse] = None, name: Optional[str] = None,
                 device=None, dtype=None, **kw_options: Any) -> None:
        super().__init__()
        set_conv_attributes(self, in_channels, out_channels, kernel_size, stride, padding,
                            dilation, groups, padding_mode)
        options = layer_options(type(self).__name__, options, kw_options)
        self.inference_basis = options.inference_basis
        kernel = KernelShape(name or type(self).__name__, out_channels, in_channels // groups,
                             self.kernel_size)
        self._setup_kw(kernel, in_channels, warehouse, options)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        # built once; plain attributes, which torch.compile reads without a lock
        self.geometry: ConvGeometry = self._geometry()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def _geometry(self) -> ConvGeometry:
        return conv_geometry(self.layer_plan, self.kw_warehouse.plan, self.in_channels,
                             self.out_channels, self.kernel_size, self.stride, self.padding,
                             self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.ndim + 2:
            raise ValueError(f'{type(self).__name__} expects a {self.ndim + 2}-D input '
                             f'[B, C, ...], got shape {tuple(x.shape)}')
        return conv_forward(self.geometry, x, self.attention, self.kw_warehouse.cells, self.bias,
                            self.mix_cells, self.assemble_kernel, self.recompute_kernels,
                            self._kernel_basis, self.inference_basis)

    def per_sample_kernels(self, x: torch.Tensor) -> torch.Tensor:
        """Each sample's kernel ``[B, out, in/groups, *k]`` for input ``x``:
        assembled from the cells, and for KW* (``omni_attention``) multiplied
        by ODConv's attentions."""
        if not self.attention.omni:
            return self.assemble_kernel(self.attention(x).to(x.dtype))
        alpha, *extra = self.attention(x, omni=True)
        extra = [None if a is None else a.to(x.dtype) for a in extra]
        return omni_kernels(self.geometry, self.assemble_kernel, alpha.to(x.dtype), *extra)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The straightforward computation, kept for tests of the fast paths:
        assemble each sample's kernel and convolve each sample on its own."""
        weight = self.per_sample_kernels(x)
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

    Takes the arguments of ``torch.nn.Conv2d`` (``padding_mode`` must be
    ``'zeros'``) and the KW options of
    :class:`~kw_mm.layers.options.KWOptions`, as an ``options`` object or as
    keywords (``KWConv2d(8, 16, 3, padding=1, budget=2)``); see ``_KWConvNd``.
    """
    ndim = 2


@MODELS.register_module()
class KWConv3d(_KWConvNd):
    """KernelWarehouse counterpart of :class:`torch.nn.Conv3d`."""
    ndim = 3


@MODELS.register_module()
class KWLinear(KWLayer):
    """KernelWarehouse counterpart of :class:`torch.nn.Linear`.

    The same machinery as a 1-d convolution with kernel size 1 over a
    length-1 input; warehouse cells are ``[n, cell_out, cell_in, 1]``. Inputs
    ``[B, in]`` or ``[B, *, in]`` (the attention pools over ``*``).

    Args:
        in_features (int): Input features.
        out_features (int): Output features.
        bias (bool): Whether to add a learnt bias. Defaults to True.
        options (KWOptions, optional): The KW options (``inference_basis``,
            a convolution option, is ignored); defaults to ``KWOptions()``.
        warehouse (KernelWarehouse, optional): A shared warehouse whose plan
            includes a layer called ``name``; when None the layer owns one.
        name (str, optional): The layer's name in the warehouse plan.
        device, dtype: As ``torch.nn.Linear``.
        **kw_options: KW options as keywords (``budget=0.5``), overriding
            ``options``; not ``sharing``, ``share_across_shapes``,
            ``inference_basis`` or ``omni_attention``.
    """
    ndim = 1

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 options: Optional[KWOptions] = None,
                 warehouse: Optional[KernelWarehouse] = None, name: Optional[str] = None,
                 device=None, dtype=None, **kw_options: Any) -> None:
        super().__init__()
        for label, value in (('in_features', in_features), ('out_features', out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f'{label} must be a positive int, got {value!r}')
        self.in_features = in_features
        self.out_features = out_features
        options = layer_options('KWLinear', options, kw_options,
                                excluded=SHARING_KEYS + ('inference_basis', 'omni_attention'))
        if options.omni_attention:
            raise ValueError('KWLinear: omni_attention=True (KW*) applies to convolutions only; '
                             'build the linear layer with omni_attention=False')
        kernel = KernelShape(name or 'KWLinear', out_features, in_features, (1,))
        self._setup_kw(kernel, in_features, warehouse, options)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        # built once; plain attributes, which torch.compile reads without a lock
        self.geometry: ConvGeometry = self._geometry()
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
