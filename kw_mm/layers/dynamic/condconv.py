"""CondConv: conditionally parameterized convolution (Yang et al., NeurIPS 2019).

Each sample's kernel is ``Σ_i r_i(x) · W_i`` over ``n`` experts, with routing
weights ``r(x) = sigmoid(FC(GAP(x)))`` (one FC layer with bias, ``C_in → n``;
no normalisation over the experts). As in CondConv's code, the layers of one
block may share one routing function, computed from the block's input by
the block's first layer (``shared_attention``); a backbone's layout says
which (:func:`~kw_mm.models.backbones.kw_resnet.resnet_dynamic_layout`).
:class:`CondConvLinear` is the CondConv classifier.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from mmengine.registry import MODELS
from torch import nn

from ..attention import global_pool
from ..options import IntOrTuple
from .base import Attentions, DynamicConv2d, check_positive_int


class CondConvRouting(nn.Module):
    """CondConv's routing function: GAP → FC (bias) → sigmoid.

    When other layers share it (``followers`` > 0), each forward also keeps
    its result until every follower has taken it (:meth:`take`): the
    block's first layer computes the routing weights, the block's other
    layers reuse them.

    Args:
        in_channels (int): Channels of the input it pools.
        num_experts (int): The experts (kernels) it weights.
    """

    def __init__(self, in_channels: int, num_experts: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_experts)
        self.followers = 0
        self._kept: Optional[torch.Tensor] = None
        self._left = 0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.fc.reset_parameters()  # torch's Linear initialisation (a Dense layer's)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Routing weights ``[B, n]`` in (0, 1)."""
        routing = torch.sigmoid(self.fc(global_pool(x)))
        if self.followers:
            self._kept, self._left = routing, self.followers
        return routing

    def take(self, batch: int) -> torch.Tensor:
        """The routing weights of the last forward, for a follower layer."""
        kept = self._kept
        if kept is None or kept.shape[0] != batch:
            raise RuntimeError('a CondConv layer that shares its block\'s routing ran before '
                               'the block\'s first CondConv layer (which computes the routing '
                               'from the block\'s input): run the block, not the layer alone')
        self._left -= 1
        if self._left <= 0:
            self._kept = None
        return kept

    def __getstate__(self):
        state = super().__getstate__()
        state['_kept'], state['_left'] = None, 0  # copies (EMA) hold no activations
        return state


@MODELS.register_module()
class CondConv2d(DynamicConv2d):
    """Conditionally parameterized convolution (Yang et al., 2019).

    ``CondConv2d(in, out, k, stride, padding, dilation, groups, bias,
    padding_mode, kernel_num=8)`` takes the arguments of ``torch.nn.Conv2d``
    (checked as it does) and these options (also the keys of a backbone's
    ``dynamic_cfg=dict(type='CondConv', ...)``):

    Args:
        kernel_num (int): Number of experts n ("CondConv (n×)"). Defaults to 8.
        recompute_kernels (bool): See :class:`DynamicConv2d`. Defaults to True.
        shared_attention (CondConvRouting, optional): The routing of the
            block's first layer, to reuse instead of a routing of this
            layer's own (that layer must run before this one, on the block's
            input). Not registered here: the owner keeps it in its state
            dict. Defaults to None.

    Parameters: ``weight [n, out, in/groups, kh, kw]`` (the experts), the
    routing ``attention.fc`` (of a layer with its own) and ``bias``.
    """

    method = 'CondConv'
    option_names = ('kernel_num', 'recompute_kernels')
    shares_attention = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrTuple,
                 stride: IntOrTuple = 1, padding: Union[IntOrTuple, str] = 0,
                 dilation: IntOrTuple = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = 'zeros', *, kernel_num: int = 8,
                 recompute_kernels: bool = True,
                 shared_attention: Optional[CondConvRouting] = None,
                 device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, kernel_num=kernel_num,
                         recompute_kernels=recompute_kernels)
        if shared_attention is None:
            self.attention = CondConvRouting(in_channels, kernel_num)
        else:
            if not isinstance(shared_attention, CondConvRouting):
                raise TypeError(f'shared_attention must be a CondConvRouting, got '
                                f'{type(shared_attention).__name__}')
            if shared_attention.fc.out_features != kernel_num:
                raise ValueError(f'shared_attention routes {shared_attention.fc.out_features} '
                                 f'experts, this layer has kernel_num={kernel_num}')
            shared_attention.followers += 1
            # not registered (its owner's), so deepcopy re-points it at the copied owner's
            object.__setattr__(self, '_shared_routing', shared_attention)
        self.reset_parameters()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @property
    def routing(self) -> CondConvRouting:
        """The routing this layer uses (its own or the shared one)."""
        shared = self.__dict__.get('_shared_routing')
        return shared if shared is not None else self.attention

    def attend(self, x: torch.Tensor) -> Attentions:
        if '_shared_routing' in self.__dict__:
            return self.routing.take(x.shape[0]), None, None
        return self.attention(x), None, None

    def make_kernel(self, coefficients: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(coefficients.dtype)
        mixed = torch.matmul(coefficients, weight.view(self.kernel_num, -1))
        return mixed.view(coefficients.shape[0], *self.weight.shape[1:])

    def extra_repr(self) -> str:
        shared = ', shared routing' if '_shared_routing' in self.__dict__ else ''
        return super().extra_repr() + shared


class CondConvLinear(nn.Module):
    """A CondConv fully connected layer: ``y_b = (Σ_i r_i(x_b) W_i) x_b + bias``
    with CondConv's routing on its input (the classifier of the CondConv
    ResNets).

    Args:
        in_features (int): Input features.
        out_features (int): Output features.
        kernel_num (int): Number of experts. Defaults to 8.
        bias (bool): One static bias. Defaults to True.
    """

    def __init__(self, in_features: int, out_features: int, kernel_num: int = 8,
                 bias: bool = True) -> None:
        super().__init__()
        for label, value in (('in_features', in_features), ('out_features', out_features),
                             ('kernel_num', kernel_num)):
            check_positive_int(value, label, 'a layer size')
        self.in_features, self.out_features, self.kernel_num = (in_features, out_features,
                                                                kernel_num)
        self.weight = nn.Parameter(torch.empty(kernel_num, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.attention = CondConvRouting(in_features, kernel_num)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Experts ``Normal(0, 0.01)`` and a zero bias (mmpretrain's linear head's)."""
        nn.init.normal_(self.weight, 0, 0.01)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.attention.reset_parameters()

    def init_weights(self) -> None:
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f'CondConvLinear expects an input [B, {self.in_features}], got '
                             f'shape {tuple(x.shape)}')
        routing = self.attention(x)  # [B, n]
        # Σ_i r_i (W_i x): n small products instead of one kernel per sample
        per_expert = torch.einsum('bi,noi->bno', x, self.weight.to(x.dtype))
        out = torch.einsum('bn,bno->bo', routing.to(x.dtype), per_expert)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each sample through its own mixed weight (for tests)."""
        weight = torch.einsum('bn,noi->boi', self.attention(x), self.weight)
        out = torch.einsum('boi,bi->bo', weight, x)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f'in_features={self.in_features}, out_features={self.out_features}, '
                f'kernel_num={self.kernel_num}, bias={self.bias is not None}')
