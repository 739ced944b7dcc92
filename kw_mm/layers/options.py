"""The options of KernelWarehouse layers, declared, documented and validated once.

:class:`KWOptions` carries the KW settings from a config's ``kw_cfg`` (or a
layer's keyword arguments) to the warehouse builder, the layers and their
attention. :func:`conv_arguments` checks the ``nn.Conv``-style arguments of a
KW convolution the way ``torch.nn.Conv2d`` does, so that a KW layer refuses
what a plain one refuses; :func:`set_conv_attributes` also sets them on the
layer (KW and the other dynamic convolutions alike).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import InitVar, dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

from .partition import INIT_STRATEGIES, check_budget

#: attention norms (``KWOptions.norm``).
ATTENTION_NORMS = ('BN', 'LN')

#: attention functions of the paper's Table 8 ('caf' is the paper's CAF).
ATTENTION_FUNCTIONS = ('caf', 'softmax', 'sigmoid', 'relu_norm')

#: warehouse sharing ranges (paper Table 6), see ``KWOptions.sharing``.
SHARING_RANGES = ('stage', 'block', 'layer', 'none')

#: options that may differ per warehouse (a backbone's per-warehouse overrides).
PER_WAREHOUSE_KEYS = ('budget', 'cell_in_ratio', 'cell_out_ratio')

#: options about how a backbone shares warehouses among its layers; a layer
#: built on its own owns its warehouse and does not take them as keywords.
SHARING_KEYS = ('sharing', 'share_across_shapes')

_BOOL_KEYS = ('share_across_shapes', 'kernel_partition', 'recompute_kernels', 'inference_basis',
              'omni_attention')


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class KWOptions:
    """The KW settings of a layer or of a whole backbone (its ``kw_cfg``).

    Every option is checked when the object is made; a bad value raises
    naming the option (``kw_cfg.<name>`` for one read from a ``kw_cfg``), the
    value and what is allowed. The object is frozen: use
    :func:`dataclasses.replace` for a variant, which checks again.

    Args:
        budget (float): The convolutional parameter budget b = n / m_t (paper
            §3.3): a warehouse gets n = int(b · m_t) cells for the m_t linear
            mixtures of the layers sharing it. A positive finite number, e.g.
            1/4, 1/2, 1, 2, 4. Defaults to 1.
        reduction (float): Hidden width of each layer's attention as a
            fraction of its input channels (an SE-style bottleneck). A
            positive finite number. Defaults to 1/16 (the released b = 1/2
            MobileNetV2 models and ConvNeXt use 1/32).
        min_hidden (int): Smallest hidden width of an attention, so that
            narrow layers keep a useful one. A positive int. Defaults to 16.
        cell_in_ratio (float, optional): Input channels of a cell as a
            fraction of the gcd of the input channels (per group) of the
            layers sharing a warehouse; ``gcd · ratio`` must be a whole number
            dividing the gcd. None gives 1 for b ≥ 1 and 1/2 below (paper
            appendix A.3). Must stay None with ``kernel_partition=False``.
            Defaults to None.
        cell_out_ratio (float, optional): The same for output channels.
            Defaults to None.
        norm (str): Norm of the attentions' hidden layer: ``'BN'``
            (BatchNorm1d) or ``'LN'`` (LayerNorm; ConvNeXt's default).
            Defaults to 'BN'.
        nonlocal_basis_ratio (float): In [0, 1). When above 0, the logits of
            the cells outside a layer's own range come from a low-rank basis
            of ``int(ratio · non-local cells)`` (at least 16) rows, as in the
            released ResNet50 1/2x (0.0625). Needs a budget below 1 and
            ``kernel_partition=True``. Defaults to 0 (off).
        temperature (float): Initial temperature τ in [0, 1] of the attention
            ``α = (1 − τ)·f(z) + τ·β`` (paper Eq. 4); 1 at the start of
            training, 0 for a trained model. ``KWTemperatureHook`` and
            :func:`set_temperature` change it later. Defaults to 1.
        attention_fn (str): How a mixture's logits become attentions (paper
            Table 8): ``'caf'`` z / Σ|z| (the paper's), ``'softmax'``,
            ``'sigmoid'``, ``'relu_norm'`` max(z, 0) / Σ|z|. Defaults to 'caf'.
        init (str): The attention initialisation β (paper Table 13):
            ``'one_to_one'`` (the paper's), ``'all_to_one'``, ``'none'`` (no
            τ·β term), ``'n_to_one'`` (b ≥ 2) or ``'one_to_n'`` (b < 1).
            Defaults to 'one_to_one'.
        sharing (str): Which layers of a backbone share a warehouse (paper
            Table 6): ``'stage'`` (the released layout), ``'block'`` (the
            layers of one residual block), ``'layer'`` (each layer its own
            warehouse) or ``'none'`` (each mixture its own int(b) cells; b
            must be a whole number). A backbone option. Defaults to 'stage'.
        share_across_shapes (bool): Whether layers of different kernel shapes
            share a warehouse (paper Table 7); False splits each warehouse by
            kernel shape. A backbone option. Defaults to True.
        kernel_partition (bool): Partition kernels into cells (the paper's
            method). False makes a cell a whole kernel and a layer one
            mixture: vanilla dynamic convolution (DY-Conv with b = 4 and
            per-layer warehouses; paper §3.5, Table 5). Defaults to True.
        recompute_kernels (bool): While training, rebuild each layer's
            per-sample kernels in the backward pass instead of keeping them:
            saves B times a layer's kernel of memory for one extra assembly
            (on CPU the forward then runs fused where it can, never storing
            them). Defaults to True.
        inference_basis (bool): In inference on CPU, let KW convolutions mix
            each sample's kernels from a cached basis of cell-sized rows
            where that is cheaper than mixing the warehouse's cells
            (:mod:`kw_mm.layers.basis`). Ignored by ``KWLinear``. Defaults
            to True.
        omni_attention (bool): KW* (paper appendix A.4, Table 17): each
            layer's attention also computes ODConv's attentions along the
            kernel's spatial positions, input channels and output channels
            (sigmoids of three more FC layers on the attention's hidden
            vector; none spatially for 1×1 layers; unlike ODConv, depth-wise
            layers too get output-channel attentions, which gives the paper's
            12.51M for MobileNetV2 KW* (4×)), which multiply each sample's
            assembled kernel. Such a layer runs only through the paths that
            convolve with the whole per-sample kernel
            (:mod:`kw_mm.layers.execution.dense`). Convolutions only (not
            ``KWLinear``). Defaults to False.
        where (str): Prefix naming the options in error messages, e.g.
            ``'kw_cfg.'``. Not stored. Defaults to ''.
    """
    budget: float = 1.0
    reduction: float = 1 / 16
    min_hidden: int = 16
    cell_in_ratio: Optional[float] = None
    cell_out_ratio: Optional[float] = None
    norm: str = 'BN'
    nonlocal_basis_ratio: float = 0.0
    temperature: float = 1.0
    attention_fn: str = 'caf'
    init: str = 'one_to_one'
    sharing: str = 'stage'
    share_across_shapes: bool = True
    kernel_partition: bool = True
    recompute_kernels: bool = True
    inference_basis: bool = True
    omni_attention: bool = False
    where: InitVar[str] = ''

    def __post_init__(self, where: str) -> None:
        p = where
        object.__setattr__(self, 'budget', check_budget(self.budget, f'{p}budget'))
        if not _is_number(self.reduction) or not (math.isfinite(self.reduction)
                                                   and self.reduction > 0):
            raise ValueError(f'{p}reduction must be a positive finite number (the attention '
                             f"hidden width / in_channels, e.g. 1/16), got {self.reduction!r}")
        if (isinstance(self.min_hidden, bool) or not isinstance(self.min_hidden, int)
                or self.min_hidden < 1):
            raise ValueError(f'{p}min_hidden must be a positive int (the smallest attention '
                             f'hidden width, e.g. 16), got {self.min_hidden!r}')
        for key in ('cell_in_ratio', 'cell_out_ratio'):
            ratio = getattr(self, key)
            if ratio is not None and not (_is_number(ratio) and math.isfinite(ratio)
                                          and ratio > 0):
                raise ValueError(f'{p}{key} must be None or a positive finite number (e.g. '
                                 f'0.5, 1), got {ratio!r}')
        if self.norm not in ATTENTION_NORMS:
            raise ValueError(f"{p}norm must be 'BN' or 'LN', got {self.norm!r}")
        ratio = self.nonlocal_basis_ratio
        if not _is_number(ratio) or not 0 <= ratio < 1:
            raise ValueError(f'{p}nonlocal_basis_ratio must be in [0, 1), got {ratio!r}')
        if ratio > 0 and self.budget >= 1:
            raise ValueError(f'{p}nonlocal_basis_ratio={ratio!r} needs a budget below 1 (its '
                             f'layers own int(b·m) local cells), got budget={self.budget!r}')
        if self.attention_fn not in ATTENTION_FUNCTIONS:
            raise ValueError(f'{p}attention_fn must be one of {ATTENTION_FUNCTIONS}, '
                             f'got {self.attention_fn!r}')
        if self.init not in INIT_STRATEGIES:
            raise ValueError(f'{p}init must be one of {INIT_STRATEGIES}, got {self.init!r}')
        tau = self.temperature
        if not _is_number(tau) or not 0 <= tau <= 1:  # NaN fails the comparison too
            raise ValueError(f'{p}temperature must be in [0, 1], got {tau!r}')
        if self.sharing not in SHARING_RANGES:
            raise ValueError(f'{p}sharing must be one of {SHARING_RANGES}, got {self.sharing!r}')
        for key in _BOOL_KEYS:
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f'{p}{key} must be True or False, got {getattr(self, key)!r}')
        if not self.kernel_partition and ratio > 0:
            raise ValueError(f'{p}nonlocal_basis_ratio={ratio!r} needs kernel_partition=True')

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        """The option names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kw_cfg(cls, kw_cfg: Optional[Mapping[str, Any]], extra_keys: Iterable[str] = (),
                    defaults: Optional[Mapping[str, Any]] = None) -> Optional['KWOptions']:
        """The options of a backbone's or head's ``kw_cfg``; None stays None.

        Args:
            kw_cfg (dict, optional): Option values by name; missing ones take
                ``defaults``, then the class defaults.
            extra_keys (Iterable[str]): Keys that a caller reads from
                ``kw_cfg`` itself: allowed, not options.
            defaults (dict, optional): The caller's own defaults (e.g.
                ConvNeXt's ``norm='LN'``).

        Raises:
            TypeError: ``kw_cfg`` is not a dict.
            ValueError: an unknown key (a typo must not be silently ignored),
                naming the allowed ones, or a bad value.
        """
        if kw_cfg is None:
            return None
        if not isinstance(kw_cfg, Mapping):
            raise TypeError(f'kw_cfg must be a dict or None, got {type(kw_cfg).__name__}')
        names = cls.names()
        allowed = set(names) | set(extra_keys)
        unknown = sorted(set(kw_cfg) - allowed)
        if unknown:
            raise ValueError(f'kw_cfg has unknown key(s) {unknown}; allowed keys are '
                             f'{sorted(allowed)}')
        values = dict(defaults or {})
        values.update((key, value) for key, value in kw_cfg.items() if key in names)
        return cls(**values, where='kw_cfg.')

    def as_dict(self) -> Dict[str, Any]:
        """The options as a plain dict (a complete ``kw_cfg``)."""
        return dataclasses.asdict(self)


def layer_options(layer: str, options: Optional[KWOptions], keywords: Mapping[str, Any],
                  excluded: Sequence[str] = SHARING_KEYS) -> KWOptions:
    """The options of a KW layer from its ``options`` object and KW keyword arguments.

    Keywords override the object's values (or the defaults without one).
    ``excluded`` options are not taken as keywords by the layer.

    Raises:
        TypeError: an unknown or excluded keyword, or ``options`` of another type.
    """
    if options is not None and not isinstance(options, KWOptions):
        raise TypeError(f'{layer}: options must be a KWOptions or None, got '
                        f'{type(options).__name__}')
    allowed = [name for name in KWOptions.names() if name not in excluded]
    unknown = sorted(set(keywords) - set(allowed))
    if unknown:
        raise TypeError(f'{layer}() got unexpected keyword argument(s) {unknown}; its KW '
                        f'options are {allowed}')
    if options is None:
        return KWOptions(**keywords)
    return dataclasses.replace(options, **keywords) if keywords else options


IntOrTuple = Union[int, Sequence[int]]


def _ints(value: Any, ndim: int, name: str, least: int) -> Tuple[int, ...]:
    values = (value,) * ndim if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        values = tuple(values)
    except TypeError:
        values = None
    if (values is None or len(values) != ndim
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= least
                       for v in values)):
        what = 'a positive int' if least > 0 else 'an int >= 0'
        raise ValueError(f'{name} must be {what} or a tuple of {ndim} such ints, '
                         f'got {value!r}')
    return values


def conv_arguments(ndim: int, in_channels: int, out_channels: int, kernel_size: IntOrTuple,
                   stride: IntOrTuple, padding: Union[IntOrTuple, str], dilation: IntOrTuple,
                   groups: int, padding_mode: str
                   ) -> Tuple[Tuple[int, ...], Tuple[int, ...], Union[Tuple[int, ...], str],
                              Tuple[int, ...]]:
    """Check a KW convolution's ``nn.Conv``-style arguments as ``torch.nn.Conv2d`` does.

    Returns:
        tuple: ``(kernel_size, stride, padding, dilation)`` with the ints
        expanded to tuples of ``ndim`` (a padding string is kept).
    """
    for label, value in (('in_channels', in_channels), ('out_channels', out_channels),
                         ('groups', groups)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f'{label} must be a positive int, got {value!r}')
    if in_channels % groups or out_channels % groups:
        raise ValueError(f'in_channels={in_channels} and out_channels={out_channels} must both '
                         f'be divisible by groups={groups}')
    if padding_mode != 'zeros':
        raise ValueError(f"padding_mode must be 'zeros' for KW convolutions, got {padding_mode!r}")
    kernel_size = _ints(kernel_size, ndim, 'kernel_size', 1)
    stride = _ints(stride, ndim, 'stride', 1)
    dilation = _ints(dilation, ndim, 'dilation', 1)
    if isinstance(padding, str):
        if padding not in ('same', 'valid'):
            raise ValueError(f"padding must be 'same', 'valid', an int >= 0 or a tuple of "
                             f'{ndim} such ints, got {padding!r}')
        if padding == 'same' and stride != (1,) * ndim:
            raise ValueError(f"padding='same' needs stride 1 (as in torch.nn.Conv{ndim}d), got "
                             f'stride={stride}')
    else:
        padding = _ints(padding, ndim, 'padding', 0)
    return kernel_size, stride, padding, dilation


def set_conv_attributes(module: Any, in_channels: int, out_channels: int,
                        kernel_size: IntOrTuple, stride: IntOrTuple,
                        padding: Union[IntOrTuple, str], dilation: IntOrTuple, groups: int,
                        padding_mode: str) -> None:
    """Check ``nn.Conv``-style arguments (:func:`conv_arguments`, ``module.ndim``
    dimensions) and set them on ``module`` as ``torch.nn.Conv2d`` does, with
    ``transposed`` and ``output_padding``, which code written for ``nn.Conv``
    layers reads."""
    ndim = module.ndim
    module.kernel_size, module.stride, module.padding, module.dilation = conv_arguments(
        ndim, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
        padding_mode)
    module.in_channels = in_channels
    module.out_channels = out_channels
    module.groups = groups
    module.padding_mode = padding_mode
    module.transposed = False
    module.output_padding = (0,) * ndim
