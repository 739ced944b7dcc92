"""ODConv: omni-dimensional dynamic convolution (Li, Zhou & Yao, ICLR 2022).

Four attentions from one SE-style branch (GAP → FC → BN → ReLU, hidden width
``max(int(C_in · reduction), min_hidden)``, reduction 1/16 and minimum 16 as
in ODConv's paper and code) weight the ``n`` kernels along all four
dimensions of the kernel space::

    W_b = α_f ⊙ α_c ⊙ Σ_i α_w,i · (α_s ⊙ W_i)

α_s (spatial, k×k: sigmoid), α_c (input channels: sigmoid), α_f (output
channels: sigmoid) and α_w (kernels: softmax over the n kernels, or CAF for
the paper's Table 10). Every logit is divided by the temperature T first, as
in ODConv's code, whose training anneals T from 30 to 1 over the first 10
epochs (:class:`~kw_mm.engine.DynamicConvTemperatureHook`). As in ODConv's
code, depth-wise layers have no α_f, 1×1 layers no α_s and single-kernel
layers no α_w, and α_c and α_f are applied to the input and the output.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple, Union

import torch
from mmengine.registry import MODELS
from torch import nn

from ..attention import CAFMixing, _BatchNorm1dAnyBatch, global_pool
from ..options import IntOrTuple
from .base import (
    Attentions,
    DynamicConv2d,
    check_choice,
    check_positive_int,
    check_positive_number,
)

#: kernel attention functions of ODConv and DY-Conv ('caf': paper Table 10).
KERNEL_ATTENTIONS = ('softmax', 'caf')


def check_temperature(value: Any, label: str) -> float:
    """A softmax / sigmoid temperature: a finite number ≥ 1 (1 = none)."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not (math.isfinite(value) and value >= 1)):
        raise ValueError(f'{label} must be a finite number >= 1 (the temperature dividing the '
                         f'attention logits; 1 after annealing), got {value!r}')
    return float(value)


#: the attention options DY-Conv and ODConv share, checked by :func:`check_attention_option`
ATTENTION_OPTIONS = ('reduction', 'min_hidden', 'attention_fn', 'temperature')


def check_attention_option(name: str, value: Any, label: str, reduction_example: str) -> Any:
    """One of :data:`ATTENTION_OPTIONS` checked (``label`` names it in the message)."""
    if name == 'reduction':
        return check_positive_number(value, label, 'the attention hidden width / '
                                     f'in_channels, e.g. {reduction_example}')
    if name == 'min_hidden':
        return check_positive_int(value, label, 'the smallest attention hidden width')
    if name == 'attention_fn':
        return check_choice(value, label, KERNEL_ATTENTIONS)
    return check_temperature(value, label)


class ODConvAttention(nn.Module):
    """ODConv's attention branch for one layer.

    Args:
        in_channels (int): The layer's input channels.
        out_channels (int): Its output channels.
        kernel_size (tuple[int, int]): Its kernel size.
        groups (int): Its groups.
        kernel_num (int): Its number of kernels.
        reduction (float): Hidden width as a fraction of ``in_channels``.
            Defaults to 1/16.
        min_hidden (int): Smallest hidden width. Defaults to 16.
        attention_fn (str): ``'softmax'`` or ``'caf'`` for the kernel
            attention. Defaults to 'softmax'.
        temperature (float): Initial temperature T (≥ 1). Defaults to 1.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Tuple[int, int],
                 groups: int, kernel_num: int, reduction: float = 1 / 16, min_hidden: int = 16,
                 attention_fn: str = 'softmax', temperature: float = 1.0) -> None:
        super().__init__()
        hidden = max(int(in_channels * reduction), min_hidden)
        self.kernel_num = kernel_num
        self.attention_fn = attention_fn
        self.fc = nn.Linear(in_channels, hidden, bias=False)
        self.bn = _BatchNorm1dAnyBatch(hidden)
        self.relu = nn.ReLU(inplace=True)
        self.channel_fc = nn.Linear(hidden, in_channels)
        depthwise = in_channels == groups == out_channels
        self.filter_fc = None if depthwise else nn.Linear(hidden, out_channels)
        positions = math.prod(kernel_size)
        self.spatial_fc = None if positions == 1 else nn.Linear(hidden, positions)
        self.kernel_fc = None if kernel_num == 1 else nn.Linear(hidden, kernel_num)
        self.caf = (CAFMixing(kernel_num) if attention_fn == 'caf' and kernel_num > 1
                    else None)
        self.register_buffer('temperature', torch.tensor(float(temperature)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan-out) FC weights, zero biases, BN at (1, 0), as ODConv's code."""
        for fc in (self.fc, self.channel_fc, self.filter_fc, self.spatial_fc, self.kernel_fc):
            if fc is not None:
                nn.init.kaiming_normal_(fc.weight, mode='fan_out', nonlinearity='relu')
                if fc.bias is not None:
                    nn.init.zeros_(fc.bias)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def _sigmoid(self, fc: Optional[nn.Linear], h: torch.Tensor) -> Optional[torch.Tensor]:
        if fc is None:
            return None
        return torch.sigmoid(fc(h) / self.temperature.to(h.dtype))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor],
                                                Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(α_w [B, n] or None, α_s [B, kh·kw] or None, α_c [B, in], α_f [B, out] or None)``."""
        h = self.relu(self.bn(self.fc(global_pool(x))))
        kernel = None
        if self.kernel_fc is not None:
            z = self.kernel_fc(h)
            kernel = (self.caf(z) if self.caf is not None
                      else torch.softmax(z / self.temperature.to(z.dtype), dim=-1))
        return (kernel, self._sigmoid(self.spatial_fc, h), self._sigmoid(self.channel_fc, h),
                self._sigmoid(self.filter_fc, h))


@MODELS.register_module()
class ODConv2d(DynamicConv2d):
    """Omni-dimensional dynamic convolution (Li, Zhou & Yao, ICLR 2022).

    ``ODConv2d(in, out, k, stride, padding, dilation, groups, bias,
    padding_mode, kernel_num=4)`` takes the arguments of ``torch.nn.Conv2d``
    (checked as it does; ``padding_mode`` must be ``'zeros'``) and these
    options (also the keys of a backbone's ``dynamic_cfg=dict(type='ODConv',
    ...)``):

    Args:
        kernel_num (int): Number of kernels n ("ODConv (n×)"). Defaults to 4.
        reduction (float): Attention hidden width as a fraction of the input
            channels. Defaults to 1/16.
        min_hidden (int): Smallest attention hidden width. Defaults to 16.
        attention_fn (str): Kernel attention: ``'softmax'`` (ODConv's) or
            ``'caf'`` (paper Table 10: CAF with τ and the one-hot β of the
            first kernel, driven by ``KWTemperatureHook``). Defaults to 'softmax'.
        temperature (float): Initial temperature T ≥ 1 dividing every logit
            (``DynamicConvTemperatureHook`` anneals it). Defaults to 1.
        recompute_kernels (bool): See :class:`DynamicConv2d`. Defaults to True.

    Parameters: ``weight [n, out, in/groups, kh, kw]``, the attention
    (``attention.fc``, ``.bn``, ``.channel_fc``, ``.filter_fc``,
    ``.spatial_fc``, ``.kernel_fc``: the names of ODConv's code), ``bias``.
    """

    method = 'ODConv'
    option_names = ('kernel_num', 'reduction', 'min_hidden', 'attention_fn', 'temperature',
                    'recompute_kernels')

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrTuple,
                 stride: IntOrTuple = 1, padding: Union[IntOrTuple, str] = 0,
                 dilation: IntOrTuple = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = 'zeros', *, kernel_num: int = 4,
                 reduction: float = 1 / 16, min_hidden: int = 16, attention_fn: str = 'softmax',
                 temperature: float = 1.0, recompute_kernels: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, kernel_num=kernel_num,
                         recompute_kernels=recompute_kernels)
        options = self.check_options(dict(reduction=reduction, min_hidden=min_hidden,
                                          attention_fn=attention_fn, temperature=temperature))
        self.attention = ODConvAttention(in_channels, out_channels, self.kernel_size, groups,
                                         kernel_num, **options)
        self.reset_parameters()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @classmethod
    def check_option(cls, name: str, value: Any, label: str) -> Any:
        if name in ATTENTION_OPTIONS:
            return check_attention_option(name, value, label, reduction_example='1/16')
        return super().check_option(name, value, label)

    def attend(self, x: torch.Tensor) -> Attentions:
        kernel, spatial, channel, filters = self.attention(x)
        batch = x.shape[0]
        if kernel is None:
            kernel = x.new_ones(batch, 1)
        if spatial is None:
            spatial = x.new_ones(batch, 1)
        # one tensor of coefficients, so that backward can rebuild the kernels from it
        return torch.cat([kernel, spatial], dim=1), channel, filters

    def make_kernel(self, coefficients: torch.Tensor) -> torch.Tensor:
        kernel_attention, spatial = coefficients.split(
            [self.kernel_num, coefficients.shape[1] - self.kernel_num], dim=1)
        batch = coefficients.shape[0]
        weight = self.weight.to(coefficients.dtype)
        mixed = torch.matmul(kernel_attention, weight.view(self.kernel_num, -1))
        positions = spatial.shape[1]  # 1 where the layer has no spatial attention
        mixed = (mixed.view(batch, mixed.shape[1] // positions, positions)
                 * spatial.view(batch, 1, positions))
        return mixed.view(batch, *self.weight.shape[1:])
