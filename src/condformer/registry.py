"""Name -> class registries, one per composable axis of a layer (block, router, FFN).

A technique registers its classes here under the name used in :class:`~condformer.config.LayerSpec`,
so configs stay plain strings and the backbone never imports a technique directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

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
        _ensure_builtin_registered()
        return self._items[name]

    def names(self) -> list[str]:
        _ensure_builtin_registered()
        return sorted(self._items)


BLOCKS: Registry[Any] = Registry("block")
ROUTERS: Registry[Any] = Registry("router")
FFNS: Registry[Any] = Registry("ffn")


def _ensure_builtin_registered() -> None:
    # Importing the modules runs their @register decorators; done lazily to avoid import cycles.
    import condformer.layers.blocks  # noqa: F401
    import condformer.layers.mlp  # noqa: F401
    import condformer.layers.simplified  # noqa: F401
    import condformer.routing.dense  # noqa: F401
    import condformer.routing.mod  # noqa: F401
    import condformer.routing.moe  # noqa: F401
