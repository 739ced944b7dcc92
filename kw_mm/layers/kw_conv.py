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

import math
from typing import Any, Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch import nn

from .. import native
from .attention import KWAttention
from .basis import InferenceBasis, basis_coefficients, basis_pays, basis_rows, hooked, with_beta
from .export_forward import batch_agnostic_conv, is_exporting
from .options import SHARING_KEYS, IntOrTuple, KWOptions, conv_arguments, layer_options
from .partition import KernelShape, LayerPlan, plan_warehouse
from .per_sample import FusedKernelConv, run_per_sample
from .recompute import KernelRecompute, hooks_unsupported
from .warehouse import KernelWarehouse

_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


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
        self._inference_basis = InferenceBasis()
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

    def _blocked(self, mixed: torch.Tensor) -> torch.Tensor:
        """``mixed [..., m, cell numel]`` as a view ``[..., G_out, cell_out, G_in, cell_in, S]``.

        Mixture ``i = (s·G_out + o)·G_in + c`` fills output channels of group
        ``o`` and input channels of group ``c`` at kernel position ``s``.
        """
        plan = self.layer_plan
        wh = self.kw_warehouse.plan
        lead = mixed.shape[:-2]
        n = len(lead)
        blocked = mixed.view(*lead, plan.kernel.spatial_positions, plan.out_groups,
                             plan.in_groups, wh.cell_out, wh.cell_in)
        return blocked.permute(*range(n), n + 1, n + 3, n + 2, n + 4, n)

    def mixture_to_kernel(self, mixed: torch.Tensor) -> torch.Tensor:
        """Kernels ``[..., out, in/groups, *k]`` from mixtures ``[..., m, cell numel]``."""
        kernel = self.layer_plan.kernel
        shape = (*mixed.shape[:-2], kernel.out_channels, kernel.in_channels, *kernel.kernel_size)
        if not self.layer_plan.partitioned:  # one mixture: the whole kernel (paper §3.5)
            return mixed.reshape(shape)
        return self._blocked(mixed).reshape(shape)

    def kernel_into_mixture_(self, mixed: torch.Tensor, kernel: torch.Tensor) -> None:
        """Write ``kernel`` into ``mixed`` in place: the inverse of :meth:`mixture_to_kernel`."""
        if not self.layer_plan.partitioned:
            mixed.view(kernel.shape).copy_(kernel)
            return
        blocked = self._blocked(mixed)
        blocked.copy_(kernel.reshape(blocked.shape))

    def assemble_kernel(self, alpha: torch.Tensor) -> torch.Tensor:
        """Per-sample kernels ``[B, out, in/groups, *k]`` from attentions ``[B, m, n]``."""
        return self.mixture_to_kernel(self.mix_cells(alpha))

    def _with_kernel(self, alpha: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor],
                     make: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                     ) -> torch.Tensor:
        """``run(make(alpha))``, ``make`` defaulting to :meth:`assemble_kernel`.

        While training with ``recompute_kernels`` the made tensor is not kept
        for the backward pass but rebuilt there (see :mod:`.recompute`; not
        under functorch transforms, tracing or ``torch.compile``).
        """
        make = make or self.assemble_kernel
        kernel = make(alpha)
        if (self.recompute_kernels and torch.is_grad_enabled() and kernel.requires_grad
                and not hooks_unsupported()):
            with KernelRecompute(make, alpha, kernel):
                return run(kernel)
        return run(kernel)


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
        self.kernel_size, self.stride, self.padding, self.dilation = conv_arguments(
            self.ndim, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            padding_mode)
        options = layer_options(type(self).__name__, options, kw_options)
        self.inference_basis = options.inference_basis
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = groups
        self.padding_mode = padding_mode
        self.transposed = False
        self.output_padding = (0,) * self.ndim
        kernel = KernelShape(name or type(self).__name__, out_channels, in_channels // groups,
                             self.kernel_size)
        self._setup_kw(kernel, in_channels, warehouse, options)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, groups: int,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _CONV_FUNCTIONS[self.ndim](x, weight, bias, self.stride, self.padding,
                                          self.dilation, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.ndim + 2:
            raise ValueError(f'{type(self).__name__} expects a {self.ndim + 2}-D input '
                             f'[B, C, ...], got shape {tuple(x.shape)}')
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = self._basis_forward(x)
        if out is not None:
            return out if bias is None else out + bias.view(1, -1, *([1] * self.ndim))
        alpha = self.attention(x).to(x.dtype)
        if is_exporting():  # ONNX: no branch on the batch size (see export_forward.py)
            return batch_agnostic_conv(x, self.assemble_kernel(alpha), bias, self.stride,
                                       self.padding, self.dilation, self.groups)
        if x.shape[0] == 1 and not self._native_batch_paths(x):
            # one sample: a plain convolution with its kernel (the CPU paths below are
            # faster where the native kernels run: the pointwise product, conv2d_taps)
            return self._with_kernel(alpha, lambda w: self._conv(x, w[0], self.groups, bias))
        if self._pointwise:
            out = self._fused(x, alpha)
            if out is None and self._pointwise_native(x):
                # the mixtures read in place (apply_kernels_native): no reordered kernels
                out = self._with_kernel(alpha, lambda mixed: run_per_sample(self, x, mixed),
                                        make=self.mix_cells)
            if out is None:
                out = self._with_kernel(alpha, lambda w: self._pointwise_conv(x, w))
        elif not x.is_cuda and self.in_channels != self.groups:
            # CPU, dense or grouped: per sample, kernels reordered one at a time (per_sample.py);
            # depth-wise ones run fastest as one convolution with B× the groups (below)
            x = self._per_sample_input(x)
            out = self._fused(x, alpha)
            if out is None:
                out = self._with_kernel(alpha, lambda mixed: run_per_sample(self, x, mixed),
                                        make=self.mix_cells)
        else:
            out = self._with_kernel(alpha, lambda w: self._batched_conv(x, w),
                                    make=self._batched_kernel)
        if bias is not None:
            out = out + bias.view(1, -1, *([1] * self.ndim))
        return out

    def _native_batch_paths(self, x: torch.Tensor) -> bool:
        """Whether a single sample should take the batch paths: where kw_mm's
        native CPU kernels can run (float32 CPU, no autocast, tracing, functorch
        transform or forward-mode AD)."""
        return x.device.type == 'cpu' and native.usable(x, x, native.MIN_MACS)

    @property
    def _pointwise(self) -> bool:
        """1×1 kernel, no padding or dilation, one group: a per-sample matmul."""
        nd = self.ndim
        return (self.kernel_size == (1,) * nd and self.groups == 1
                and self.padding in ((0,) * nd, 'valid') and self.dilation == (1,) * nd)

    def _pointwise_conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # y_b = W_b @ x_b over flattened positions: one batched matmul, no
        # per-call weight reordering as a convolution backend would do (the
        # native kernel on CPU where it applies, see kw_mm/native).
        x = self._pointwise_input(x)
        batch = x.shape[0]
        out = native.bmm(weight.view(batch, self.out_channels, self.in_channels),
                         x.reshape(batch, self.in_channels, -1))
        return out.view(batch, self.out_channels, *x.shape[2:])

    def _batched_kernel(self, alpha: torch.Tensor) -> torch.Tensor:
        # flattened here, not in _batched_conv: where flattening copies, the copy is
        # what the convolution keeps, so it is what recompute_kernels must rebuild
        return self.assemble_kernel(alpha).flatten(0, 1)

    def _batched_conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # The usual dynamic-convolution trick: one grouped convolution whose
        # groups are the samples (sample b is group block b). ``weight`` is
        # the per-sample kernels flattened to [B·out, in/groups, *k].
        batch = x.shape[0]
        out = self._conv(x.reshape(1, -1, *x.shape[2:]), weight, self.groups * batch)
        return out.view(batch, self.out_channels, *out.shape[2:])

    # -- the per-sample CPU path of k×k convolutions (kw_mm/layers/per_sample.py)
    # Its backward calls the convolution's backward directly, which takes
    # integer padding only: 'valid' is 0, 'same' is d·(k − 1) split as
    # torch does (the odd extra on the far side, padded onto the input here).

    def _explicit_padding(self) -> Tuple[Tuple[int, ...], Optional[List[int]]]:
        """(symmetric padding, extra F.pad of the input or None)."""
        if not isinstance(self.padding, str):
            return self.padding, None
        if self.padding == 'valid':
            return (0,) * self.ndim, None
        totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
        if all(t % 2 == 0 for t in totals):
            return tuple(t // 2 for t in totals), None
        extra: List[int] = []
        for t in reversed(totals):  # F.pad lists the last dim first
            extra += [t // 2, t - t // 2]
        return (0,) * self.ndim, extra

    def _per_sample_input(self, x: torch.Tensor) -> torch.Tensor:
        extra = self._explicit_padding()[1]
        return x if extra is None else F.pad(x, extra)

    def apply_kernel(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """One sample ``x [1, C, *S]`` (from ``_per_sample_input``) through ``kernel``."""
        return _CONV_FUNCTIONS[self.ndim](x, kernel, None, self.stride,
                                          self._explicit_padding()[0], self.dilation,
                                          self.groups)

    def _taps_macs(self, x: torch.Tensor) -> Optional[int]:
        """Multiply-adds of this layer on ``x`` (from ``_per_sample_input``) where
        its kernels can run as :func:`kw_mm.native.conv2d_taps` and
        :func:`kw_mm.native.fused_conv2d_taps` read them (2-d, one group,
        partitioned) and :func:`kw_mm.native.conv2d_taps_pays`; else None."""
        if not (self.ndim == 2 and self.groups == 1 and self.layer_plan.partitioned):
            return None
        out_h, out_w = native.conv2d_output_size(x.shape[2:], self.kernel_size, self.stride,
                                                 self._explicit_padding()[0], self.dilation)
        kernel_numel = self.out_channels * self.in_channels * math.prod(self.kernel_size)
        if not native.conv2d_taps_pays(kernel_numel, out_h, out_w, self.stride):
            return None
        return x.shape[0] * kernel_numel * out_h * out_w

    def _pointwise_native(self, x: torch.Tensor) -> bool:
        """Whether this 1×1 layer's products run natively on the mixtures as they
        are (:meth:`apply_kernels_native`), at any map size: the same product
        kernel as the reordered kernels' batched product, without reordering."""
        if (self.ndim != 2 or not self.layer_plan.partitioned
                or self.kw_warehouse.plan.private_cells):  # private cells mix strided
            return False
        macs = x.shape[0] * self.out_channels * self.in_channels * self._pointwise_positions(x)
        return native.usable(x, x, macs)

    def _kernel_blocks(self, mixed: torch.Tensor) -> torch.Tensor:
        """``mixed [B, m, cell numel]`` as ``[B, m, cell_out, cell_in]``."""
        wh = self.kw_warehouse.plan
        return mixed.view(mixed.shape[0], -1, wh.cell_out, wh.cell_in)

    def _cell_groups(self) -> Tuple[int, int]:
        return self.layer_plan.out_groups, self.layer_plan.in_groups

    def apply_kernels_native(self, x: torch.Tensor, mixed: torch.Tensor
                             ) -> Optional[torch.Tensor]:
        """All samples ``x [B, C, *S]`` (from ``_per_sample_input``) through their
        mixtures ``[B, m, cell numel]`` with :func:`kw_mm.native.conv2d_taps`,
        which reads the mixtures as they are; None where it does not apply
        (see :meth:`_taps_macs` and :meth:`_pointwise_native`; strided
        mixtures; :func:`kw_mm.native.usable`)."""
        if self._pointwise:
            if not (mixed.is_contiguous() and self._pointwise_native(x)
                    and native.usable(x, mixed, native.MIN_MACS)):
                return None
            return native.conv2d_taps(self._pointwise_input(x), self._kernel_blocks(mixed),
                                      (1, 1), (1, 1), (0, 0), (1, 1), self._cell_groups())
        macs = self._taps_macs(x)
        if macs is None or not mixed.is_contiguous() or not native.usable(x, mixed, macs):
            return None
        return native.conv2d_taps(x, self._kernel_blocks(mixed), self.kernel_size, self.stride,
                                  self._explicit_padding()[0], self.dilation,
                                  self._cell_groups())

    def _pointwise_input(self, x: torch.Tensor) -> torch.Tensor:
        """The positions a 1×1 layer reads (every stride-th one)."""
        if self.stride == (1,) * self.ndim:
            return x
        every = tuple(slice(None, None, s) for s in self.stride)
        return x[(slice(None), slice(None)) + every].contiguous()

    def _pointwise_positions(self, x: torch.Tensor) -> int:
        """How many positions of ``x`` a 1×1 layer reads per sample."""
        return math.prod(-(-n // s) for n, s in zip(x.shape[2:], self.stride))

    def apply_kernels_native_backward(self, grad: torch.Tensor, x: torch.Tensor,
                                      mixed: torch.Tensor, need_x: bool, need_kernel: bool,
                                      reuse_mixed: bool
                                      ) -> Optional[Tuple[Optional[torch.Tensor],
                                                          Optional[torch.Tensor]]]:
        """Gradients of :meth:`apply_kernels_native` for ``x`` and ``mixed`` through
        :func:`kw_mm.native.conv2d_taps_backward` (1×1 layers; k×k ones on
        small maps, strided ones too: see :meth:`_native_backward_geometry`),
        the mixtures' written over ``mixed`` with ``reuse_mixed``; None where
        that does not apply."""
        geometry = self._native_backward_geometry(grad, x)
        if geometry is None or not mixed.is_contiguous():
            return None
        kernels = self._kernel_blocks(mixed)
        grad_x, grad_kernels = native.conv2d_taps_backward(
            geometry[0], kernels, grad, *geometry[1:4], need_x, need_kernel,
            kernels if reuse_mixed else None, self._cell_groups(), stride=geometry[4])
        if grad_x is not None and self._pointwise and self.stride != (1, 1):
            full = grad_x.new_zeros(x.shape)
            full[:, :, ::self.stride[0], ::self.stride[1]] = grad_x
            grad_x = full
        return grad_x, None if grad_kernels is None else grad_kernels.view_as(mixed)

    def _native_backward_geometry(self, grad: torch.Tensor, x: torch.Tensor) -> Optional[tuple]:
        """``(input, kernel_size, padding, dilation, stride)`` of this layer as a
        taps convolution, where its backward runs natively (1×1 layers, at
        stride 1 on the positions they read; k×k ones where
        :func:`kw_mm.native.conv2d_taps_backward_pays`); else None."""
        if grad.dtype != torch.float32 or not native.usable(grad, x, native.MIN_MACS):
            return None
        if self._pointwise:
            return self._pointwise_input(x), (1, 1), (0, 0), (1, 1), (1, 1)
        if (self.ndim != 2 or self.groups != 1 or not self.layer_plan.partitioned
                or self.kw_warehouse.plan.private_cells or not self.fused_grads_apply(grad, x)):
            return None
        if self.stride != (1, 1) and not native.conv2d_taps_backward_pays(
                grad.shape[2], self._grid_w(x), strided=True):
            return None
        return x, self.kernel_size, self._explicit_padding()[0], self.dilation, self.stride

    def strided_native_backward(self, grad: torch.Tensor, x: torch.Tensor) -> bool:
        """Whether this strided k×k layer's backward runs natively
        (:meth:`apply_kernels_native_backward`) even after a per-sample forward:
        on small maps, where per-sample oneDNN backward calls are slowest."""
        return (not self._pointwise and self.stride != (1,) * self.ndim
                and self._native_backward_geometry(grad, x) is not None)

    def fused_grads_apply(self, grad: torch.Tensor, x: torch.Tensor) -> bool:
        """Whether :meth:`fused_mixture_grads` runs for this output gradient and
        input (from ``_per_sample_input``): float32, the grid of output columns
        small enough (:func:`kw_mm.native.conv2d_taps_backward_pays`)."""
        if grad.dtype != torch.float32:
            return False
        if self._pointwise:
            return True
        return native.conv2d_taps_backward_pays(grad.shape[2], self._grid_w(x))

    def _grid_w(self, x: torch.Tensor) -> int:
        """Columns per row of this k×k layer's taps grid (of each phase, for stride > 1)."""
        return -(-(x.shape[3] + 2 * self._explicit_padding()[0][1]) // self.stride[1])

    def fused_mixture_grads(self, grad: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor,
                            cells: torch.Tensor, need_alpha: bool, need_cells: bool
                            ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Gradients of :meth:`apply_fused` for ``alpha`` and ``cells`` through
        :func:`kw_mm.native.fused_kernel_grads` (the mixtures' gradient never
        stored), where :meth:`fused_grads_apply`."""
        if self._pointwise:
            x, geometry = self._pointwise_input(x), ((1, 1), (1, 1), (0, 0), (1, 1))
        else:
            geometry = (self.kernel_size, self.stride, self._explicit_padding()[0],
                        self.dilation)
        return native.fused_kernel_grads(x, grad, alpha, cells, *geometry,
                                         self._cell_groups(), need_alpha, need_cells)

    def _fused(self, x: torch.Tensor, alpha: torch.Tensor) -> Optional[torch.Tensor]:
        """The layer through :func:`kw_mm.native.fused_conv2d_taps` (the kernels
        assembled strip by strip inside the convolution, never stored): in
        inference, and while training with ``recompute_kernels`` (the backward
        pass rebuilds the mixtures, :class:`~.per_sample.FusedKernelConv`), for
        2-d layers with one group and shared cells, any cell groups: 1×1 ones
        where :func:`kw_mm.native.fused_pointwise_pays`, k×k ones where
        :func:`kw_mm.native.conv2d_taps_pays`; else None."""
        cells = self.kw_warehouse.cells
        graph = torch.is_grad_enabled() and (x.requires_grad or alpha.requires_grad
                                             or cells.requires_grad)
        if graph and not self.recompute_kernels:
            return None  # the backward pass needs the kernels: assembled and kept
        if not self._fused_applies(x, alpha):
            return None
        cells = cells.reshape(self.kw_warehouse.plan.num_cells, -1).to(x.dtype)
        if graph:
            return FusedKernelConv.apply(x, alpha, cells, self)
        return self.apply_fused(x, alpha, cells)

    def _basis_forward(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Inference (no autograd graph) through the layer's cached kernel basis
        (:mod:`.basis`) with :func:`kw_mm.native.fused_conv2d_taps`, where the
        fused path applies and :func:`~.basis.basis_pays`; else None. A forward
        that builds a graph drops the cached basis."""
        cache = self._inference_basis
        cells = self.kw_warehouse.cells
        if torch.is_grad_enabled() and (x.requires_grad or cells.requires_grad
                                        or self.attention.fc2.weight.requires_grad):
            cache.clear()
            return None
        if not self.inference_basis or is_exporting() or x.is_cuda or hooked(self.attention):
            return None
        beta = with_beta(self.attention)
        rows = basis_rows(self.attention, beta)
        wh = self.kw_warehouse.plan
        if rows is None or not basis_pays(self.layer_plan.num_mixtures, rows, wh.num_cells):
            return None
        x_in = x if self._pointwise else self._per_sample_input(x)
        if not self._fused_applies(x_in, x):
            return None
        basis = cache.get(self.attention, cells.reshape(wh.num_cells, -1).to(x.dtype), beta)
        coefficients = basis_coefficients(self.attention, x, beta).to(x.dtype)
        return self.apply_fused(x_in, coefficients, basis)

    def _fused_applies(self, x: torch.Tensor, alpha: torch.Tensor) -> bool:
        plan, wh = self.layer_plan, self.kw_warehouse.plan
        if wh.private_cells or not (self.ndim == 2 and self.groups == 1 and plan.partitioned):
            return False
        if self._pointwise:
            positions = self._pointwise_positions(x)
            if not native.fused_pointwise_pays(wh.num_cells, positions):
                return False
            macs = x.shape[0] * self.out_channels * self.in_channels * positions
        else:
            macs = self._taps_macs(x)
        return macs is not None and native.usable(x, alpha, macs)

    def apply_fused(self, x: torch.Tensor, alpha: torch.Tensor,
                    cells: torch.Tensor) -> torch.Tensor:
        """:func:`kw_mm.native.fused_conv2d_taps` of ``x`` (from
        ``_per_sample_input``) with the kernels ``alpha @ cells`` (no autograd)."""
        plan = self.layer_plan
        if self._pointwise:
            x, geometry = self._pointwise_input(x), ((1, 1), (1, 1), (0, 0), (1, 1))
        else:
            geometry = (self.kernel_size, self.stride, self._explicit_padding()[0],
                        self.dilation)
        return native.fused_conv2d_taps(x, alpha, cells, *geometry,
                                        cell_groups=(plan.out_groups, plan.in_groups))

    def apply_kernel_backward(self, grad: torch.Tensor, x: torch.Tensor, kernel: torch.Tensor,
                              need_x: bool, need_kernel: bool
                              ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Gradients of :meth:`apply_kernel` for ``x`` and ``kernel`` (None where not needed)."""
        grad_x, grad_kernel, _ = torch.ops.aten.convolution_backward(
            grad, x, kernel, None, self.stride, self._explicit_padding()[0], self.dilation,
            False, (0,) * self.ndim, self.groups, [need_x, need_kernel, False])
        return grad_x, grad_kernel

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The straightforward computation, kept for tests of the fast paths:
        assemble each sample's kernel and convolve each sample on its own."""
        weight = self.assemble_kernel(self.attention(x).to(x.dtype))
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.cat([self._conv(x[b:b + 1], weight[b], self.groups, bias)
                          for b in range(x.shape[0])])

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
            ``options``; not ``sharing``, ``share_across_shapes`` or
            ``inference_basis``.
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
                                excluded=SHARING_KEYS + ('inference_basis',))
        kernel = KernelShape(name or 'KWLinear', out_features, in_features, (1,))
        self._setup_kw(kernel, in_features, warehouse, options)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[-1] != self.in_features:
            raise ValueError(f'KWLinear expects input [..., {self.in_features}], got shape '
                             f'{tuple(x.shape)}')
        batch = x.shape[0]
        tokens = x.reshape(batch, -1, self.in_features)
        alpha = self.attention(tokens.mean(1)).to(x.dtype)
        out = self._with_kernel(alpha, lambda w: torch.bmm(tokens, w.flatten(2).transpose(1, 2)))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample ``F.linear`` with each sample's assembled weight (for tests)."""
        batch = x.shape[0]
        tokens = x.reshape(batch, -1, self.in_features)
        weight = self.assemble_kernel(self.attention(tokens.mean(1)).to(x.dtype)).flatten(2)
        out = torch.stack([F.linear(tokens[b], weight[b], self.bias) for b in range(batch)])
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f'in_features={self.in_features}, out_features={self.out_features}, '
                f'bias={self.bias is not None}, mixtures={self.layer_plan.num_mixtures}, '
                f'warehouse_cells={self.kw_warehouse.num_cells}')
