"""Inference through a KW layer's kernel basis: fewer rows to mix than cells.

With CAF (paper Eq. 4) a sample's attentions are an affine function of the
attention's hidden vector ``h_b`` (width d, after its norm and ReLU), up to
one scale per mixture: ``z_b = W₂ h_b + b₂`` (``W₂ [m·(n+1), d]``, the zero
cell last), ``s_b[i] = Σ_j |z_b[i, j]| + 1e-3`` and
``α_b[i, j] = (1 − τ)·z_b[i, j] / s_b[i] + τ·β[i, j]``. Mixture ``i`` of
sample ``b`` is therefore

    W_b[i] = Σ_j α_b[i, j]·e_j
           = (1 − τ)/s_b[i] · (Σ_k h_b[k]·F[i, k] + F[i, d]) + τ·F[i, d + 1]

with ``F[i, k] = Σ_j W₂[(i, j), k]·e_j``, ``F[i, d] = Σ_j b₂[i, j]·e_j`` and
``F[i, d + 1] = Σ_j β[i, j]·e_j`` (j over the n cells; the zero cell adds
nothing). The kernels of every sample lie in a (d + 2)-dimensional space
per mixture. While the cells and the attention's weights do not change
(inference), ``F`` is computed once, and each forward mixes d + 1 (τ = 0,
a trained model) or d + 2 rows per mixture instead of n cells: ResNet50's
third stage mixes 17 instead of 138 for its 3×3 layers and the 1×1 layers
that read 256 channels. The arithmetic is the assembly's, regrouped (float32
rounding differs at the 1e-7 level; tested against the reference path).

``F`` holds ``m·(d + 2)`` cell-sized rows per layer.
:func:`~.conditions.kernel_basis_pays` uses it where that at most halves the
rows mixed per sample and is no larger than
:data:`~.conditions.KERNEL_BASIS_MEMORY_RATIO` × the layer's warehouse (which the fused forward
streams through per call anyway), so the layer streams about as many bytes
and does a fraction of the multiply-adds. The cache lives on the layer,
is rebuilt when the cells, the attention's second layer or β change (their
version counters and storage), is dropped by the first forward that builds
an autograd graph (training), and is not copied by ``copy.deepcopy``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..attention import CAF_EPS, KWAttention
from .conditions import fused_applies, kernel_basis_pays
from .export import is_exporting
from .fused import run_fused
from .geometry import ConvGeometry, padded_input


def kernel_basis_rows(attention: KWAttention, with_beta: bool) -> Optional[int]:
    """Rows per mixture of ``attention``'s kernel basis, or None where the
    attentions are not affine in the hidden vector (softmax, sigmoid,
    ReLU-normalised; the non-local low-rank logits of released 1/2x models
    are affine too but not implemented here)."""
    if attention.attention_fn != 'caf' or attention.use_basis or attention.omni:
        return None  # (KW* layers' ODConv attentions are not affine in h)
    return attention.fc2.in_features + 1 + int(with_beta)


def with_beta(attention: KWAttention) -> bool:
    """Whether α has a τ·β term now (τ ≠ 0 and an initialisation with β)."""
    return attention.init != 'none' and float(attention.temperature) != 0.0


def _key(tensors) -> Tuple:
    return tuple((t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for t in tensors)


class KernelBasisCache:
    """One layer's cached kernel basis ``F [m, rows, cell numel]`` (see module docstring)."""

    def __init__(self) -> None:
        self._entry: Optional[Tuple[Tuple, torch.Tensor]] = None

    def __deepcopy__(self, memo) -> 'KernelBasisCache':
        return type(self)()  # a copy rebuilds its own from its own weights

    def clear(self) -> None:
        self._entry = None

    @property
    def cached(self) -> Optional[torch.Tensor]:
        return None if self._entry is None else self._entry[1]

    def get(self, attention: KWAttention, cells: torch.Tensor, beta: bool) -> torch.Tensor:
        """The kernel basis for ``cells [n, cell numel]`` (built if missing or stale)."""
        fc2 = attention.fc2
        key = _key((cells, fc2.weight, fc2.bias, attention.beta)) + (beta,)
        entry = self._entry
        if entry is not None and entry[0] == key:
            return entry[1]
        self._entry = None  # free the stale one before building
        with torch.no_grad():
            basis = build_kernel_basis(attention, cells, beta)
        self._entry = (key, basis)
        return basis


def build_kernel_basis(attention: KWAttention, cells: torch.Tensor,
                       beta: bool) -> torch.Tensor:
    """``F [m, rows, cell numel]`` from ``cells [n, cell numel]`` (module docstring)."""
    m, n = attention.num_mixtures, attention.num_cells
    fc2 = attention.fc2
    hidden = fc2.in_features
    weight = fc2.weight.view(m, n + 1, hidden)[:, :n].transpose(1, 2)  # [m, d, n]
    rows = [weight, fc2.bias.view(m, 1, n + 1)[..., :n]]
    if beta:
        rows.append(attention.beta[:, :n].unsqueeze(1))
    mixing = torch.cat(rows, dim=1).to(cells.dtype)  # [m, rows, n]
    return torch.matmul(mixing.reshape(-1, n), cells).view(m, mixing.shape[1], -1)


def kernel_basis_coefficients(attention: KWAttention, x: torch.Tensor,
                              beta: bool) -> torch.Tensor:
    """Per-sample coefficients ``[B, m, rows]`` of the kernel-basis rows for input ``x``."""
    h = attention.hidden(x)
    z = attention.fc2(h).view(-1, attention.num_mixtures, attention.num_cells + 1)
    tau = attention.temperature.to(z.dtype)
    keep = 1 - tau if attention.init != 'none' else torch.ones_like(tau)
    scale = keep / (z.abs().sum(dim=-1) + CAF_EPS)  # [B, m]
    parts = [scale.unsqueeze(-1) * h.unsqueeze(1), scale.unsqueeze(-1)]
    if beta:
        parts.append(tau.expand_as(scale).unsqueeze(-1))
    return torch.cat(parts, dim=-1)


def hooked(module: nn.Module) -> bool:
    """Whether ``module``'s forward has hooks (which the kernel-basis path would skip)."""
    from torch.nn.modules import module as module_mod
    return bool(module._forward_hooks or module._forward_pre_hooks
                or module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks)


def try_kernel_basis(g: ConvGeometry, x: torch.Tensor, attention: KWAttention,
                     cells: torch.Tensor, cache: KernelBasisCache,
                     enabled: bool) -> Optional[torch.Tensor]:
    """CPU inference (no autograd graph) through the layer's cached kernel basis
    with :func:`kw_mm.native.fused_conv2d_taps` (:func:`~.fused.run_fused`),
    where the fused path applies and :func:`~.conditions.kernel_basis_pays`;
    else None (without bias). A forward that builds a graph drops the cache.

    Args:
        enabled: The layer's ``inference_basis`` option.
    """
    if torch.is_grad_enabled() and (x.requires_grad or cells.requires_grad
                                    or attention.fc2.weight.requires_grad):
        cache.clear()
        return None
    if not enabled or is_exporting() or x.device.type != 'cpu' or hooked(attention):
        return None
    beta = with_beta(attention)
    rows = kernel_basis_rows(attention, beta)
    if rows is None or not kernel_basis_pays(g.num_mixtures, rows, g.num_cells):
        return None
    x_in = x if g.pointwise else padded_input(g, x)
    if not fused_applies(g, x_in, x):
        return None
    basis = cache.get(attention, cells.reshape(g.num_cells, -1).to(x.dtype), beta)
    coefficients = kernel_basis_coefficients(attention, x, beta).to(x.dtype)
    return run_fused(g, x_in, coefficients, basis)
