"""Keep assembled kernels out of the autograd graph: recompute them in backward.

A KW layer's forward assembles one kernel per sample (``B ×`` the layer's
static kernel) and hands it to a convolution or matmul, which saves it for
its backward pass (the input gradient needs it). Across a network that is
``B ×`` all KW parameters kept alive until backward — for ResNet50 at batch 8
about as much memory as all its activations, and 12 GB at batch 128.

The kernel is a cheap function of tensors that autograd keeps anyway (the
attentions α, saved by the assembly matmul, and the warehouse cells), so
instead of saving it we save a recipe: :class:`KernelRecompute` is a pair of
``torch.autograd.graph.saved_tensors_hooks`` that, while the convolution
runs, replaces every saved tensor sharing the kernel's storage with its
view geometry, and in backward rebuilds the kernel once (the same operations
on the same values, so the same numbers) and serves the views from it. The
cost is one extra assembly per layer and training step.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Tuple

import torch


class KernelRecompute(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that store ``make_kernel(alpha)``'s views as recipes.

    Args:
        make_kernel (Callable): Rebuilds the kernel tensor from ``alpha``
            exactly as the forward pass built it (same storage layout).
        alpha (Tensor): The attentions the kernel was built from.
        kernel (Tensor): The kernel built in the forward pass.
    """

    def __init__(self, make_kernel: Callable[[torch.Tensor], torch.Tensor],
                 alpha: torch.Tensor, kernel: torch.Tensor) -> None:
        self._make_kernel = make_kernel
        self._alpha = alpha.detach()
        self._storage = kernel.untyped_storage().data_ptr()
        self._device = kernel.device
        # backward runs outside any autocast region: rebuild under the same one
        # (none on devices without autocast, e.g. 'meta')
        device_type = kernel.device.type
        self._autocast = None
        if torch.amp.is_autocast_available(device_type):
            self._autocast = dict(device_type=device_type,
                                  enabled=torch.is_autocast_enabled(device_type),
                                  dtype=torch.get_autocast_dtype(device_type))
        self._pending = 0
        self._cache: Optional[torch.Tensor] = None
        super().__init__(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> Any:
        if (tensor.device == self._device and tensor.layout == torch.strided
                and tensor.untyped_storage().data_ptr() == self._storage):
            self._pending += 1
            return _Recipe(self, tuple(tensor.size()), tuple(tensor.stride()),
                           tensor.storage_offset())
        return tensor

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Recipe):
            return packed
        owner = packed.owner
        if owner._cache is None:
            autocast = (torch.autocast(**owner._autocast) if owner._autocast is not None
                        else contextlib.nullcontext())
            with torch.no_grad(), autocast:
                owner._cache = owner._make_kernel(owner._alpha)
        view = owner._cache.as_strided(packed.size, packed.stride, packed.offset)
        owner._pending -= 1
        if owner._pending <= 0:  # every saved view rebuilt: let the kernel go
            owner._cache = None
        return view


class _Recipe:
    """Where a saved view sat in the kernel's storage."""
    __slots__ = ('owner', 'size', 'stride', 'offset')

    def __init__(self, owner: KernelRecompute, size: Tuple[int, ...], stride: Tuple[int, ...],
                 offset: int) -> None:
        self.owner = owner
        self.size = size
        self.stride = stride
        self.offset = offset


def hooks_unsupported() -> bool:
    """Whether saved-tensor hooks cannot see real storages here: functorch
    transforms (``torch.func.grad``, ``vmap``: wrapped tensors), tracing and
    ``torch.compile``. The kernels are then kept as without ``recompute_kernels``."""
    return (torch._C._are_functorch_transforms_active() or torch.jit.is_tracing()
            or torch.jit.is_scripting() or torch.compiler.is_compiling())


def run_with_kernel(alpha: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor],
                    make: Callable[[torch.Tensor], torch.Tensor],
                    recompute_kernels: bool) -> torch.Tensor:
    """``run(make(alpha))``.

    While training with ``recompute_kernels`` the made tensor is not kept for
    the backward pass but rebuilt there (:class:`KernelRecompute`; not under
    functorch transforms, tracing or ``torch.compile``: :func:`hooks_unsupported`).
    """
    kernel = make(alpha)
    if (recompute_kernels and torch.is_grad_enabled() and kernel.requires_grad
            and not hooks_unsupported()):
        with KernelRecompute(make, alpha, kernel):
            return run(kernel)
    return run(kernel)
