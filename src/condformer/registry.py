"""Name -> class registries, one per composable axis of a layer (block, router, FFN).

A technique registers its classes here under the name used in :class:`~condformer.config.LayerSpec`,
so configs stay plain strings and the backbone never imports a technique directly. This module is a leaf:
it imports nothing of condformer but the errors, and the built-in components register themselves when
:mod:`condformer.components` is imported (which ``import condformer`` does first), so the registry, the
config and the components never import each other in a circle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from condformer.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, axis: str) -> None:
        self.axis = axis
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.axis} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ConfigError(f"unknown {self.axis} '{name}'; choose one of: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)


BLOCKS: Registry[Any] = Registry("block")
ROUTERS: Registry[Any] = Registry("router")
FFNS: Registry[Any] = Registry("ffn")
