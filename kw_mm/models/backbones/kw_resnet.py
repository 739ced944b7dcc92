"""ResNet with KernelWarehouse convolutions (paper §4, appendix A.3, Table 15)."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from mmcv.cnn import build_norm_layer
from mmcv.cnn.bricks import DropPath
from mmengine.registry import MODELS
from torch import nn

from ...layers.builder import LayerSpec, WarehouseBuilder
from ...layers.dynamic import DynamicConvBuilder
from .aliases import AliasGuard, alias
from .checkpointing import check_with_cp, run_block
from .utils import (
    DEFAULT_KW_CFG,
    KWBaseBackbone,
    check_frozen_stages,
    check_out_indices,
    conv_configs,
    freeze_modules,
    pretrained_cfg,
)

ConvFactory = Callable[..., nn.Module]


class BasicBlock(AliasGuard, nn.Module):
    """ResNet basic block (two 3×3 convolutions).

    ``norm1`` / ``norm2`` are read-only aliases of ``bn1`` / ``bn2``
    (mmpretrain's names). With ``with_cp`` the block up to its last ReLU is
    checkpointed while its input requires grad, as in mmpretrain.
    """
    expansion = 1
    norm1 = alias('bn1')
    norm2 = alias('bn2')

    def __init__(self, name: str, conv: ConvFactory, in_channels: int, planes: int, stride: int,
                 dilation: int, downsample: Optional[nn.Module], norm_cfg: dict,
                 drop_path_rate: float, with_cp: bool = False) -> None:
        super().__init__()
        self.with_cp = with_cp
        self.conv1 = conv(f'{name}.conv1', in_channels, planes, 3, stride=stride,
                          padding=dilation, dilation=dilation)
        self.bn1 = build_norm_layer(norm_cfg, planes)[1]
        self.conv2 = conv(f'{name}.conv2', planes, planes, 3, padding=dilation, dilation=dilation)
        self.bn2 = build_norm_layer(norm_cfg, planes)[1]
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    @property
    def last_norm(self) -> nn.Module:
        return self.bn2

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.drop_path(self.bn2(self.conv2(out)))
        out += identity  # in place, as mmpretrain's blocks: no new block-sized tensor
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(run_block(self, self._residual, x))


class Bottleneck(AliasGuard, nn.Module):
    """ResNet bottleneck (1×1, 3×3 with the stride, 1×1; 'pytorch' style).

    ``norm1`` … ``norm3`` are read-only aliases of ``bn1`` … ``bn3``; ``with_cp``
    as in :class:`BasicBlock`.
    """
    expansion = 4
    norm1 = alias('bn1')
    norm2 = alias('bn2')
    norm3 = alias('bn3')

    def __init__(self, name: str, conv: ConvFactory, in_channels: int, planes: int, stride: int,
                 dilation: int, downsample: Optional[nn.Module], norm_cfg: dict,
                 drop_path_rate: float, with_cp: bool = False) -> None:
        super().__init__()
        self.with_cp = with_cp
        out_channels = planes * self.expansion
        self.conv1 = conv(f'{name}.conv1', in_channels, planes, 1)
        self.bn1 = build_norm_layer(norm_cfg, planes)[1]
        self.conv2 = conv(f'{name}.conv2', planes, planes, 3, stride=stride, padding=dilation,
                          dilation=dilation)
        self.bn2 = build_norm_layer(norm_cfg, planes)[1]
        self.conv3 = conv(f'{name}.conv3', planes, out_channels, 1)
        self.bn3 = build_norm_layer(norm_cfg, out_channels)[1]
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    @property
    def last_norm(self) -> nn.Module:
        return self.bn3

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.drop_path(self.bn3(self.conv3(out)))
        out += identity
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(run_block(self, self._residual, x))


def resnet_kw_layout(depth: int, stem_channels: int = 64, base_channels: int = 64,
                     num_stages: int = 4, strides: Sequence[int] = (1, 2, 2, 2)
                     ) -> Tuple[List[LayerSpec], List[int]]:
    """The KW layers of the authors' released ResNets, in ``modules()`` order.

    Every convolution of the residual stages is a KW layer, except (for
    bottleneck ResNets) the first 1×1 and the stride-1 downsample of
    ``layer1.0``. Stage ``i`` shares warehouse ``i``, except that the first
    convolution of stage ``i > 0`` and its downsample draw from warehouse
    ``i − 1`` (paper Table 15: "reassigned stages").

    Returns:
        tuple: the layer specs, and the number of blocks of each stage.
    """
    block, stage_blocks = KWResNet.arch_settings[depth]
    stage_blocks = list(stage_blocks[:num_stages])
    specs: List[LayerSpec] = []
    in_channels = stem_channels
    for i, num_blocks in enumerate(stage_blocks):
        planes = base_channels * 2**i
        out_channels = planes * block.expansion
        for j in range(num_blocks):
            name = f'layer{i + 1}.{j}'
            first = j == 0
            stride = strides[i] if first else 1
            has_down = first and (stride != 1 or in_channels != out_channels)
            entry = i - 1 if first and i > 0 else i
            if block is BasicBlock:
                specs.append(LayerSpec(f'{name}.conv1', planes, in_channels, (3, 3), entry, name))
                specs.append(LayerSpec(f'{name}.conv2', planes, planes, (3, 3), i, name))
            else:
                if not (i == 0 and first):
                    specs.append(LayerSpec(f'{name}.conv1', planes, in_channels, (1, 1), entry,
                                           name))
                specs.append(LayerSpec(f'{name}.conv2', planes, planes, (3, 3), i, name))
                specs.append(LayerSpec(f'{name}.conv3', out_channels, planes, (1, 1), i, name))
            if has_down and (block is BasicBlock or i > 0):
                # The shortcut is its own "layer" for sharing='layer' (as the
                # authors' per-block sharing keeps it apart from conv1).
                specs.append(LayerSpec(f'{name}.downsample.0', out_channels, in_channels,
                                       (1, 1), entry, f'{name}.downsample'))
            in_channels = out_channels
    return specs, stage_blocks


def resnet_dynamic_layout(method: str, depth: int, num_stages: int = 4,
                          strides: Sequence[int] = (1, 2, 2, 2), stem_channels: int = 64,
                          base_channels: int = 64) -> Tuple[List[str], Dict[str, str]]:
    """The layers a ``dynamic_cfg`` method makes dynamic, in construction order,
    and the residual block of each (CondConv shares one routing per block).

    The layouts of the methods' own code, which give the paper's parameter
    counts (stem plain in every one):

    * ``'ODConv'``: every convolution of the residual blocks, the
      shortcuts' downsampling convolutions plain (ODConv's ``od_resnet``);
    * ``'DYConv'``: every convolution of the residual blocks and the
      downsampling convolutions;
    * ``'CondConv'``: the convolutions of the last :data:`CONDCONV_BLOCKS`
      residual blocks (downsampling plain), plus a CondConv classifier in
      the head (:class:`~kw_mm.models.heads.CondConvLinearClsHead`).
    """
    block, stage_blocks = KWResNet.arch_settings[depth]
    convs = ('conv1', 'conv2') if block is BasicBlock else ('conv1', 'conv2', 'conv3')
    blocks: List[Tuple[str, bool]] = []  # (block, has a downsampling convolution)
    channels = stem_channels
    for i, num_blocks in enumerate(stage_blocks[:num_stages]):
        out_channels = base_channels * 2**i * block.expansion
        for j in range(num_blocks):
            down = j == 0 and (strides[i] != 1 or channels != out_channels)
            blocks.append((f'layer{i + 1}.{j}', down))
            channels = out_channels
    if method == 'CondConv':
        blocks = blocks[-CONDCONV_BLOCKS:]
    names: Dict[str, str] = {}
    for name, down in blocks:
        if down and method == 'DYConv':  # (KWResNet builds it before the block's convolutions)
            names[f'{name}.downsample.0'] = name
        names.update((f'{name}.{conv}', name) for conv in convs)
    return list(names), names


#: the residual blocks at the end of a ResNet that CondConv makes dynamic.
CONDCONV_BLOCKS = 3


@MODELS.register_module()
class KWResNet(AliasGuard, KWBaseBackbone):
    """ResNet backbone with KernelWarehouse convolutions.

    The layout is that of the authors' released models (paper appendix A.3):
    KW on every convolution of the residual stages (for ResNet50+ except
    ``layer1.0.conv1`` and its stride-1 downsample), the stem plain, one
    warehouse per stage with each stage's first convolution and downsample
    drawing from the previous stage's warehouse. With ``kw_cfg=None`` every
    convolution is plain, giving the baseline ResNet with the same names.
    ``dynamic_cfg`` builds another dynamic convolution instead of KW (the
    paper's comparisons; layers: :func:`resnet_dynamic_layout`).

    Args:
        depth (int): 18, 34, 50, 101 or 152.
        kw_cfg (dict, optional): The KW options, any of
            :class:`~kw_mm.layers.KWOptions` (which documents each one and
            its default), e.g. ``dict(budget=0.5)``; kept as
            ``self.kw_options``. ``None`` builds plain convolutions.
            Defaults to ``dict(budget=1)``.
        in_channels (int): Input image channels. Defaults to 3.
        stem_channels (int): Stem output channels. Defaults to 64.
        base_channels (int): Planes of the first stage. Defaults to 64.
        num_stages (int): Residual stages, 1–4. Defaults to 4.
        strides (Sequence[int]): Stride of each stage. Defaults to (1, 2, 2, 2).
        dilations (Sequence[int]): Dilation of each stage. Defaults to (1, 1, 1, 1).
        out_indices (Sequence[int]): Stages whose outputs are returned.
            Defaults to (3,).
        frozen_stages (int): Stages to freeze (-1: none, 0: the stem, i: the
            stem and stages 1..i). A warehouse used by any frozen layer is
            frozen with it, so frozen stages keep their exact kernels; the
            next stage's first convolution and downsample, which draw from
            that warehouse, then adapt only through their attention.
            Defaults to -1.
        norm_cfg (dict): Norm of the network (not of the KW attentions).
            Defaults to ``dict(type='BN', requires_grad=True)``.
        norm_eval (bool): Keep every BatchNorm, the attentions' included, in
            eval mode during training. Defaults to False.
        with_cp (bool): Activation checkpointing of every residual block
            whose input requires grad, as mmpretrain's ``with_cp``: less
            memory, one more forward pass of each block in backward (whose
            BatchNorms then update their running statistics twice, as in
            mmpretrain). Defaults to False.
        zero_init_residual (bool): Zero the last norm of each block.
            Defaults to True.
        drop_path_rate (float): Stochastic depth, linearly increasing over
            blocks. Defaults to 0.
        dynamic_cfg (dict, optional): Another dynamic convolution instead of
            KW: ``type`` (``'ODConv'``, ``'CondConv'`` or ``'DYConv'``) and the
            options of its layer (:class:`~kw_mm.layers.dynamic.ODConv2d`
            etc.), e.g. ``dict(type='ODConv', kernel_num=4)``. Excludes
            ``kw_cfg`` (left at its default it is ignored). Defaults to None.
        init_cfg (dict | list[dict], optional): mmengine init config.

    The module names are those of the released models (``bn1``, ``layerN.M.bn1``);
    mmpretrain's names ``norm1`` (stem) and the blocks' ``norm1`` … ``norm3``
    are read-only aliases of them.
    """
    norm1 = alias('bn1')

    arch_settings = {
        18: (BasicBlock, (2, 2, 2, 2)),
        34: (BasicBlock, (3, 4, 6, 3)),
        50: (Bottleneck, (3, 4, 6, 3)),
        101: (Bottleneck, (3, 4, 23, 3)),
        152: (Bottleneck, (3, 8, 36, 3)),
    }

    def __init__(self, depth: int, kw_cfg: Optional[Dict[str, Any]] = DEFAULT_KW_CFG,
                 in_channels: int = 3, stem_channels: int = 64, base_channels: int = 64,
                 num_stages: int = 4, strides: Sequence[int] = (1, 2, 2, 2),
                 dilations: Sequence[int] = (1, 1, 1, 1), out_indices: Sequence[int] = (3,),
                 style: str = 'pytorch', frozen_stages: int = -1,
                 norm_cfg: dict = dict(type='BN', requires_grad=True), norm_eval: bool = False,
                 with_cp: bool = False, zero_init_residual: bool = True,
                 drop_path_rate: float = 0.0, dynamic_cfg: Optional[Dict[str, Any]] = None,
                 init_cfg=None) -> None:
        if init_cfg is None:
            init_cfg = [dict(type='Kaiming', layer=['Conv2d']),
                        dict(type='Constant', val=1, layer=['_BatchNorm', 'GroupNorm'])]
        super().__init__(init_cfg=init_cfg)
        if depth not in self.arch_settings:
            raise KeyError(f'invalid depth {depth!r} for KWResNet; choose from '
                           f'{sorted(self.arch_settings)}')
        if not isinstance(num_stages, int) or not 1 <= num_stages <= 4:
            raise ValueError(f'num_stages must be an int in 1..4, got {num_stages!r}')
        if len(strides) < num_stages or len(dilations) < num_stages:
            raise ValueError(f'strides {tuple(strides)} and dilations {tuple(dilations)} need '
                             f'at least num_stages={num_stages} entries')
        if style != 'pytorch':
            raise ValueError(f"KWResNet supports style='pytorch' (stride on the 3x3 conv), "
                             f'got {style!r}')
        self.depth = depth
        self.num_stages = num_stages
        self.with_cp = check_with_cp(with_cp)
        self.out_indices = check_out_indices(out_indices, num_stages)
        self.frozen_stages = check_frozen_stages(frozen_stages, num_stages)
        self.norm_eval = norm_eval
        self.zero_init_residual = zero_init_residual
        self.kw_options, self.dynamic = conv_configs('KWResNet', kw_cfg, dynamic_cfg)
        self.kw_cfg = None if self.kw_options is None else self.kw_options.as_dict()
        self.dynamic_cfg = None if self.dynamic is None else self.dynamic.as_dict()

        block, _ = self.arch_settings[depth]
        specs, stage_blocks = resnet_kw_layout(depth, stem_channels, base_channels,
                                               num_stages, strides)
        if self.dynamic is not None:
            names, groups = resnet_dynamic_layout(self.dynamic.method, depth, num_stages,
                                                  strides, stem_channels, base_channels)
            builder = DynamicConvBuilder(names, self.dynamic, groups)
        else:
            builder = WarehouseBuilder(specs, self.kw_options)
        if self.kw_options:
            self.warehouses = builder.warehouses

        self.conv1 = nn.Conv2d(in_channels, stem_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = build_norm_layer(norm_cfg, stem_channels)[1]
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        total_blocks = sum(stage_blocks)
        block_index = 0
        channels = stem_channels
        self.res_layers: List[str] = []
        for i, num_blocks in enumerate(stage_blocks):
            planes = base_channels * 2**i
            out_channels = planes * block.expansion
            blocks = []
            for j in range(num_blocks):
                name = f'layer{i + 1}.{j}'
                stride = strides[i] if j == 0 else 1
                downsample = None
                if j == 0 and (stride != 1 or channels != out_channels):
                    downsample = nn.Sequential(
                        builder.conv(f'{name}.downsample.0', channels, out_channels, 1,
                                     stride=stride),
                        build_norm_layer(norm_cfg, out_channels)[1])
                rate = drop_path_rate * block_index / max(total_blocks - 1, 1)
                blocks.append(block(name, builder.conv, channels, planes, stride, dilations[i],
                                    downsample, norm_cfg, rate, self.with_cp))
                channels = out_channels
                block_index += 1
            layer_name = f'layer{i + 1}'
            self.add_module(layer_name, nn.Sequential(*blocks))
            self.res_layers.append(layer_name)
        builder.check_complete()
        self.feat_dim = channels
        self._freeze_stages()

    def init_weights(self) -> None:
        super().init_weights()
        if pretrained_cfg(self.init_cfg) is not None:
            return
        if self.zero_init_residual:
            for name in self.res_layers:
                for blk in getattr(self, name):
                    nn.init.zeros_(blk.last_norm.weight)

    def _freeze_stages(self) -> None:
        modules: List[nn.Module] = []
        if self.frozen_stages >= 0:
            modules += [self.conv1, self.bn1]
        modules += [getattr(self, f'layer{i}') for i in range(1, self.frozen_stages + 1)]
        freeze_modules(modules)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i, name in enumerate(self.res_layers):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)
