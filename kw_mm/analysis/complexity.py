"""FLOPs and parameters of models with KW layers, counted with mmengine's analysis.

mmengine's :class:`~mmengine.analysis.FlopAnalyzer` traces a model with
``torch.jit`` and counts the operators it records. A KW layer picks its
computation at run time and, under a trace, records its batch-agnostic export
operations (im2col by a one-hot convolution), which would be counted as
convolutions. So while counting, every KW layer runs the paper's computation
in plain operators, each counted by mmengine's own handles:

- **attention**: global average pooling of the input (one addition per input
  element, as mmengine counts ``adaptive_avg_pool2d``), then the attention
  module: fc1, its norm, fc2 (and the non-local basis' fc3);
- **assembly** (paper Eq. 3): ``α [B, m, n] @ cells [n, cell numel]``, i.e.
  ``B·m·n·cell numel`` multiply-adds (``n``: the warehouse's cells, or a
  mixture's own cells without sharing);
- **convolution**: each sample convolved with its assembled kernel, as one
  grouped convolution over the batch, which costs what a static convolution
  of the same shape costs; a ``KWLinear`` multiplies its tokens with its
  assembled weight (a ``bmm``).

The counting forward gives the same outputs as the layer (to float rounding).
Everything else in the model is counted by mmengine as it is, plus the two
products of ``scaled_dot_product_attention`` (Vision Transformers), which
mmengine does not count. Like mmengine, the counts are multiply-accumulates
(one fused multiply-add is one FLOP); element-wise operations (activations,
softmax, CAF's normalisation, residual additions, biases) are not counted.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math
import types
from collections import Counter
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    MutableMapping,
    Optional,
    Sequence,
    Tuple,
)

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.kw_conv import KWLayer, KWLinear
from ..layers.warehouse import KernelWarehouse

#: the FLOP categories, in report order
FLOP_PARTS = ('kw_conv', 'kw_assembly', 'kw_attention', 'conv', 'linear', 'norm', 'other')
#: what each category holds
FLOP_PART_NAMES = {
    'kw_conv': 'KW layers: conv / linear with the assembled kernels',
    'kw_assembly': 'KW layers: kernel assembly (Eq. 3)',
    'kw_attention': 'KW layers: attention (pooling, FCs, norm)',
    'conv': 'plain convolutions',
    'linear': 'plain linear layers',
    'norm': 'normalisation layers',
    'other': 'other (pooling, upsampling, attention products)',
}
#: the parameter categories, in report order
PARAM_PARTS = ('kw_cells', 'kw_attention', 'other')
PARAM_PART_NAMES = {
    'kw_cells': 'KW warehouse cells',
    'kw_attention': 'KW attentions',
    'other': 'other parameters',
}
_NORM_OPS = ('batch_norm', 'group_norm', 'layer_norm', 'instance_norm')
_POOL_OPS = ('adaptive_avg_pool1d', 'adaptive_avg_pool2d', 'adaptive_avg_pool3d')
_POOLS = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def _sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``scaled_dot_product_attention(q [..., L, E], k [..., S, E], v [..., S, Ev])``:
    the two products ``q @ kᵀ`` and ``softmax(·) @ v``, ``L·S·(E + Ev)`` per leading
    index (mmengine has no count for it; the softmax is not counted)."""
    from mmengine.analysis.jit_handles import get_shape
    q, k, v = (get_shape(value) for value in inputs[:3])
    return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


@dataclass
class Complexity:
    """FLOPs and parameters of one model at one input.

    Attributes:
        flops (int): Multiply-accumulates of one forward of ``inputs``.
        flop_parts (dict): ``flops`` split over :data:`FLOP_PARTS`.
        params (int): Parameters (each shared tensor once).
        param_parts (dict): ``params`` split over :data:`PARAM_PARTS`.
        kw_layers (int): The model's KW layers.
        input_shape (tuple): The shape of the input counted.
        uncounted_ops (list): Operators mmengine has no count for (element-wise
            ones), for the record.
    """
    flops: int
    flop_parts: Dict[str, int]
    params: int
    param_parts: Dict[str, int]
    kw_layers: int
    input_shape: Tuple[int, ...]
    uncounted_ops: List[str] = field(default_factory=list)


def kw_layers(model: nn.Module) -> List[Tuple[str, KWLayer]]:
    """``(name, layer)`` of every KW layer of ``model``, in ``named_modules()`` order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, KWLayer)]


def _pool(x: torch.Tensor) -> torch.Tensor:
    """Global average pooling ``[B, C, *S] → [B, C]``, as an operator mmengine counts."""
    return _POOLS[x.dim() - 2](x, 1).flatten(1)


def _assemble(layer: KWLayer, alpha: torch.Tensor) -> torch.Tensor:
    """The mixtures ``[B, m, cell numel]`` as one (broadcast) matmul per warehouse layout."""
    warehouse = layer.kw_warehouse
    cells = warehouse.cells.reshape(warehouse.num_cells, -1).to(alpha.dtype)
    private = warehouse.plan.private_cells
    if not private:
        return torch.matmul(alpha, cells)
    # without sharing, mixture i mixes only its own cells [i·k, (i + 1)·k)
    cells = cells.view(layer.layer_plan.num_mixtures, private, -1)
    return torch.matmul(alpha.unsqueeze(2), cells).squeeze(2)


def _counting_conv_forward(layer, x: torch.Tensor) -> torch.Tensor:
    geometry = layer.geometry
    alpha = layer.attention(_pool(x)).to(x.dtype)
    weight = layer.mixture_to_kernel(_assemble(layer, alpha))  # [B, out, in/groups, *k]
    batch = x.shape[0]
    if geometry.extra_pad is not None:
        x = F.pad(x, geometry.extra_pad)
    out = geometry.conv(x.reshape(1, -1, *x.shape[2:]),
                        weight.reshape(-1, *weight.shape[2:]), None, geometry.stride,
                        geometry.conv_padding, geometry.dilation, batch * geometry.groups)
    out = out.view(batch, -1, *out.shape[2:])
    if layer.bias is not None:
        out = out + layer.bias.to(out.dtype).view(geometry.bias_view)
    return out


def _counting_linear_forward(layer, x: torch.Tensor) -> torch.Tensor:
    tokens = layer._tokens(x)  # [B, T, in]
    pooled = tokens[:, 0] if tokens.shape[1] == 1 else _pool(tokens.transpose(1, 2))
    alpha = layer.attention(pooled).to(x.dtype)
    weight = layer.mixture_to_kernel(_assemble(layer, alpha)).flatten(2)  # [B, out, in]
    out = torch.bmm(tokens, weight.transpose(1, 2))
    if layer.bias is not None:
        out = out + layer.bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], layer.out_features)


@contextlib.contextmanager
def counting_forward(model: nn.Module) -> Iterator[List[Tuple[str, KWLayer]]]:
    """Inside the block, every KW layer of ``model`` runs the countable forward
    described in this module's docstring; yields ``kw_layers(model)``."""
    layers = kw_layers(model)
    for _, layer in layers:
        impl = _counting_linear_forward if isinstance(layer, KWLinear) else \
            _counting_conv_forward
        layer.forward = types.MethodType(impl, layer)
    try:
        yield layers
    finally:
        for _, layer in layers:
            del layer.forward


def _param_parts(model: nn.Module, layers: Sequence[Tuple[str, KWLayer]]) -> Dict[str, int]:
    seen = set()

    def count(params) -> int:
        total = 0
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total

    parts = dict(kw_cells=count(m.cells for m in model.modules()
                                if isinstance(m, KernelWarehouse)))
    # a layer's own warehouse is counted above, its attention here
    parts['kw_attention'] = count(p for _, layer in layers for p in layer.attention.parameters())
    parts['other'] = count(model.parameters())
    return parts


def _op_category(op: str) -> str:
    if op == 'conv':
        return 'conv'
    if op in ('linear', 'addmm'):
        return 'linear'
    if op in _NORM_OPS:
        return 'norm'
    return 'other'


def model_complexity(model: nn.Module, inputs: Any,
                     forward: Optional[Callable[..., Any]] = None) -> Complexity:
    """Count the FLOPs (multiply-accumulates) and parameters of ``model``.

    Args:
        model (nn.Module): The model (its mode is left as it is: use eval mode
            for inference counts).
        inputs (Tensor | tuple): The input of one forward; its first
            dimension is the batch.
        forward (callable, optional): What to run instead of ``model``'s
            ``forward`` (e.g. ``model.extract_feat``), called with ``inputs``.

    Returns:
        Complexity: The counts for the whole batch of ``inputs``, split into
        the KW layers' convolution, assembly and attention and the rest of
        the model's operators.
    """
    from mmengine.analysis import FlopAnalyzer
    from mmengine.analysis.jit_handles import elementwise_flop_counter

    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    traced: nn.Module = model
    if forward is not None:  # traced as a module, so the scopes keep the model's names
        traced = _ForwardAs(model, forward)
    prefix = '' if forward is None else 'model'

    def scope(*names: str) -> str:
        return analyzer.canonical_module_name('.'.join(n for n in (prefix, *names) if n))
    with counting_forward(model) as layers, torch.no_grad():
        analyzer = FlopAnalyzer(traced, inputs)
        pool = elementwise_flop_counter(1, 0)  # one addition per input element
        analyzer.set_op_handle(**{f'aten::{op}': pool for op in _POOL_OPS})
        analyzer.set_op_handle(**{'aten::scaled_dot_product_attention': _sdpa_flop_jit})
        analyzer.unsupported_ops_warnings(False)
        analyzer.uncalled_modules_warnings(False)
        analyzer.tracer_warnings('none')
        total = analyzer.total()
        by_operator = analyzer.by_module_and_operator()
        uncounted = sorted(analyzer.unsupported_ops().keys())

    parts = dict.fromkeys(FLOP_PARTS, 0)
    rest = Counter(by_operator.get('', {}))
    for name, layer in layers:
        ops = Counter(by_operator.get(scope(name), {}))
        attention = Counter(by_operator.get(scope(name, 'attention'), {}))
        rest.subtract(ops)
        own = ops - attention
        parts['kw_attention'] += sum(attention.values()) + sum(own[op] for op in _POOL_OPS)
        parts['kw_assembly'] += own['matmul']
        parts['kw_conv'] += own['conv'] + own['bmm']
        unexpected = set(own) - {'matmul', 'conv', 'bmm', *_POOL_OPS}
        if unexpected:  # the counting forward records nothing else
            raise RuntimeError(f'KW layer {name!r} recorded unexpected operators '
                               f'{sorted(unexpected)} while counting')
    for op, flops in rest.items():
        parts[_op_category(op)] += flops
    if sum(parts.values()) != total:
        raise RuntimeError(f'the FLOP parts {parts} do not add up to the total {total}')
    param_parts = _param_parts(model, layers)
    return Complexity(int(total), {k: int(v) for k, v in parts.items()},
                      sum(param_parts.values()), param_parts, len(layers),
                      tuple(inputs[0].shape), uncounted)


class _ForwardAs(nn.Module):
    """``model`` traced through another of its methods (``extract_feat``)."""

    def __init__(self, model: nn.Module, forward: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self._call = forward

    def forward(self, *inputs):
        return self._call(*inputs)


def plain_counterpart(model_cfg: Mapping) -> Any:
    """A copy of a model config with every ``kw_cfg`` set to None.

    Every dict with a ``kw_cfg`` key, and every dict whose registered type
    takes a ``kw_cfg`` argument (e.g. ``KWLinearClsHead``, which defaults to
    a KW classifier), gets ``kw_cfg=None`` (and loses ``kw_warehouses``, the
    per-warehouse overrides): the kw_mm backbones and head then build their
    plain networks, with the same module names.
    """
    plain = copy.deepcopy(model_cfg)
    _strip_kw_cfg(plain)
    return plain


def _takes_kw_cfg(kind: Any) -> bool:
    from mmengine.registry import MODELS
    cls = kind if isinstance(kind, type) else MODELS.get(kind) if isinstance(kind, str) else None
    try:
        return cls is not None and 'kw_cfg' in inspect.signature(cls).parameters
    except (TypeError, ValueError):  # no signature to read
        return False


def _strip_kw_cfg(node: Any) -> None:
    if isinstance(node, MutableMapping):
        for value in node.values():
            _strip_kw_cfg(value)
        if 'kw_cfg' in node or _takes_kw_cfg(node.get('type')):
            node['kw_cfg'] = None
            node.pop('kw_warehouses', None)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _strip_kw_cfg(value)
