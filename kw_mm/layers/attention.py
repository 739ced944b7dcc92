"""The attention module of a KW layer and the contrasting-driven attention
function (CAF), paper §3.4 (Eq. 4) and appendix A.3.

For an input ``x`` the module computes, per sample, ``m`` rows of ``n + 1``
logits (one row per linear mixture of the layer, one column per warehouse
cell plus the zero cell e_z), normalises each row by the sum of its absolute
values (CAF) and mixes the result with the one-hot initialisation β::

    α = (1 − τ) · z / (Σ|z| + 1e-3) + τ · β

τ (the temperature) is a persistent buffer, so checkpoints carry the value a
model was evaluated with; β is a non-persistent buffer rebuilt from the
warehouse plan. Both follow ``.to()``, ``.half()`` and ``deepcopy``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .options import ATTENTION_FUNCTIONS, ATTENTION_NORMS, KWOptions  # noqa: F401
from .partition import ZERO_CELL, LayerPlan

#: the constant the authors add to CAF's denominator (keeps all-zero logits finite).
CAF_EPS = 1e-3


class _BatchNorm1dAnyBatch(nn.BatchNorm1d):
    """BatchNorm1d that also trains on a single sample.

    Batch statistics of one sample are undefined (plain BatchNorm1d raises),
    so a batch of one is normalised with the running statistics, which are
    left unchanged; the affine parameters still receive gradients.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                self.bias, False, 0.0, self.eps)
        return super().forward(x)


class KWAttention(nn.Module):
    """SE-style attention that outputs the mixing weights α of one KW layer.

    GAP → FC (no bias; with bias under LayerNorm) → norm → ReLU → FC (bias)
    → CAF, as in the authors' released models.

    Args:
        in_channels (int): Input channels of the layer.
        layer_plan (LayerPlan): The layer's partition and β assignment.
        num_cells (int): Cells ``n`` each mixture attends to (the warehouse's,
            or a mixture's own without sharing).
        budget (float): The warehouse's budget (used by the non-local basis
            and ``init='n_to_one'``). Defaults to 1.
        init (str, optional): The warehouse's β strategy (see
            :class:`~kw_mm.layers.options.KWOptions`): ``'all_to_one'`` and
            ``'n_to_one'`` set several cells per row here, ``'none'`` drops
            the τ·β term (α = f(z) whatever τ). Defaults to 'one_to_one'.
        options (KWOptions, optional): ``reduction``, ``min_hidden``,
            ``norm``, ``nonlocal_basis_ratio``, ``temperature`` (initial τ)
            and ``attention_fn`` are read from it. Defaults to
            ``KWOptions()``.
    """

    def __init__(self, in_channels: int, layer_plan: LayerPlan, num_cells: int,
                 budget: float = 1.0, init: Optional[str] = None,
                 options: Optional[KWOptions] = None) -> None:
        super().__init__()
        options = KWOptions() if options is None else options
        attention_fn, norm = options.attention_fn, options.norm
        reduction, min_hidden = options.reduction, options.min_hidden
        nonlocal_basis_ratio, temperature = options.nonlocal_basis_ratio, options.temperature
        self.attention_fn = attention_fn
        self.init = init or 'one_to_one'
        self.num_mixtures = layer_plan.num_mixtures
        self.num_cells = num_cells
        hidden = max(int(in_channels * reduction), min_hidden)
        self.fc1 = nn.Linear(in_channels, hidden, bias=(norm == 'LN'))
        self.norm1 = _BatchNorm1dAnyBatch(hidden) if norm == 'BN' else nn.LayerNorm(hidden)
        self.act1 = nn.ReLU(inplace=True)
        row = num_cells + 1
        self.use_basis = nonlocal_basis_ratio > 0
        if self.use_basis:
            self.num_local = int(budget * self.num_mixtures)
            num_nonlocal = num_cells - self.num_local
            self.num_basis = max(int(num_nonlocal * nonlocal_basis_ratio), 16)
            self.local_start = layer_plan.first_cell
            self.fc2 = nn.Linear(hidden, self.num_mixtures * (self.num_local + self.num_basis + 1),
                                 bias=False)
            self.fc3 = nn.Linear(self.num_basis, num_nonlocal, bias=False)
            self.basis_bias = nn.Parameter(torch.zeros(self.num_mixtures * row))
        else:
            self.fc2 = nn.Linear(hidden, self.num_mixtures * row)
        beta = torch.zeros(self.num_mixtures, row)
        for i, cell in enumerate(layer_plan.beta):
            if cell == ZERO_CELL:
                beta[i, num_cells] = 1.0
            elif self.init == 'n_to_one':  # the int(b) cells starting at the plan's one
                beta[i, cell:min(cell + int(budget), num_cells)] = 1.0
            else:
                beta[i, cell] = 1.0
        if self.init == 'all_to_one':
            beta.zero_()
            beta[:, :num_cells] = 1.0
        self.register_buffer('beta', beta, persistent=False)
        self.register_buffer('temperature', torch.tensor(float(temperature)))
        # KW* (options.omni_attention): ODConv's attentions along the kernel's
        # input channels, output channels (depth-wise layers too, unlike ODConv:
        # that gives the paper's 12.51M for MobileNetV2 KW* 4x) and spatial
        # positions (not for 1x1 layers), from the same hidden vector
        self.omni = options.omni_attention
        self.channel_fc = self.filter_fc = self.spatial_fc = None
        if self.omni:
            kernel = layer_plan.kernel
            positions = math.prod(kernel.kernel_size)
            self.channel_fc = nn.Linear(hidden, in_channels)
            self.filter_fc = nn.Linear(hidden, kernel.out_channels)
            self.spatial_fc = None if positions == 1 else nn.Linear(hidden, positions)
        self.reset_parameters()

    def _omni_fcs(self):
        return tuple(fc for fc in (self.channel_fc, self.filter_fc, self.spatial_fc)
                     if fc is not None)

    def reset_parameters(self) -> None:
        for fc in ((self.fc1, self.fc2) + ((self.fc3,) if self.use_basis else ())
                   + self._omni_fcs()):
            nn.init.kaiming_normal_(fc.weight, mode='fan_out', nonlinearity='relu')
            if fc.bias is not None:
                nn.init.zeros_(fc.bias)
        nn.init.ones_(self.norm1.weight)
        nn.init.zeros_(self.norm1.bias)
        if self.use_basis:
            nn.init.zeros_(self.basis_bias)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden vector ``[B, d]`` the logits are computed from (GAP → FC → norm → ReLU)."""
        return self.act1(self.norm1(self.fc1(global_pool(x))))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample logits ``[B, m, n + 1]`` (zero cell last)."""
        return self._logits(self.hidden(x))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        z = self.fc2(h)
        if not self.use_basis:
            return z.view(-1, self.num_mixtures, self.num_cells + 1)
        z = z.view(-1, self.num_mixtures, self.num_local + self.num_basis + 1)
        local, basis, zero = z.split([self.num_local, self.num_basis, 1], dim=-1)
        nonlocal_ = self.fc3(basis)
        s = self.local_start
        z = torch.cat([nonlocal_[..., :s], local, nonlocal_[..., s:], zero], dim=-1)
        return z + self.basis_bias.view(self.num_mixtures, -1)

    def attentions(self, x: torch.Tensor) -> torch.Tensor:
        """All ``n + 1`` attentions per mixture, ``[B, m, n + 1]`` (zero cell last)."""
        return self._normalise(self.logits(x))

    def _normalise(self, logits: torch.Tensor) -> torch.Tensor:
        if self.attention_fn == 'caf' and self.init != 'none':
            return caf(logits, self.beta, self.temperature)
        normalised = ATTENTION_FUNCTION_IMPLS[self.attention_fn](logits)
        if self.init == 'none':
            return normalised
        tau = self.temperature.to(normalised.dtype)
        return (1 - tau) * normalised + tau * self.beta.to(normalised.dtype)

    def forward(self, x: torch.Tensor, omni: bool = False):
        """Attentions ``α`` of shape ``[B, m, n]`` (the zero cell dropped).

        With ``omni`` (KW* layers only): ``(α, channel [B, in], filters
        [B, out], spatial [B, positions] or None)``, ODConv's
        attentions (sigmoids) from the same hidden vector.
        """
        if not omni:
            return self.attentions(x)[..., :-1]
        if not self.omni:
            raise RuntimeError('omni=True needs an attention built with omni_attention=True')
        h = self.hidden(x)
        alpha = self._normalise(self._logits(h))[..., :-1]
        return (alpha,) + tuple(None if fc is None else torch.sigmoid(fc(h))
                                for fc in (self.channel_fc, self.filter_fc, self.spatial_fc))


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """The spatial mean ``[B, C]`` of ``x [B, C, *S]`` (``x`` itself when 2-D).

    A sum divided on the pooled ``[B, C]`` values: the sum's backward hands
    the input an expanded view of the pooled gradient (mean's materialises
    B×C×H×W values).
    """
    if x.dim() <= 2:
        return x
    return x.sum(tuple(range(2, x.dim()))) / math.prod(x.shape[2:])


class CAFMixing(nn.Module):
    """CAF (paper Eq. 4) as the kernel attention of another dynamic convolution
    (paper Table 10: DY-Conv and ODConv with "our CAF").

    ``α = (1 − τ)·z / (Σ|z| + 1e-3) + τ·β`` over ``n`` kernels, with β one-hot
    on the first kernel (the one-to-one initialisation of a layer with one
    mixture, as KW's ``kernel_partition=False`` plans it), so that at τ = 1
    the layer starts as a plain convolution with its first kernel. τ is a
    persistent buffer set by :func:`set_temperature` and ``KWTemperatureHook``
    like a KW attention's.

    Args:
        num_kernels (int): The kernels ``n`` the attention weights.
        temperature (float): Initial τ in [0, 1]. Defaults to 1.
    """

    def __init__(self, num_kernels: int, temperature: float = 1.0) -> None:
        super().__init__()
        beta = torch.zeros(num_kernels)
        beta[0] = 1.0
        self.register_buffer('beta', beta, persistent=False)
        self.register_buffer('temperature', torch.tensor(float(temperature)))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """Attentions ``[B, n]`` from logits ``[B, n]``."""
        return caf(logits, self.beta, self.temperature)


def caf_normalise(logits: torch.Tensor) -> torch.Tensor:
    """CAF's normalisation z / (Σ|z| + 1e-3) over the last dim."""
    return logits / (logits.abs().sum(dim=-1, keepdim=True) + CAF_EPS)


def caf(logits: torch.Tensor, beta: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Contrasting-driven attention function, paper Eq. 4, over the last dim."""
    normalised = caf_normalise(logits)
    tau = temperature.to(normalised.dtype)
    return (1 - tau) * normalised + tau * beta.to(normalised.dtype)


ATTENTION_FUNCTION_IMPLS = {
    'caf': caf_normalise,
    'softmax': lambda z: torch.softmax(z, dim=-1),
    'sigmoid': torch.sigmoid,
    'relu_norm': lambda z: z.clamp(min=0) / (z.abs().sum(dim=-1, keepdim=True) + CAF_EPS),
}


#: the modules whose τ :func:`set_temperature` sets.
TAU_MODULES = (KWAttention, CAFMixing)


def set_temperature(model: nn.Module, value: float) -> int:
    """Set τ on every KW attention in ``model`` (wrapped or not), and on the
    CAF kernel attentions of other dynamic convolutions (:class:`CAFMixing`).

    Args:
        model (nn.Module): Any module; wrappers such as DDP are traversed,
            since their ``modules()`` include the wrapped model's.
        value (float): The new temperature, in [0, 1].

    Returns:
        int: How many attentions were updated.
    """
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f'temperature must be in [0, 1], got {value!r}')
    count = 0
    for module in model.modules():
        if isinstance(module, TAU_MODULES):
            module.temperature.fill_(value)
            count += 1
    return count


def get_temperature(model: nn.Module) -> Optional[float]:
    """τ of the first KW attention (or :class:`CAFMixing`) in ``model``, or None
    when it has none."""
    for module in model.modules():
        if isinstance(module, TAU_MODULES):
            return float(module.temperature)
    return None
