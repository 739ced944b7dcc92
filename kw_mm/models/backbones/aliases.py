"""mmpretrain's names for kw_mm's backbone modules, as read-only aliases.

kw_mm keeps the module names of the authors' released models (``bn1``,
``features.N``) so that their checkpoints load; code written against
mmpretrain's backbones reaches the same modules through these aliases
(``norm1``, ``conv1``, ``layer1`` ...).
"""
from __future__ import annotations

from typing import Callable

from torch import nn


class ReadOnlyAlias(property):
    """A read-only second name for a submodule, as mmpretrain spells it.

    Not a registered submodule: ``state_dict`` keys and parameter counts are
    unchanged. Assigning or deleting through the alias raises, naming the
    attribute to use instead (``nn.Module.__setattr__`` would otherwise
    silently register a new submodule under the alias name).
    """

    def __init__(self, target: str, getter: Callable[[nn.Module], nn.Module]) -> None:
        super().__init__(getter, doc=f'Read-only alias of ``{target}`` (mmpretrain\'s name).')
        self.target = target

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def refuse(self, obj: nn.Module) -> None:
        raise AttributeError(
            f'{type(obj).__name__}.{self.name} is a read-only alias of {self.target} '
            f'(mmpretrain\'s name for it); assign to {self.target} instead')

    def __set__(self, obj, value) -> None:
        self.refuse(obj)

    def __delete__(self, obj) -> None:
        self.refuse(obj)


def alias(target: str) -> ReadOnlyAlias:
    """A :class:`ReadOnlyAlias` of the attribute path ``target`` (``'features.0'``)."""
    def getter(self: nn.Module) -> nn.Module:
        obj = self
        for part in target.split('.'):
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
        return obj
    return ReadOnlyAlias(target, getter)


class AliasGuard:
    """Mixin for modules with :class:`ReadOnlyAlias` attributes: refuse assignments
    and deletions through them (``nn.Module`` bypasses descriptors for modules)."""

    def __setattr__(self, name: str, value) -> None:
        descriptor = getattr(type(self), name, None)
        if isinstance(descriptor, ReadOnlyAlias):
            descriptor.refuse(self)
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        descriptor = getattr(type(self), name, None)
        if isinstance(descriptor, ReadOnlyAlias):
            descriptor.refuse(self)
        super().__delattr__(name)
