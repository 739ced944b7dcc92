"""MobileNetV2 with KernelWarehouse convolutions (paper §4, appendix A.3, Table 14).

Module names follow the authors' released ``kw*_mobilenetv2_*`` models (the
torchvision MobileNetV2 layout), so their checkpoints convert by a prefix
rename: ``features.0`` is the stem (conv, BN, ReLU6), ``features.1`` …
``features.17`` the inverted residual blocks and ``features.18`` the final
1×1 convolution. In a block, ``conv`` is ``[expansion (conv, BN, ReLU6),
depth-wise (conv, BN, ReLU6), reduction conv, BN]``; blocks with expansion
ratio 1 have no expansion, so their depth-wise part is ``conv.0``.

Warehouses are shared by *KW stages*: the seven rows of the architecture
table map to KW stages ``(1, 2, 3, 4, 5, 6, 6)``, and the first block of a
row whose KW stage differs from the previous row's draws from the previous
KW stage's warehouses (the "reassigned stages" of appendix A.3 / Table 15);
the stem is KW stage 0 with a warehouse of its own, the final 1×1
convolution belongs to the last KW stage. Which layers of a KW stage share
a warehouse is the layout (``kw_layout``), described as data by
:func:`mobilenet_v2_kw_layout`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from mmcv.cnn import build_activation_layer, build_norm_layer
from mmengine.registry import MODELS
from torch import nn

from ...layers.builder import LayerSpec, WarehouseBuilder
from ...layers.dynamic import DynamicConvBuilder
from .aliases import AliasGuard, ReadOnlyAlias, alias
from .checkpointing import check_with_cp, run_block
from .utils import (
    DEFAULT_KW_CFG,
    KWBaseBackbone,
    check_out_indices,
    conv_configs,
    freeze_modules,
)

#: the KW layouts :class:`KWMobileNetV2` can build (see its docstring).
KW_LAYOUTS = ('pointwise_depthwise', 'expansion_depthwise_reduction', 'compact')

#: warehouse options of the stem and depth-wise warehouses in the compact layout.
_COMPACT_FULL = dict(budget=1.0, cell_in_ratio=1.0, cell_out_ratio=1.0)


def make_divisible(value: float, divisor: int = 8, min_ratio: float = 0.9) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least
    ``divisor``), going up one step when rounding lost more than 10 %."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < min_ratio * value:
        new_value += divisor
    return new_value


@dataclass(frozen=True)
class BlockSetting:
    """One inverted residual block of the network.

    Args:
        index (int): Position in ``features`` (1..17 for the standard table).
        stage (int): Row of the architecture table, 1..7 (the backbone's
            stage for ``out_indices`` and ``frozen_stages``).
        kw_stage (int): The KW stage whose warehouses the block draws from.
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        hidden_channels (int): Channels after the expansion.
        stride (int): Stride of the depth-wise convolution.
        expand_ratio (int): Expansion ratio t.
    """
    index: int
    stage: int
    kw_stage: int
    in_channels: int
    out_channels: int
    hidden_channels: int
    stride: int
    expand_ratio: int

    @property
    def expansion_name(self) -> Optional[str]:
        return None if self.expand_ratio == 1 else f'features.{self.index}.conv.0.0'

    @property
    def depthwise_name(self) -> str:
        return f'features.{self.index}.conv.{0 if self.expand_ratio == 1 else 1}.0'

    @property
    def reduction_name(self) -> str:
        return f'features.{self.index}.conv.{1 if self.expand_ratio == 1 else 2}'


def block_settings(widen_factor: float) -> Tuple[int, List[BlockSetting], int]:
    """Channels and KW stages of every block of :class:`KWMobileNetV2`.

    Returns:
        tuple: stem channels, the blocks in order, and the channels of the
        final 1×1 convolution.
    """
    arch = KWMobileNetV2.arch_settings
    kw_stages = KWMobileNetV2.kw_stage_settings
    stem = make_divisible(32 * widen_factor)
    blocks: List[BlockSetting] = []
    channels = stem
    index = 1
    for row, (t, c, n, s) in enumerate(arch):
        out_channels = make_divisible(c * widen_factor)
        for i in range(n):
            kw_stage = kw_stages[row]
            if i == 0 and row > 0 and kw_stages[row] != kw_stages[row - 1]:
                kw_stage = kw_stages[row - 1]  # reassigned to the previous KW stage
            blocks.append(BlockSetting(index, row + 1, kw_stage, channels, out_channels,
                                       int(round(channels * t)), s if i == 0 else 1, t))
            channels = out_channels
            index += 1
    last = make_divisible(1280 * max(1.0, widen_factor))
    return stem, blocks, last


def default_kw_layout(budget: float) -> str:
    """The layout of the released model with budget ``budget`` (appendix A.3):
    ``'compact'`` below 1, ``'expansion_depthwise_reduction'`` from 4 on,
    ``'pointwise_depthwise'`` in between."""
    if budget < 1:
        return 'compact'
    return 'expansion_depthwise_reduction' if budget >= 4 else 'pointwise_depthwise'


def mobilenet_v2_kw_layout(widen_factor: float, layout: str, in_channels: int = 3
                           ) -> Tuple[List[LayerSpec], Dict[str, Dict[str, float]]]:
    """The KW layers of the authors' released MobileNetV2s, in ``modules()`` order.

    Layouts (warehouse keys in brackets; ``s`` is the KW stage):

    * ``'pointwise_depthwise'`` (released b = 1): every convolution is KW;
      per KW stage the depth-wise convolutions share one warehouse
      (``stage{s}.depthwise``) and all point-wise ones, expansion and
      reduction, another (``stage{s}.pointwise``).
    * ``'expansion_depthwise_reduction'`` (released b = 4): every
      convolution is KW; per KW stage three warehouses, ``stage{s}.depthwise``,
      ``stage{s}.expansion`` and ``stage{s}.reduction``.
    * ``'compact'`` (released b = 1/2): the stem, every depth-wise
      convolution and the point-wise convolutions of the last KW stage
      (the rows with 160 and 320 channels except the reassigned first block,
      and the final 1×1 convolution) are KW, with the warehouses of the
      previous layout; the other point-wise convolutions are plain. The stem
      and depth-wise warehouses use b = 1 with gcd cells whatever the
      budget (returned as overrides); the point-wise ones use ``kw_cfg``.

    The stem (``features.0.0``) owns warehouse ``stem`` in every layout. The
    layers are listed in ``modules()`` order, which for MobileNetV2 is also
    the order in which the authors' code constructs them, so numbering the
    warehouses by first appearance here reproduces the released numbering.

    Returns:
        tuple: the layer specs, and per-warehouse option overrides.
    """
    if layout not in KW_LAYOUTS:
        raise ValueError(f'kw_layout must be one of {KW_LAYOUTS}, got {layout!r}')
    stem, blocks, last = block_settings(widen_factor)
    last_kw_stage = blocks[-1].kw_stage
    specs = [LayerSpec('features.0.0', stem, in_channels, (3, 3), 'stem')]
    overrides: Dict[str, Dict[str, float]] = {}
    if layout == 'compact':
        overrides['stem'] = dict(_COMPACT_FULL)

    def pointwise_key(block_kw_stage: int, role: str) -> Optional[str]:
        if layout == 'pointwise_depthwise':
            return f'stage{block_kw_stage}.pointwise'
        if layout == 'compact' and block_kw_stage != last_kw_stage:
            return None  # plain convolution
        return f'stage{block_kw_stage}.{role}'

    for block in blocks:
        dw_key = f'stage{block.kw_stage}.depthwise'
        if layout == 'compact':
            overrides[dw_key] = dict(_COMPACT_FULL)
        if block.expansion_name is not None:
            key = pointwise_key(block.kw_stage, 'expansion')
            if key is not None:
                specs.append(LayerSpec(block.expansion_name, block.hidden_channels,
                                       block.in_channels, (1, 1), key, _block(block)))
        specs.append(LayerSpec(block.depthwise_name, block.hidden_channels, 1, (3, 3), dw_key,
                               _block(block)))
        key = pointwise_key(block.kw_stage, 'reduction')
        if key is not None:
            specs.append(LayerSpec(block.reduction_name, block.out_channels,
                                   block.hidden_channels, (1, 1), key, _block(block)))
    key = pointwise_key(last_kw_stage, 'reduction')
    specs.append(LayerSpec(f'features.{len(blocks) + 1}.0', last, blocks[-1].out_channels, (1, 1),
                           key))
    return specs, overrides


def mobilenet_v2_dynamic_layout(method: str, widen_factor: float) -> List[str]:
    """The layers a ``dynamic_cfg`` method makes dynamic, in ``modules()`` order:
    every convolution of the inverted residual blocks (expansion, depth-wise,
    reduction) and the final 1×1 convolution, and for ``'ODConv'`` also the
    stem. These give the paper's parameter counts: ODConv (4×) 11.52M with
    the stem (its released code keeps the stem plain: 11.51M), DY-Conv (4×)
    12.40M without."""
    _, blocks, _ = block_settings(widen_factor)
    names: List[str] = ['features.0.0'] if method == 'ODConv' else []
    for block in blocks:
        if block.expansion_name is not None:
            names.append(block.expansion_name)
        names += [block.depthwise_name, block.reduction_name]
    return names + [f'features.{len(blocks) + 1}.0']


def _block(block) -> str:
    """Module path of an inverted-residual block (``'features.3'``), for ``sharing='layer'``."""
    return '.'.join(block.depthwise_name.split('.')[:2])


class ConvNormAct(AliasGuard, nn.Sequential):
    """Convolution (``0``), norm (``1``) and activation (``2``), as the authors'
    ``ConvBNReLU``; ``conv``, ``norm`` and ``activate`` are read-only aliases
    of them (the names of mmcv's ``ConvModule``, which mmpretrain uses)."""

    conv = alias('0')
    norm = alias('1')
    activate = alias('2')

    def __init__(self, conv: nn.Module, norm: nn.Module, act: nn.Module) -> None:
        super().__init__(conv, norm, act)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [1×1 expansion] → 3×3 depth-wise → 1×1 reduction,
    with an identity shortcut when stride is 1 and the channels match.

    Args:
        block (BlockSetting): Channels, stride and layer names.
        conv (callable): ``conv(name, in, out, kernel, stride=, padding=,
            groups=)`` returning a KW or plain convolution.
        norm_cfg (dict): Norm config.
        act_cfg (dict): Activation config.
        with_cp (bool): Checkpoint the block while its input requires grad
            (see :mod:`.checkpointing`). Defaults to False.
    """

    def __init__(self, block: BlockSetting, conv, norm_cfg: dict, act_cfg: dict,
                 with_cp: bool = False) -> None:
        super().__init__()
        self.with_cp = with_cp
        self.use_res_connect = block.stride == 1 and block.in_channels == block.out_channels
        hidden = block.hidden_channels
        layers: List[nn.Module] = []
        if block.expansion_name is not None:
            layers.append(ConvNormAct(conv(block.expansion_name, block.in_channels, hidden, 1),
                                      build_norm_layer(norm_cfg, hidden)[1],
                                      build_activation_layer(act_cfg)))
        layers.append(ConvNormAct(
            conv(block.depthwise_name, hidden, hidden, 3, stride=block.stride, padding=1,
                 groups=hidden),
            build_norm_layer(norm_cfg, hidden)[1], build_activation_layer(act_cfg)))
        layers.append(conv(block.reduction_name, hidden, block.out_channels, 1))
        layers.append(build_norm_layer(norm_cfg, block.out_channels)[1])
        self.conv = nn.Sequential(*layers)

    def _inner_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_block(self, self._inner_forward, x)


def _stage_alias(stage: int, target: str) -> ReadOnlyAlias:
    """mmpretrain's ``layer{stage + 1}``: the blocks ``target`` of a stage, as a
    new (unregistered) ``nn.Sequential`` holding the very modules of ``features``."""
    def getter(self: 'KWMobileNetV2') -> nn.Sequential:
        start, end = self.stage_ranges[stage]
        view = nn.Sequential(*(self.features[i] for i in range(start, end)))
        view.training = all(m.training for m in view)
        return view
    return ReadOnlyAlias(target, getter)


@MODELS.register_module()
class KWMobileNetV2(AliasGuard, KWBaseBackbone):
    """MobileNetV2 backbone with KernelWarehouse convolutions.

    The layouts are those of the authors' released models (paper appendix
    A.3; see :func:`mobilenet_v2_kw_layout`): ``'pointwise_depthwise'``
    (b = 1: two warehouses per KW stage), ``'expansion_depthwise_reduction'``
    (b = 4: three) and ``'compact'`` (b = 1/2: KW on the stem, the depth-wise
    convolutions at b = 1 and the last KW stage's point-wise convolutions at
    ``kw_cfg.budget``; the released model also puts its classifier in a
    warehouse, see :class:`kw_mm.models.heads.KWLinearClsHead`). With
    ``kw_cfg=None`` every convolution is plain, giving the baseline
    MobileNetV2 with the same module names. ``dynamic_cfg`` builds another
    dynamic convolution instead of KW (the paper's comparisons; layers:
    :func:`mobilenet_v2_dynamic_layout`).

    Stages (for ``out_indices`` / ``frozen_stages``) are those of
    mmpretrain's ``MobileNetV2``: stage ``i`` in 0..6 is row ``i`` of the
    architecture table, stage 7 the final 1×1 convolution.

    Args:
        widen_factor (float): Channel multiplier (released: 1.0 and 0.5).
            Defaults to 1.0.
        kw_cfg (dict, optional): The KW options, any of
            :class:`~kw_mm.layers.KWOptions` (which documents each one and
            its default; the released b = 1/2 models use
            ``reduction=1/32``); kept as ``self.kw_options``. ``None``
            builds plain convolutions. Defaults to ``dict(budget=1)``.
        kw_layout (str, optional): One of ``KW_LAYOUTS``; None picks the
            released layout of the budget (:func:`default_kw_layout`).
            Defaults to None.
        in_channels (int): Input image channels. Defaults to 3.
        out_indices (Sequence[int]): Stages whose outputs are returned, in
            0..7. Defaults to (7,).
        frozen_stages (int): Stages to freeze, in ``range(-1, 8)`` as in
            mmpretrain: -1 none, 0 the stem, ``i`` the stem and stages
            0..i-1 (the final 1×1 convolution is never frozen). A warehouse
            used by any frozen layer is frozen with it. Defaults to -1.
        norm_cfg (dict): Norm of the network (not of the KW attentions).
            Defaults to ``dict(type='BN')``.
        act_cfg (dict): Activation. Defaults to ``dict(type='ReLU6')``.
        norm_eval (bool): Keep every BatchNorm, the attentions' included, in
            eval mode during training. Defaults to False.
        with_cp (bool): Activation checkpointing of every inverted residual
            block whose input requires grad, as mmpretrain's ``with_cp`` (see
            :mod:`kw_mm.models.backbones.checkpointing`). Defaults to False.
        dynamic_cfg (dict, optional): Another dynamic convolution instead of
            KW: ``type`` (``'ODConv'``, ``'CondConv'`` or ``'DYConv'``) and the
            options of its layer (:class:`~kw_mm.layers.dynamic.ODConv2d`
            etc.), e.g. ``dict(type='ODConv', kernel_num=4)``. Excludes
            ``kw_cfg`` (left at its default it is ignored) and ``kw_layout``.
            Defaults to None.
        init_cfg (dict | list[dict], optional): mmengine init config.
            Defaults to Kaiming for ``Conv2d`` and constant 1 for norms (KW
            and dynamic layers initialise themselves).

    mmpretrain's module names are read-only aliases of the released ones:
    ``conv1`` is ``features.0``, ``layer1`` … ``layer7`` the blocks of stages
    0..6 (a new ``nn.Sequential`` of the same block modules on each access)
    and ``conv2`` is ``features.18``. They are not registered, so the
    ``state_dict`` keeps the released names.
    """

    conv1 = alias('features.0')
    layer1 = _stage_alias(0, 'features[1:2]')
    layer2 = _stage_alias(1, 'features[2:4]')
    layer3 = _stage_alias(2, 'features[4:7]')
    layer4 = _stage_alias(3, 'features[7:11]')
    layer5 = _stage_alias(4, 'features[11:14]')
    layer6 = _stage_alias(5, 'features[14:17]')
    layer7 = _stage_alias(6, 'features[17:18]')
    conv2 = alias('features.18')

    # expand ratio t, channels c, blocks n, stride s of each row (Sandler et al., 2018)
    arch_settings = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                     (6, 160, 3, 2), (6, 320, 1, 1))
    # KW stage of each row in the released models (the 160 and 320 rows share)
    kw_stage_settings = (1, 2, 3, 4, 5, 6, 6)
    num_stages = len(arch_settings) + 1

    def __init__(self, widen_factor: float = 1.0,
                 kw_cfg: Optional[Dict[str, Any]] = DEFAULT_KW_CFG,
                 kw_layout: Optional[str] = None, in_channels: int = 3,
                 out_indices: Sequence[int] = (7, ), frozen_stages: int = -1,
                 norm_cfg: dict = dict(type='BN'), act_cfg: dict = dict(type='ReLU6'),
                 norm_eval: bool = False, with_cp: bool = False,
                 dynamic_cfg: Optional[Dict[str, Any]] = None,
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        if init_cfg is None:
            init_cfg = [dict(type='Kaiming', layer=['Conv2d']),
                        dict(type='Constant', val=1, layer=['_BatchNorm', 'GroupNorm'])]
        super().__init__(init_cfg=init_cfg)
        if (isinstance(widen_factor, bool) or not isinstance(widen_factor, (int, float))
                or not widen_factor > 0):
            raise ValueError(f'widen_factor must be a positive number (released models: 1.0, '
                             f'0.5), got {widen_factor!r}')
        if kw_layout is not None and kw_layout not in KW_LAYOUTS:
            raise ValueError(f'kw_layout must be None or one of {KW_LAYOUTS}, got {kw_layout!r}')
        self.widen_factor = float(widen_factor)
        self.with_cp = check_with_cp(with_cp)
        self.out_indices = check_out_indices(out_indices, self.num_stages)
        if (isinstance(frozen_stages, bool) or not isinstance(frozen_stages, int)
                or frozen_stages not in range(-1, self.num_stages)):
            raise ValueError(f'frozen_stages must be in range(-1, {self.num_stages}) as in '
                             f"mmpretrain's MobileNetV2 (-1 freezes nothing, 0 the stem, i the "
                             f'stem and stages 0..i-1), got {frozen_stages!r}')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.kw_options, self.dynamic = conv_configs('KWMobileNetV2', kw_cfg, dynamic_cfg)
        if self.dynamic is not None and kw_layout is not None:
            raise ValueError(f'KWMobileNetV2: kw_layout={kw_layout!r} is a KW layout; with '
                             f'dynamic_cfg it must be None')
        self.kw_cfg = None if self.kw_options is None else self.kw_options.as_dict()
        self.dynamic_cfg = None if self.dynamic is None else self.dynamic.as_dict()
        self.kw_layout = (None if self.kw_options is None else
                          kw_layout or default_kw_layout(self.kw_options.budget))

        stem, blocks, last = block_settings(self.widen_factor)
        if self.dynamic is not None:
            builder = DynamicConvBuilder(
                mobilenet_v2_dynamic_layout(self.dynamic.method, self.widen_factor),
                self.dynamic)
        elif self.kw_options:
            specs, overrides = mobilenet_v2_kw_layout(self.widen_factor, self.kw_layout,
                                                      in_channels)
            builder = WarehouseBuilder(specs, self.kw_options, per_warehouse=overrides)
            self.warehouses = builder.warehouses
        else:
            builder = WarehouseBuilder([], None)

        features: List[nn.Module] = [ConvNormAct(
            builder.conv('features.0.0', in_channels, stem, 3, stride=2, padding=1),
            build_norm_layer(norm_cfg, stem)[1], build_activation_layer(act_cfg))]
        for block in blocks:
            features.append(InvertedResidual(block, builder.conv, norm_cfg, act_cfg,
                                             self.with_cp))
        features.append(ConvNormAct(
            builder.conv(f'features.{len(blocks) + 1}.0', blocks[-1].out_channels, last, 1),
            build_norm_layer(norm_cfg, last)[1], build_activation_layer(act_cfg)))
        self.features = nn.Sequential(*features)
        builder.check_complete()
        # features[start:end] of each stage (0..6 the table rows, 7 the final conv)
        self.stage_ranges: List[Tuple[int, int]] = []
        for stage in range(1, len(self.arch_settings) + 1):
            indices = [b.index for b in blocks if b.stage == stage]
            self.stage_ranges.append((indices[0], indices[-1] + 1))
        self.stage_ranges.append((len(blocks) + 1, len(blocks) + 2))
        self.feat_dim = last
        self._freeze_stages()

    def _freeze_stages(self) -> None:
        modules: List[nn.Module] = []
        if self.frozen_stages >= 0:
            modules.append(self.features[0])
        for start, end in self.stage_ranges[:max(self.frozen_stages, 0)]:
            modules.extend(self.features[i] for i in range(start, end))
        freeze_modules(modules)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        x = self.features[0](x)
        outs = []
        for stage, (start, end) in enumerate(self.stage_ranges):
            for i in range(start, end):
                x = self.features[i](x)
            if stage in self.out_indices:
                outs.append(x)
        return tuple(outs)
