"""What the dynamic convolutions the paper compares against share.

A layer holds ``n`` static kernels ``weight [n, out, in/groups, kh, kw]`` and
an attention branch; for each sample it mixes the kernels with the sample's
attentions and convolves the sample with the result. Attentions along the
input and output channels (ODConv's) are applied to the input and to the
output, which is the same as multiplying them into each sample's kernel
(tested against :meth:`DynamicConv2d.reference_forward`, which does that).
The execution is :func:`kw_mm.layers.execution.dense.dense_forward`, shared
with KW layers with ODConv's attentions (KW*).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..execution.dense import dense_forward, fold_channel_attentions, reference_conv
from ..execution.geometry import ConvGeometry, whole_kernel_geometry
from ..options import IntOrTuple, set_conv_attributes

#: per-sample attentions: (kernel coefficients, input-channel, output-channel)
Attentions = Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_int(value: Any, name: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{name} must be a positive int ({what}), got {value!r}')
    return value


def check_positive_number(value: Any, name: str, what: str) -> float:
    if not _is_number(value) or not (math.isfinite(value) and value > 0):
        raise ValueError(f'{name} must be a positive finite number ({what}), got {value!r}')
    return float(value)


def check_choice(value: Any, name: str, choices: Tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f'{name} must be one of {choices}, got {value!r}')
    return value


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f'{name} must be True or False, got {value!r}')
    return value


class DynamicConv2d(nn.Module):
    """Base of the dynamic convolutions: ``n`` kernels mixed per sample.

    Subclasses build ``self.attention`` and implement :meth:`attend` (the
    per-sample attentions) and :meth:`make_kernel` (kernel coefficients to
    per-sample kernels). The constructor takes the arguments of
    ``torch.nn.Conv2d`` and checks them as it does (``padding_mode`` must be
    ``'zeros'``).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation,
        groups, bias, padding_mode: As ``torch.nn.Conv2d``. ``bias`` is one
            static bias added after the dynamic convolution.
        kernel_num (int): The number of kernels ``n`` (the budget, "n×").
        recompute_kernels (bool): While training, rebuild each sample's
            kernel in the backward pass instead of keeping ``B ×`` the
            layer's kernel for it (as ``KWOptions.recompute_kernels``).
            Defaults to True.
        device, dtype: As ``torch.nn.Conv2d``.

    Attributes:
        method (str): The method's name in ``dynamic_cfg`` (``'ODConv'``).
        option_names (tuple[str]): The keyword options a ``dynamic_cfg`` may set.
    """

    ndim = 2
    method = ''
    option_names: Tuple[str, ...] = ('kernel_num', 'recompute_kernels')
    #: whether the layers of one block may share one attention (``shared_attention``)
    shares_attention = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrTuple,
                 stride: IntOrTuple = 1, padding: Union[IntOrTuple, str] = 0,
                 dilation: IntOrTuple = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = 'zeros', *, kernel_num: int = 4,
                 recompute_kernels: bool = True) -> None:
        super().__init__()
        set_conv_attributes(self, in_channels, out_channels, kernel_size, stride, padding,
                            dilation, groups, padding_mode)
        self.kernel_num = self.check_option('kernel_num', kernel_num, 'kernel_num')
        self.recompute_kernels = self.check_option('recompute_kernels', recompute_kernels,
                                                   'recompute_kernels')
        self.weight = nn.Parameter(torch.empty(kernel_num, out_channels, in_channels // groups,
                                               *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.geometry: ConvGeometry = whole_kernel_geometry(
            in_channels, out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, groups)

    @classmethod
    def check_option(cls, name: str, value: Any, label: str) -> Any:
        """One option's value checked (``label`` names it in the message)."""
        if name == 'kernel_num':
            return check_positive_int(value, label, 'the number of kernels')
        if name == 'recompute_kernels':
            return check_bool(value, label)
        raise KeyError(name)

    @classmethod
    def check_options(cls, options: Mapping[str, Any], where: str = '') -> Dict[str, Any]:
        """``options`` checked as the constructor checks them, each named
        ``where + name`` (e.g. ``'dynamic_cfg.kernel_num'``).

        Raises:
            ValueError: an unknown key (naming the allowed ones) or a bad value.
        """
        unknown = sorted(set(options) - set(cls.option_names))
        if unknown:
            raise ValueError(f'{where}{cls.method or cls.__name__} has no option(s) {unknown}; '
                             f'its options are {list(cls.option_names)}')
        return {name: cls.check_option(name, value, where + name)
                for name, value in options.items()}

    def reset_parameters(self) -> None:
        """Each kernel Kaiming-normal (fan-out), as ODConv's code; the attention
        re-initialised, the bias zeroed."""
        with torch.no_grad():
            for i in range(self.kernel_num):
                nn.init.kaiming_normal_(self.weight[i], mode='fan_out', nonlinearity='relu')
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if 'attention' in self._modules:  # (not a shared one another layer owns)
            self.attention.reset_parameters()

    def init_weights(self) -> None:
        """The layer's own initialisation (so that mmengine and ``ConvModule``
        leave it alone)."""
        self.reset_parameters()

    def attend(self, x: torch.Tensor) -> Attentions:
        """Per-sample ``(kernel coefficients [B, ...], input-channel attentions
        [B, in] or None, output-channel attentions [B, out] or None)``."""
        raise NotImplementedError

    def make_kernel(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Per-sample kernels ``[B, out, in/groups, kh, kw]`` from kernel coefficients."""
        raise NotImplementedError

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f'{type(self).__name__} expects an input [B, {self.in_channels}, '
                             f'H, W], got shape {tuple(x.shape)}')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        coefficients, channel, filters = self.attend(x)
        batch = x.shape[0]
        if channel is not None:  # = the kernel's input channels scaled (ODConv's form)
            x = x * channel.to(x.dtype).view(batch, self.in_channels, 1, 1)
        out = dense_forward(self.geometry, x, coefficients, self.make_kernel, None,
                            self.recompute_kernels)
        if filters is not None:  # = the kernel's output channels scaled
            out = out * filters.to(out.dtype).view(batch, self.out_channels, 1, 1)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype).view(1, -1, 1, 1)
        return out

    def per_sample_kernels(self, x: torch.Tensor) -> torch.Tensor:
        """Each sample's whole kernel ``[B, out, in/groups, kh, kw]``, every
        attention multiplied in."""
        coefficients, channel, filters = self.attend(x)
        kernel = self.make_kernel(coefficients.to(x.dtype))
        cast = [None if a is None else a.to(x.dtype) for a in (channel, filters)]
        return fold_channel_attentions(kernel, *cast, self.groups)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The straightforward computation, for tests: each sample convolved on its
        own with its whole kernel."""
        self._check_input(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return reference_conv(self.geometry, x, self.per_sample_kernels(x), bias)

    def extra_repr(self) -> str:
        s = (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, '
             f'stride={self.stride}, padding={self.padding}')
        if self.dilation != (1, 1):
            s += f', dilation={self.dilation}'
        if self.groups != 1:
            s += f', groups={self.groups}'
        if self.bias is None:
            s += ', bias=False'
        return s + f', kernel_num={self.kernel_num}'
