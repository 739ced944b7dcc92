"""Vision Transformer (DeiT) with KernelWarehouse linear layers (paper §4, Table 11).

The paper applies KW to DeiT by representing every cell of the weight
matrices of the "value" and MLP layers as a linear mixture of warehouses
shared across several self-attention and MLP blocks; the "query" and "key"
matrices stay plain. :class:`KWVisionTransformer` builds that model with
mmpretrain's module names: with ``kw_cfg=None`` it *is* mmpretrain's
``VisionTransformer`` (the same modules, state-dict keys and outputs), and
with KW each block's fused ``attn.qkv`` projection becomes a plain
``attn.qk`` (query and key) and a :class:`~kw_mm.layers.KWLinear`
``attn.v`` (value), and the MLP layers ``ffn.layers.0.0`` / ``ffn.layers.1``
(and the output projection ``attn.proj``) are KWLinear layers drawing from
the backbone's warehouses.
"""
from __future__ import annotations

from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from mmcv.cnn.bricks.drop import build_dropout
from mmcv.cnn.bricks.transformer import FFN, PatchEmbed
from mmengine.model import BaseModule, ModuleList
from mmengine.registry import MODELS
from mmpretrain.models.backbones.vision_transformer import VisionTransformer
from mmpretrain.models.utils import LayerScale, build_norm_layer, to_2tuple
from torch import nn

from ...layers.builder import LayerSpec, WarehouseBuilder
from ...layers.options import KWOptions
from .utils import (
    KWBaseBackbone,
    add_warehouse_overrides,
    check_frozen_stages,
    check_out_indices,
    freeze_modules,
)


class KWMultiheadAttention(BaseModule):
    """mmpretrain's ``MultiheadAttention`` with an optional KW value projection.

    Without KW (``kw_value=False``) this is mmpretrain's module: one fused
    ``qkv`` projection. With it the query and key stay a plain fused ``qk``
    projection and the value is ``v``, a KW linear layer; the output
    projection ``proj`` is whatever the builder makes of it.

    Args:
        name (str): Module path of this attention in the backbone
            (``'layers.3.attn'``), used to look its layers up in ``builder``.
        builder (WarehouseBuilder): Builds ``{name}.v`` and ``{name}.proj``.
        embed_dims (int): The embedding dimension.
        num_heads (int): Parallel attention heads.
        kw_value (bool): Split ``qkv`` into a plain ``qk`` and a KW ``v``.
        attn_drop (float): Dropout of the attention weights. Defaults to 0.
        proj_drop (float): Dropout after the output projection. Defaults to 0.
        dropout_layer (dict): Dropout before the shortcut (DropPath).
        qkv_bias (bool): Biases of the query, key and value. Defaults to True.
        layer_scale_init_value (float): Layer scale ``gamma1``; 0 disables
            it. Defaults to 0.
    """

    def __init__(self, name: str, builder: WarehouseBuilder, embed_dims: int, num_heads: int,
                 kw_value: bool, attn_drop: float = 0., proj_drop: float = 0.,
                 dropout_layer: Optional[dict] = None, qkv_bias: bool = True,
                 layer_scale_init_value: float = 0.) -> None:
        super().__init__()
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.head_dims = embed_dims // num_heads
        if kw_value:
            self.qk = nn.Linear(embed_dims, embed_dims * 2, bias=qkv_bias)
            self.v = builder.linear(f'{name}.v', embed_dims, embed_dims, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=qkv_bias)
        self.kw_value = kw_value
        self.attn_drop = attn_drop
        self.proj = builder.linear(f'{name}.proj', embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop)
        self.out_drop = build_dropout(dropout_layer or dict(type='Dropout', drop_prob=0.))
        if layer_scale_init_value > 0:
            self.gamma1 = LayerScale(embed_dims, layer_scale_init_value=layer_scale_init_value)
        else:
            self.gamma1 = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        heads, dims = self.num_heads, self.head_dims
        if self.kw_value:
            q, k = self.qk(x).reshape(B, N, 2, heads, dims).permute(2, 0, 3, 1, 4)
            v = self.v(x).reshape(B, N, heads, dims).transpose(1, 2)
        else:
            q, k, v = self.qkv(x).reshape(B, N, 3, heads, dims).permute(2, 0, 3, 1, 4)
        attn_drop = self.attn_drop if self.training else 0.
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=attn_drop)
        x = self.proj(x.transpose(1, 2).reshape(B, N, self.embed_dims))
        return self.out_drop(self.gamma1(self.proj_drop(x)))


class KWTransformerEncoderLayer(BaseModule):
    """mmpretrain's ``TransformerEncoderLayer`` whose linear layers may be KW.

    ``ln1`` → ``attn`` (:class:`KWMultiheadAttention`) → + input → ``ln2``
    → ``ffn`` (mmcv's ``FFN``: ``layers.0.0`` Linear, GELU, dropout,
    ``layers.1`` Linear, dropout) → + input. The FFN's linear layers are
    replaced by the builder's (KW or plain).

    Args:
        name (str): Module path of the layer (``'layers.3'``).
        builder (WarehouseBuilder): Builds the KW layers of this block.
        embed_dims (int): The feature dimension.
        num_heads (int): Parallel attention heads.
        feedforward_channels (int): Hidden width of the FFN.
        layer_scale_init_value (float): Layer scale; 0 disables it.
        drop_rate (float): Dropout after the attention projection and in
            the FFN.
        attn_drop_rate (float): Dropout of the attention weights.
        drop_path_rate (float): Stochastic depth of this layer.
        qkv_bias (bool): Biases of the query, key and value.
        norm_cfg (dict): The norm layers' config.
    """

    def __init__(self, name: str, builder: WarehouseBuilder, embed_dims: int, num_heads: int,
                 feedforward_channels: int, layer_scale_init_value: float = 0.,
                 drop_rate: float = 0., attn_drop_rate: float = 0., drop_path_rate: float = 0.,
                 qkv_bias: bool = True, norm_cfg: Optional[dict] = None) -> None:
        super().__init__()
        norm_cfg = norm_cfg or dict(type='LN')
        self.embed_dims = embed_dims
        self.ln1 = build_norm_layer(norm_cfg, embed_dims)
        self.attn = KWMultiheadAttention(
            f'{name}.attn', builder, embed_dims, num_heads,
            kw_value=f'{name}.attn.v' in builder.specs, attn_drop=attn_drop_rate,
            proj_drop=drop_rate, dropout_layer=dict(type='DropPath', drop_prob=drop_path_rate),
            qkv_bias=qkv_bias, layer_scale_init_value=layer_scale_init_value)
        self.ln2 = build_norm_layer(norm_cfg, embed_dims)
        self.ffn = FFN(embed_dims=embed_dims, feedforward_channels=feedforward_channels,
                       num_fcs=2, ffn_drop=drop_rate,
                       dropout_layer=dict(type='DropPath', drop_prob=drop_path_rate),
                       act_cfg=dict(type='GELU'), layer_scale_init_value=layer_scale_init_value)
        # the same positions in the FFN's Sequential, so the same names
        self.ffn.layers[0][0] = builder.linear(f'{name}.ffn.layers.0.0', embed_dims,
                                               feedforward_channels)
        self.ffn.layers[1] = builder.linear(f'{name}.ffn.layers.1', feedforward_channels,
                                            embed_dims)

    @property
    def norm1(self) -> nn.Module:
        return self.ln1

    @property
    def norm2(self) -> nn.Module:
        return self.ln2

    def init_weights(self) -> None:
        """As mmpretrain: plain FFN linear layers Xavier-uniform, biases ~N(0, 1e-6)."""
        super().init_weights()
        for m in (self.ffn.layers[0][0], self.ffn.layers[1]):
            if isinstance(m, nn.Linear):  # not the KW layers' attentions
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return self.ffn(self.ln2(x), identity=x)


def vit_kw_layout(num_layers: int, embed_dims: int, feedforward_channels: int,
                  blocks_per_warehouse: int, kw_proj: bool) -> List[LayerSpec]:
    """The KW layers of a Vision Transformer, in ``modules()`` order.

    In every block the value projection ``attn.v``, the output projection
    ``attn.proj`` (when ``kw_proj``) and the two MLP layers are KW; the
    blocks are taken in groups of ``blocks_per_warehouse`` consecutive ones
    (the last group may be shorter), and all KW layers of a group share one
    warehouse, named ``'layers[a:b]'`` for blocks a..b-1.
    """
    d, hidden = embed_dims, feedforward_channels
    specs: List[LayerSpec] = []
    for i in range(num_layers):
        start = i - i % blocks_per_warehouse
        key = warehouse_name(start, min(start + blocks_per_warehouse, num_layers))
        name = f'layers.{i}'
        specs.append(LayerSpec(f'{name}.attn.v', d, d, (1,), key, name))
        if kw_proj:
            specs.append(LayerSpec(f'{name}.attn.proj', d, d, (1,), key, name))
        specs.append(LayerSpec(f'{name}.ffn.layers.0.0', hidden, d, (1,), key, name))
        specs.append(LayerSpec(f'{name}.ffn.layers.1', d, hidden, (1,), key, name))
    return specs


def warehouse_name(start: int, end: int) -> str:
    """Name of the warehouse of blocks ``start..end-1``, e.g. ``'layers[3:6]'``."""
    return f'layers[{start}:{end}]'


@MODELS.register_module()
class KWVisionTransformer(KWBaseBackbone, VisionTransformer):
    """Vision Transformer (DeiT) with KernelWarehouse linear layers (paper Table 11).

    The value projection and the two MLP layers of every block (and the
    attention's output projection, with ``kw_proj``) are
    :class:`~kw_mm.layers.KWLinear` layers; the query and key projections
    stay plain (each block's ``attn.qk``, split from mmpretrain's fused
    ``attn.qkv``). The KW layers of ``blocks_per_warehouse`` consecutive
    blocks share one warehouse. The defaults are the layout that reproduces
    the parameter counts of the paper's Table 11 (configs/kw_deit/README.md).

    With ``kw_cfg=None`` the backbone is mmpretrain's ``VisionTransformer``:
    the same modules under the same names (``attn.qkv`` included), the same
    state-dict keys and the same outputs for the same weights, so mmpretrain's
    DeiT checkpoints load into it. Everything but the KW options is
    mmpretrain's ``VisionTransformer`` (forward, ``out_type``, position
    embedding resizing, layer-wise learning-rate decay depths), except its
    per-block ``layer_cfgs`` (e.g. SwiGLU FFNs), which this backbone does not
    take. A KW checkpoint loads into a model of the same variant only: another
    budget or layout, or a plain checkpoint, is refused naming the tensors
    that differ.

    Args:
        arch (str | dict): An arch of mmpretrain's ``VisionTransformer``
            ('deit-tiny', 'deit-small', 'deit-base', 'base', ...) or a dict
            with ``embed_dims``, ``num_layers``, ``num_heads`` and
            ``feedforward_channels``. Defaults to 'deit-tiny'.
        kw_cfg (dict, optional): The KW options, any of
            :class:`~kw_mm.layers.KWOptions` (which documents each one and
            its default); kept as ``self.kw_options``. ``None`` builds the
            plain model. ``budget=0.75`` builds the paper's KW (3/4×) (see
            ``kw_warehouses``). Defaults to ``dict(budget=1)``.
        blocks_per_warehouse (int): Consecutive blocks whose KW layers share
            one warehouse. Defaults to 3.
        kw_proj (bool): Whether the attention's output projection is KW too.
            Defaults to True.
        kw_warehouses (dict, optional): Per-warehouse overrides of
            ``budget`` / ``cell_in_ratio`` / ``cell_out_ratio``, keyed by
            warehouse name ``'layers[a:b]'`` (see :meth:`warehouse_names`).
            Defaults to None.
        img_size (int | tuple): Input size the position embedding is made
            for. Defaults to 224.
        patch_size (int | tuple): Patch size. Defaults to 16.
        in_channels (int): Input image channels. Defaults to 3.
        out_indices (int | Sequence[int]): Blocks whose outputs are returned
            (negative indices allowed). Defaults to -1.
        drop_rate (float): Dropout after the position embedding, the
            attention projection and in the MLP. Defaults to 0.
        drop_path_rate (float): Stochastic depth, increasing linearly from 0
            over the blocks. Defaults to 0.
        qkv_bias (bool): Biases of the query, key and value. Defaults to True.
        norm_cfg (dict): Norm layers. Defaults to ``dict(type='LN', eps=1e-6)``.
        final_norm (bool): Normalise the last block's output. Defaults to True.
        out_type (str): 'cls_token', 'featmap', 'avg_featmap' or 'raw', as
            mmpretrain. Defaults to 'cls_token'.
        with_cls_token (bool): Prepend the class token. Defaults to True.
        frozen_stages (int): As mmpretrain: with i > 0 the patch and position
            embeddings, the class token and blocks 1..i are frozen (and the
            final norm when i is the number of blocks); the warehouses the
            frozen blocks draw from are frozen with them. Defaults to -1.
        interpolate_mode (str): How the position embedding is resized.
            Defaults to 'bicubic'.
        layer_scale_init_value (float): Layer scale; 0 disables it.
            Defaults to 0.
        patch_cfg (dict): Overrides of the patch embedding's config.
        pre_norm (bool): A norm after the position embedding (CLIP style).
            Defaults to False.
        init_cfg (dict | list[dict], optional): mmengine init config; KW
            attentions keep their own initialisation. Defaults to None.
    """

    def __init__(self, arch: Union[str, Mapping[str, int]] = 'deit-tiny',
                 kw_cfg: Optional[Dict[str, Any]] = dict(budget=1.0),
                 blocks_per_warehouse: int = 3, kw_proj: bool = True,
                 kw_warehouses: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 img_size: Union[int, Tuple[int, int]] = 224,
                 patch_size: Union[int, Tuple[int, int]] = 16, in_channels: int = 3,
                 out_indices: Union[int, Sequence[int]] = -1, drop_rate: float = 0.,
                 drop_path_rate: float = 0., qkv_bias: bool = True,
                 norm_cfg: Optional[dict] = None, final_norm: bool = True,
                 out_type: str = 'cls_token', with_cls_token: bool = True,
                 frozen_stages: int = -1, interpolate_mode: str = 'bicubic',
                 layer_scale_init_value: float = 0., patch_cfg: Optional[dict] = None,
                 pre_norm: bool = False, init_cfg=None) -> None:
        # VisionTransformer.__init__ would build mmpretrain's blocks; the rest
        # of its construction is done here, in its order (same module order).
        BaseModule.__init__(self, init_cfg)
        self.arch_settings = self._parse_arch(arch)
        self.embed_dims = self.arch_settings['embed_dims']
        self.num_layers = self.arch_settings['num_layers']
        self.img_size = to_2tuple(img_size)
        self.kw_options = KWOptions.from_kw_cfg(kw_cfg)
        self.kw_cfg = None if self.kw_options is None else self.kw_options.as_dict()
        for label, value in (('blocks_per_warehouse', blocks_per_warehouse),
                             ('in_channels', in_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f'{label} must be a positive int, got {value!r}')
        if not isinstance(kw_proj, bool):
            raise ValueError(f'kw_proj must be True or False, got {kw_proj!r}')
        for label, value in (('drop_rate', drop_rate), ('drop_path_rate', drop_path_rate)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0 <= value < 1:
                raise ValueError(f'{label} must be a number in [0, 1), got {value!r}')
        if out_type not in self.OUT_TYPES:
            raise ValueError(f'out_type must be one of {sorted(self.OUT_TYPES)}, '
                             f'got {out_type!r}')
        if not with_cls_token and out_type == 'cls_token':
            raise ValueError("with_cls_token=False needs an out_type other than 'cls_token', "
                             "which returns the class token")
        self.blocks_per_warehouse = blocks_per_warehouse
        self.kw_proj = kw_proj
        norm_cfg = norm_cfg or dict(type='LN', eps=1e-6)

        _patch_cfg = dict(in_channels=in_channels, input_size=img_size,
                          embed_dims=self.embed_dims, conv_type='Conv2d',
                          kernel_size=patch_size, stride=patch_size, bias=not pre_norm)
        _patch_cfg.update(patch_cfg or {})
        self.patch_embed = PatchEmbed(**_patch_cfg)
        self.patch_resolution = self.patch_embed.init_out_size
        num_patches = self.patch_resolution[0] * self.patch_resolution[1]
        self.out_type = out_type
        self.with_cls_token = with_cls_token
        if with_cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, self.embed_dims))
        else:
            self.cls_token = None
            self.num_extra_tokens = 0
        self.interpolate_mode = interpolate_mode
        self.pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + self.num_extra_tokens, self.embed_dims))
        self._register_load_state_dict_pre_hook(self._prepare_pos_embed)
        self.drop_after_pos = nn.Dropout(p=drop_rate)
        self.out_indices = list(check_out_indices(out_indices, self.num_layers))

        specs = vit_kw_layout(self.num_layers, self.embed_dims,
                              self.arch_settings['feedforward_channels'], blocks_per_warehouse,
                              kw_proj)
        builder = WarehouseBuilder(specs, self.kw_options,
                                   per_warehouse=self._per_warehouse(specs, kw_warehouses))
        if self.kw_options:
            self.warehouses = builder.warehouses
        rates = np.linspace(0, drop_path_rate, self.num_layers)
        self.layers = ModuleList(
            KWTransformerEncoderLayer(
                f'layers.{i}', builder, self.embed_dims, self.arch_settings['num_heads'],
                self.arch_settings['feedforward_channels'], layer_scale_init_value, drop_rate,
                0., float(rates[i]), qkv_bias, norm_cfg) for i in range(self.num_layers))
        builder.check_complete()

        self.frozen_stages = check_frozen_stages(frozen_stages, self.num_layers)
        self.pre_norm = build_norm_layer(norm_cfg, self.embed_dims) if pre_norm \
            else nn.Identity()
        self.final_norm = final_norm
        if final_norm:
            self.ln1 = build_norm_layer(norm_cfg, self.embed_dims)
        if self.out_type == 'avg_featmap':
            self.ln2 = build_norm_layer(norm_cfg, self.embed_dims)
        self._freeze_stages()

    @classmethod
    def _parse_arch(cls, arch) -> Dict[str, int]:
        keys = {'embed_dims', 'num_layers', 'num_heads', 'feedforward_channels'}
        if isinstance(arch, str):
            if arch.lower() not in cls.arch_zoo:
                raise ValueError(f'arch must be one of {sorted(cls.arch_zoo)} or a dict with '
                                 f'{sorted(keys)}, got {arch!r}')
            return dict(cls.arch_zoo[arch.lower()])
        if not isinstance(arch, Mapping) or not keys <= set(arch):
            raise ValueError(f'arch must be a name or a dict with the keys {sorted(keys)}, '
                             f'got {arch!r}')
        settings = dict(arch)
        for key in sorted(keys):
            value = settings[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f'arch[{key!r}] must be a positive int, got {value!r}')
        if settings['embed_dims'] % settings['num_heads']:
            raise ValueError(f"arch embed_dims={settings['embed_dims']} must be divisible by "
                             f"num_heads={settings['num_heads']}")
        return settings

    def _per_warehouse(self, specs: Sequence[LayerSpec],
                       kw_warehouses: Optional[Mapping[str, Mapping[str, Any]]]
                       ) -> Dict[Hashable, Dict[str, Any]]:
        names = list(dict.fromkeys(spec.warehouse for spec in specs))
        overrides: Dict[Hashable, Dict[str, Any]] = {}
        return add_warehouse_overrides(overrides, kw_warehouses, names, 'this layout')

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # resize a checkpoint's position embedding first (mmpretrain's pre-hook,
        # idempotent), so that the variant check compares the other tensors
        self._prepare_pos_embed(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _freeze_stages(self) -> None:
        if self.frozen_stages > 0:
            VisionTransformer._freeze_stages(self)
            freeze_modules(self.layers[:self.frozen_stages])

    @classmethod
    def warehouse_names(cls, arch: Union[str, Mapping[str, int]] = 'deit-tiny',
                        blocks_per_warehouse: int = 3) -> List[str]:
        """Warehouse names of a layout in warehouse (index) order."""
        settings = cls._parse_arch(arch)
        num_layers = settings['num_layers']
        return [warehouse_name(s, min(s + blocks_per_warehouse, num_layers))
                for s in range(0, num_layers, blocks_per_warehouse)]

    def get_layer_depth(self, param_name: str, prefix: str = '') -> Tuple[int, int]:
        """mmpretrain's layer depth (for layer-wise learning-rate decay); a
        warehouse counts as its first block."""
        if param_name.startswith(prefix + 'warehouses.'):
            index = int(param_name[len(prefix + 'warehouses.'):].split('.')[0])
            first = self.warehouses[index].plan.layers[0].kernel.name  # 'layers.i.attn.v'
            return int(first.split('.')[1]) + 1, self.num_layers + 2
        return super().get_layer_depth(param_name, prefix)
