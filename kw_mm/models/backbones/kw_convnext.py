"""ConvNeXt with KernelWarehouse convolutions (paper §4, appendix A.3, Table 14).

Module names follow the authors' released ``kw_convnext_tiny`` (the official
ConvNeXt code with KW layers), so their checkpoints convert by a prefix
rename: ``downsample_layers.0.0`` is the stem convolution and
``downsample_layers.0.1`` its LayerNorm, ``downsample_layers.i.0/1`` (i ≥ 1)
the LayerNorm and the 2×2 downsampling convolution, and each block
``stages.i.j`` has ``dwconv`` (7×7 depth-wise), ``norm``, ``pwconv1``,
``pwconv2`` (1×1 convolutions, channels first; linear layers over channels
last with ``linear_pw_conv=True``) and ``gamma`` (``[1, C, 1, 1]``).
The final norms and the output convention are those of mmpretrain's
``ConvNeXt`` (``norm{i}`` per output stage, ``gap_before_final_norm``), so
mmpretrain's ``LinearClsHead`` works unchanged.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from mmcv.cnn.bricks import DropPath
from mmengine.registry import MODELS
from torch import nn

from ...layers.builder import LayerSpec, WarehouseBuilder
from ...layers.options import KWOptions
from .checkpointing import check_with_cp, run_block
from .utils import KWBaseBackbone, add_warehouse_overrides, check_out_indices, freeze_modules

#: the KW layouts :class:`KWConvNeXt` can build (see its docstring).
KW_LAYOUTS = ('released', 'paper')


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``[B, C, H, W]`` tensor (channels first)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f'LayerNorm2d expects a 4-D input [B, C, H, W], got shape '
                             f'{tuple(x.shape)}')
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block with the authors' names: dwconv → norm → pwconv1 → GELU
    → pwconv2 → ×gamma → drop path → + input.

    The point-wise layers are 1×1 convolutions over channels-first maps, or
    with ``linear_pw_conv`` linear layers over channels-last ones (mmpretrain's
    two forms; the same function with the same number of parameters).
    ``with_cp`` checkpoints the block while its input requires grad.
    """

    def __init__(self, name: str, builder: WarehouseBuilder, channels: int, mlp_ratio: float,
                 drop_path_rate: float, layer_scale_init_value: float,
                 linear_pw_conv: bool = False, with_cp: bool = False) -> None:
        super().__init__()
        hidden = int(mlp_ratio * channels)
        self.linear_pw_conv = linear_pw_conv
        self.with_cp = with_cp
        conv = builder.conv
        self.dwconv = conv(f'{name}.dwconv', channels, channels, 7, padding=3, groups=channels,
                           bias=True)
        self.norm = LayerNorm2d(channels, eps=1e-6)
        if linear_pw_conv:
            self.pwconv1 = builder.linear(f'{name}.pwconv1', channels, hidden)
            self.pwconv2 = builder.linear(f'{name}.pwconv2', hidden, channels)
        else:
            self.pwconv1 = conv(f'{name}.pwconv1', channels, hidden, 1, bias=True)
            self.pwconv2 = conv(f'{name}.pwconv2', hidden, channels, 1, bias=True)
        self.act = nn.GELU()
        self.gamma = (nn.Parameter(layer_scale_init_value * torch.ones(1, channels, 1, 1))
                      if layer_scale_init_value > 0 else None)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def _inner_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dwconv(x)
        if self.linear_pw_conv:
            norm = self.norm
            out = F.layer_norm(out.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight,
                               norm.bias, norm.eps)
            out = self.pwconv2(self.act(self.pwconv1(out))).permute(0, 3, 1, 2)
        else:
            out = self.pwconv2(self.act(self.pwconv1(self.norm(out))))
        if self.gamma is not None:
            out = out * self.gamma
        return x + self.drop_path(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_block(self, self._inner_forward, x)


def stage_groups(depths: Sequence[int], layout: str) -> List[List[Tuple[int, int]]]:
    """Block ranges ``[start, end)`` of each stage that share warehouses.

    ``'released'``: one group per stage. ``'paper'``: the third stage split
    into three groups with equal numbers of blocks (appendix A.3).
    """
    groups = [[(0, d)] for d in depths]
    if layout == 'paper':
        if len(depths) < 3 or depths[2] % 3:
            raise ValueError(f"kw_layout='paper' splits the third stage into three groups of "
                             f'equal size, so it needs at least 3 stages and depths[2] divisible '
                             f'by 3; got depths={tuple(depths)}')
        size = depths[2] // 3
        groups[2] = [(g * size, (g + 1) * size) for g in range(3)]
    return groups


def warehouse_name(stage: int, start: int, end: int, kind: str) -> str:
    """Name of a block warehouse, e.g. ``'stages.2[6:9].pw'`` (kind 'dw' or 'pw')."""
    return f'stages.{stage}[{start}:{end}].{kind}'


def convnext_kw_layout(depths: Sequence[int], channels: Sequence[int], in_channels: int = 3,
                       stem_patch_size: int = 4, mlp_ratio: float = 4.0,
                       layout: str = 'released', linear_pw_conv: bool = False
                       ) -> List[LayerSpec]:
    """The KW layers of a ConvNeXt, in ``modules()`` order.

    Every convolution is a KW layer. The stem and each downsampling
    convolution own a warehouse (named after the module,
    ``'downsample_layers.i'``); in every block group (see
    :func:`stage_groups`) the depth-wise convolutions share one warehouse
    and the point-wise convolutions (``pwconv1`` and ``pwconv2``) another.
    Listed in this order, warehouses are numbered as in the released model
    (stem, downsamplings, then depth-wise / point-wise per group). With
    ``linear_pw_conv`` the point-wise layers are linear (kernel ``(1,)``):
    the same cells, without the trailing 1×1.
    """
    pw_kernel = (1,) if linear_pw_conv else (1, 1)
    specs: List[LayerSpec] = [
        LayerSpec('downsample_layers.0.0', channels[0], in_channels,
                  (stem_patch_size, stem_patch_size), 'downsample_layers.0')]
    for i in range(1, len(depths)):
        specs.append(LayerSpec(f'downsample_layers.{i}.1', channels[i], channels[i - 1], (2, 2),
                               f'downsample_layers.{i}'))
    for i, groups in enumerate(stage_groups(depths, layout)):
        c = channels[i]
        hidden = int(mlp_ratio * c)
        for start, end in groups:
            dw = warehouse_name(i, start, end, 'dw')
            pw = warehouse_name(i, start, end, 'pw')
            for j in range(start, end):
                name = f'stages.{i}.{j}'
                specs.append(LayerSpec(f'{name}.dwconv', c, 1, (7, 7), dw, name))
                specs.append(LayerSpec(f'{name}.pwconv1', hidden, c, pw_kernel, pw, name))
                specs.append(LayerSpec(f'{name}.pwconv2', c, hidden, pw_kernel, pw, name))
    return specs


def paper_3_4x_overrides(depths: Sequence[int]) -> Dict[str, Dict[str, float]]:
    """KW (3/4×) of appendix A.3: the point-wise warehouses of the last two
    stages of the 'paper' layout at b = 1/2 (half-gcd cells), the rest at 1."""
    groups = stage_groups(depths, 'paper')
    last_two = [(len(depths) - 2, groups[-2][-1]), (len(depths) - 1, groups[-1][-1])]
    return {warehouse_name(i, s, e, 'pw'): dict(budget=0.5) for i, (s, e) in last_two}


@MODELS.register_module()
class KWConvNeXt(KWBaseBackbone):
    """ConvNeXt backbone with KernelWarehouse convolutions.

    KW is applied to every convolution (paper appendix A.3): the 4×4 stem and
    the three 2×2 downsampling convolutions each own a warehouse, and within
    each stage (or stage group) the 7×7 depth-wise convolutions share one
    warehouse and the 1×1 point-wise convolutions another. The attentions use
    LayerNorm. With ``kw_cfg=None`` every convolution is plain, giving the
    baseline ConvNeXt with the same module names.

    Two layouts (``kw_layout``):

    * ``'released'``: the authors' released ``kw1x_convnext_tiny`` (each
      stage one group; 12 warehouses for 4 stages). Tiny at b = 1 has
      39,370,674 parameters with a 1000-class head.
    * ``'paper'``: Table 14 / appendix A.3: the third stage split into three
      groups of equal numbers of blocks (16 warehouses for Tiny; Table 14
      prints one (147, 24) pair too many). In this layout
      ``kw_cfg.budget=0.75`` is the paper's KW (3/4×): point-wise warehouses
      of the last two stages at b = 1/2 with half-gcd cells, all others at
      b = 1. Any other budget applies to every warehouse. With
      ``reduction=1/32`` Tiny has exactly the paper's 32.99M (1×) and
      24.53M (3/4×) parameters (configs/kw_convnext/README.md).

    Args:
        arch (str | dict): 'atto', 'femto', 'pico', 'nano', 'tiny', 'small',
            'base', 'large', 'xlarge' or 'huge', or a dict with ``depths`` and
            ``channels``. Defaults to 'tiny'.
        kw_cfg (dict, optional): The KW options, any of
            :class:`~kw_mm.layers.KWOptions` (which documents each one and
            its default; ``norm`` defaults to 'LN' here); kept as
            ``self.kw_options``. ``None`` builds plain convolutions.
            Defaults to ``dict(budget=1)``.
        kw_layout (str): 'released' or 'paper'. Defaults to 'released'.
        kw_warehouses (dict, optional): Per-warehouse overrides of
            ``budget`` / ``cell_in_ratio`` / ``cell_out_ratio``, keyed by
            warehouse name: ``'downsample_layers.i'`` (i = 0 is the stem) or
            ``'stages.i[a:b].dw'`` / ``'stages.i[a:b].pw'`` for blocks a..b-1
            of stage i (see :meth:`warehouse_names`). Applied after the 3/4×
            recipe. Defaults to None.
        in_channels (int): Input image channels. Defaults to 3.
        stem_patch_size (int): Stem kernel and stride. Defaults to 4.
        mlp_ratio (float): Hidden width of the point-wise layers / channels.
            Defaults to 4.
        drop_path_rate (float): Stochastic depth, increasing linearly from 0
            over all blocks. Defaults to 0.
        layer_scale_init_value (float): Initial layer scale ``gamma``; 0
            disables it. Defaults to 1e-6.
        out_indices (int | Sequence[int]): Stages whose outputs are returned
            (negative indices allowed). Defaults to -1 (the last).
        frozen_stages (int): As mmpretrain's ConvNeXt: stages 0..i-1 and the
            downsampling layers before them (the stem included) are frozen;
            0 (or -1) freezes nothing. Their warehouses are frozen with them.
            Defaults to 0.
        gap_before_final_norm (bool): Average-pool before the final norm and
            return ``[B, C]`` (classification), else return normalised maps.
            Defaults to True.
        linear_pw_conv (bool): Point-wise layers as linear layers over
            channels-last maps (``nn.Linear``, or ``KWLinear`` with cells
            ``[n, cell_out, cell_in, 1]``) instead of 1×1 convolutions
            (``nn.Conv2d`` / ``KWConv2d``). Both forms compute the same
            function with the same parameter count. Unlike mmpretrain the
            default is the convolution form, that of the released model, whose
            checkpoints convert to it. Defaults to False.
        with_cp (bool): Activation checkpointing of every block whose input
            requires grad, as mmpretrain's ``with_cp`` (see
            :mod:`kw_mm.models.backbones.checkpointing`). Defaults to False.
        init_cfg (dict | list[dict], optional): mmengine init config; KW
            attentions keep their own initialisation. Defaults to
            mmpretrain's ConvNeXt (TruncNormal std 0.02, LayerNorm constant).
    """

    arch_settings = {
        'atto': ([2, 2, 6, 2], [40, 80, 160, 320]),
        'femto': ([2, 2, 6, 2], [48, 96, 192, 384]),
        'pico': ([2, 2, 6, 2], [64, 128, 256, 512]),
        'nano': ([2, 2, 8, 2], [80, 160, 320, 640]),
        'tiny': ([3, 3, 9, 3], [96, 192, 384, 768]),
        'small': ([3, 3, 27, 3], [96, 192, 384, 768]),
        'base': ([3, 3, 27, 3], [128, 256, 512, 1024]),
        'large': ([3, 3, 27, 3], [192, 384, 768, 1536]),
        'xlarge': ([3, 3, 27, 3], [256, 512, 1024, 2048]),
        'huge': ([3, 3, 27, 3], [352, 704, 1408, 2816]),
    }

    def __init__(self, arch: Union[str, Mapping[str, Sequence[int]]] = 'tiny',
                 kw_cfg: Optional[Dict[str, Any]] = dict(budget=1.0),
                 kw_layout: str = 'released',
                 kw_warehouses: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 in_channels: int = 3, stem_patch_size: int = 4, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0, layer_scale_init_value: float = 1e-6,
                 out_indices: Union[int, Sequence[int]] = -1, frozen_stages: int = 0,
                 gap_before_final_norm: bool = True, linear_pw_conv: bool = False,
                 with_cp: bool = False, init_cfg=None) -> None:
        if init_cfg is None:
            init_cfg = [dict(type='TruncNormal', layer=['Conv2d', 'Linear'], std=.02, bias=0.),
                        dict(type='Constant', layer=['LayerNorm'], val=1., bias=0.)]
        super().__init__(init_cfg=init_cfg)
        self.depths, self.channels = self._parse_arch(arch)
        self.num_stages = len(self.depths)
        if kw_layout not in KW_LAYOUTS:
            raise ValueError(f'kw_layout must be one of {KW_LAYOUTS}, got {kw_layout!r}')
        for label, value in (('in_channels', in_channels), ('stem_patch_size', stem_patch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f'{label} must be a positive int, got {value!r}')
        if not isinstance(drop_path_rate, (int, float)) or not 0 <= drop_path_rate < 1:
            raise ValueError(f'drop_path_rate must be a number in [0, 1), got {drop_path_rate!r}')
        if not isinstance(layer_scale_init_value, (int, float)) or layer_scale_init_value < 0:
            raise ValueError(f'layer_scale_init_value must be a number >= 0 (0 disables layer '
                             f'scale), got {layer_scale_init_value!r}')
        if not isinstance(mlp_ratio, (int, float)) or int(mlp_ratio * self.channels[0]) < 1:
            raise ValueError(f'mlp_ratio must be a positive number, got {mlp_ratio!r}')
        if (isinstance(frozen_stages, bool) or not isinstance(frozen_stages, int)
                or not -1 <= frozen_stages <= self.num_stages):
            raise ValueError(f'frozen_stages must be an int in [-1, {self.num_stages}] (0 or -1 '
                             f'freezes nothing, i the first i stages and their downsampling '
                             f'layers), got {frozen_stages!r}')
        if not isinstance(linear_pw_conv, bool):
            raise ValueError(f'linear_pw_conv must be True or False, got {linear_pw_conv!r}')
        self.linear_pw_conv = linear_pw_conv
        self.with_cp = check_with_cp(with_cp)
        self.kw_layout = kw_layout
        self.out_indices = check_out_indices(out_indices, self.num_stages)
        self.frozen_stages = frozen_stages
        self.gap_before_final_norm = gap_before_final_norm
        self.kw_options = KWOptions.from_kw_cfg(kw_cfg, defaults=dict(norm='LN'))
        self.kw_cfg = None if self.kw_options is None else self.kw_options.as_dict()

        specs = convnext_kw_layout(self.depths, self.channels, in_channels, stem_patch_size,
                                   mlp_ratio, kw_layout, linear_pw_conv)
        builder = WarehouseBuilder(specs, self.kw_options,
                                   per_warehouse=self._per_warehouse(specs, kw_warehouses))
        if self.kw_options:
            self.warehouses = builder.warehouses

        conv = builder.conv
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(nn.Sequential(
            conv('downsample_layers.0.0', in_channels, self.channels[0], stem_patch_size,
                 stride=stem_patch_size, bias=True),
            LayerNorm2d(self.channels[0], eps=1e-6)))
        for i in range(1, self.num_stages):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm2d(self.channels[i - 1], eps=1e-6),
                conv(f'downsample_layers.{i}.1', self.channels[i - 1], self.channels[i], 2,
                     stride=2, bias=True)))

        rates = [float(r) for r in torch.linspace(0, drop_path_rate, sum(self.depths),
                                                  device='cpu')]
        self.stages = nn.ModuleList()
        block = 0
        for i, depth in enumerate(self.depths):
            self.stages.append(nn.Sequential(*[
                ConvNeXtBlock(f'stages.{i}.{j}', builder, self.channels[i], mlp_ratio,
                              rates[block + j], layer_scale_init_value, linear_pw_conv,
                              self.with_cp) for j in range(depth)]))
            block += depth
        for i in self.out_indices:
            self.add_module(f'norm{i}', LayerNorm2d(self.channels[i], eps=1e-6))
        builder.check_complete()
        self.feat_dim = self.channels[self.out_indices[-1]]
        self._freeze_stages()

    @classmethod
    def _parse_arch(cls, arch) -> Tuple[List[int], List[int]]:
        if isinstance(arch, str):
            if arch not in cls.arch_settings:
                raise ValueError(f'arch must be one of {sorted(cls.arch_settings)} or a dict '
                                 f'with depths and channels, got {arch!r}')
            depths, channels = cls.arch_settings[arch]
            return list(depths), list(channels)
        if not isinstance(arch, Mapping) or set(arch) != {'depths', 'channels'}:
            raise ValueError(f"arch must be a name or a dict with exactly the keys 'depths' and "
                             f"'channels', got {arch!r}")
        depths, channels = list(arch['depths']), list(arch['channels'])
        if (len(depths) != len(channels) or not depths
                or not all(isinstance(v, int) and v > 0 for v in depths + channels)):
            raise ValueError(f'arch depths and channels must be equally long lists of positive '
                             f'ints, got depths={depths}, channels={channels}')
        return depths, channels

    def _per_warehouse(self, specs: Sequence[LayerSpec],
                       kw_warehouses: Optional[Mapping[str, Mapping[str, Any]]]
                       ) -> Dict[Hashable, Dict[str, Any]]:
        names = list(dict.fromkeys(spec.warehouse for spec in specs))
        overrides: Dict[Hashable, Dict[str, Any]] = {}
        if (self.kw_options and self.kw_layout == 'paper'
                and math.isclose(self.kw_options.budget, 0.75)):
            overrides = {name: dict(budget=1.0) for name in names}
            for name, options in paper_3_4x_overrides(self.depths).items():
                overrides[name].update(options)
        return add_warehouse_overrides(overrides, kw_warehouses, names,
                                       f'the {self.kw_layout!r} layout')

    @classmethod
    def warehouse_names(cls, arch: Union[str, Mapping[str, Sequence[int]]] = 'tiny',
                        kw_layout: str = 'released') -> List[str]:
        """Warehouse names of a layout in warehouse (index) order."""
        if kw_layout not in KW_LAYOUTS:
            raise ValueError(f'kw_layout must be one of {KW_LAYOUTS}, got {kw_layout!r}')
        depths, channels = cls._parse_arch(arch)
        specs = convnext_kw_layout(depths, channels, layout=kw_layout)
        return list(dict.fromkeys(spec.warehouse for spec in specs))

    def _freeze_stages(self) -> None:
        modules: List[nn.Module] = []
        for i in range(self.frozen_stages):
            modules += [self.downsample_layers[i], self.stages[i]]
        freeze_modules(modules)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(self.downsample_layers[i](x))
            if i in self.out_indices:
                norm = getattr(self, f'norm{i}')
                if self.gap_before_final_norm:
                    outs.append(norm(x.mean((-2, -1), keepdim=True)).flatten(1))
                else:
                    outs.append(norm(x))
        return tuple(outs)
