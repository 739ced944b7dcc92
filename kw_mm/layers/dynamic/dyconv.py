"""DY-Conv: dynamic convolution (Chen et al., CVPR 2020).

Each sample's kernel is ``Σ_i π_i(x) · W_i`` over ``n`` kernels, with
attentions ``π(x) = softmax(FC(ReLU(FC(GAP(x)))) / T)``: a squeeze-and-excitation
branch (both FC layers with bias, no normalisation) whose hidden width is
``max(int(C_in · reduction), min_hidden)`` (reduction 1/4, as in DY-Conv),
and a softmax with temperature T, which DY-Conv anneals from 30 to 1 over the
first 10 epochs (:class:`~kw_mm.engine.DynamicConvTemperatureHook`).
``attention_fn='caf'`` replaces the softmax by CAF (paper Table 10). This
attention gives the paper's parameter counts of DY-Conv (4×) for ResNet18,
ResNet50 and MobileNetV2 (45.47M, 100.88M, 12.40M); DY-Conv as a KW
configuration (``kw_cfg`` with ``kernel_partition=False``: KW's attention,
with a BatchNorm, a minimum width of 16 and the zero cell's logit, on KW's
layers) gives 45.47M, 100.83M and 12.42M.
"""
from __future__ import annotations

from typing import Any, Union

import torch
from mmengine.registry import MODELS
from torch import nn

from ..attention import CAFMixing, global_pool
from ..options import IntOrTuple
from .base import (
    Attentions,
    DynamicConv2d,
)
from .odconv import ATTENTION_OPTIONS, check_attention_option


class DYConvAttention(nn.Module):
    """DY-Conv's kernel attention for one layer.

    Args:
        in_channels (int): The layer's input channels.
        kernel_num (int): Its number of kernels.
        reduction (float): Hidden width as a fraction of ``in_channels``.
            Defaults to 1/4.
        min_hidden (int): Smallest hidden width. Defaults to 1.
        attention_fn (str): ``'softmax'`` or ``'caf'``. Defaults to 'softmax'.
        temperature (float): Initial softmax temperature T (≥ 1). Defaults to 1.
    """

    def __init__(self, in_channels: int, kernel_num: int, reduction: float = 1 / 4,
                 min_hidden: int = 1, attention_fn: str = 'softmax',
                 temperature: float = 1.0) -> None:
        super().__init__()
        hidden = max(int(in_channels * reduction), min_hidden)
        self.attention_fn = attention_fn
        self.fc1 = nn.Linear(in_channels, hidden)
        self.act1 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, kernel_num)
        self.caf = CAFMixing(kernel_num) if attention_fn == 'caf' else None
        self.register_buffer('temperature', torch.tensor(float(temperature)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for fc in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(fc.weight, mode='fan_out', nonlinearity='relu')
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Kernel attentions ``[B, n]``."""
        z = self.fc2(self.act1(self.fc1(global_pool(x))))
        if self.caf is not None:
            return self.caf(z)
        return torch.softmax(z / self.temperature.to(z.dtype), dim=-1)


@MODELS.register_module()
class DYConv2d(DynamicConv2d):
    """Dynamic convolution (Chen et al., 2020).

    ``DYConv2d(in, out, k, stride, padding, dilation, groups, bias,
    padding_mode, kernel_num=4)`` takes the arguments of ``torch.nn.Conv2d``
    (checked as it does) and these options (also the keys of a backbone's
    ``dynamic_cfg=dict(type='DYConv', ...)``):

    Args:
        kernel_num (int): Number of kernels n ("DY-Conv (n×)"). Defaults to 4.
        reduction (float): Attention hidden width as a fraction of the input
            channels. Defaults to 1/4.
        min_hidden (int): Smallest attention hidden width. Defaults to 1.
        attention_fn (str): ``'softmax'`` (DY-Conv's) or ``'caf'`` (paper
            Table 10: CAF with τ and the one-hot β of the first kernel, driven
            by ``KWTemperatureHook``). Defaults to 'softmax'.
        temperature (float): Initial softmax temperature T ≥ 1
            (``DynamicConvTemperatureHook`` anneals it). Defaults to 1.
        recompute_kernels (bool): See :class:`DynamicConv2d`. Defaults to True.

    Parameters: ``weight [n, out, in/groups, kh, kw]``, the attention
    (``attention.fc1``, ``.fc2``) and ``bias``.
    """

    method = 'DYConv'
    option_names = ('kernel_num', 'reduction', 'min_hidden', 'attention_fn', 'temperature',
                    'recompute_kernels')

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrTuple,
                 stride: IntOrTuple = 1, padding: Union[IntOrTuple, str] = 0,
                 dilation: IntOrTuple = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = 'zeros', *, kernel_num: int = 4, reduction: float = 1 / 4,
                 min_hidden: int = 1, attention_fn: str = 'softmax', temperature: float = 1.0,
                 recompute_kernels: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, kernel_num=kernel_num,
                         recompute_kernels=recompute_kernels)
        options = self.check_options(dict(reduction=reduction, min_hidden=min_hidden,
                                          attention_fn=attention_fn, temperature=temperature))
        self.attention = DYConvAttention(in_channels, kernel_num, **options)
        self.reset_parameters()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @classmethod
    def check_option(cls, name: str, value: Any, label: str) -> Any:
        if name in ATTENTION_OPTIONS:
            return check_attention_option(name, value, label, reduction_example='1/4')
        return super().check_option(name, value, label)

    def attend(self, x: torch.Tensor) -> Attentions:
        return self.attention(x), None, None

    def make_kernel(self, coefficients: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(coefficients.dtype)
        mixed = torch.matmul(coefficients, weight.view(self.kernel_num, -1))
        return mixed.view(coefficients.shape[0], *self.weight.shape[1:])
