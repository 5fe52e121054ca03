"""Typed options of a layer's components: each block, router and FFN declares its settings as a dataclass.

A component's options class (e.g. :class:`condformer.routing.mod.MoD`) lists its settings with their types,
defaults, allowed choices and bounds in one place; :meth:`ComponentOptions.validate` turns any bad value into
a one-line :class:`~condformer.errors.ConfigError` naming the layer, the setting and the fix, so components no
longer re-check a shared dict by hand. Options are written to files and checkpoints as the flat
``LayerSpec.options`` mapping the release already used (only the settings that differ from their defaults),
so ``LayerSpec(router=MoD(capacity=0.25))`` and ``LayerSpec(router="mod", options={"capacity": 0.25})``
are the same layer and old configs keep loading.

This module is a leaf (it imports only :mod:`condformer.errors`), so configs can hold options objects without
importing any technique.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from condformer.errors import ConfigError

O = TypeVar("O", bound="ComponentOptions")  # noqa: E741


def option(default: Any, *, choices: tuple[Any, ...] | None = None, ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None, null: str = "") -> Any:
    """A setting with its constraints: ``choices`` (allowed values) and numeric bounds (``ge``, ``gt``, ...).

    ``null`` says what ``None`` means for a nullable setting; it is quoted in the error so the user learns the
    alternative (e.g. ``null="dropless"``).
    """
    meta = {"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "null": null}
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class ComponentOptions:
    """Base of every component's options. Subclasses are dataclasses and set ``axis`` and ``component``.

    ``axis`` is ``"block"``, ``"router"`` or ``"ffn"`` (the :class:`~condformer.config.LayerSpec` field the
    options go in) and ``component`` the registered name (``"mod"``), so a ``LayerSpec`` given an options
    object knows which component it names without importing the registry.
    """

    axis: ClassVar[str] = ""
    component: ClassVar[str] = ""

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The settings this component understands (its keys in ``LayerSpec.options``)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_options(cls: type[O], options: Mapping[str, Any], where: str = "layers[]") -> O:
        """This component's settings out of a layer's (shared) options mapping, validated.

        Keys of other components are ignored here; :meth:`ModelConfig.validate
        <condformer.config.ModelConfig.validate>` reports keys no component of the layer understands.
        """
        return cls(**{k: v for k, v in options.items() if k in cls.names()}).validate(where)

    @classmethod
    def of(cls: type[O], spec: Any, where: str = "layers[]") -> O:
        """The options of ``spec`` (a :class:`~condformer.config.LayerSpec`) for this component."""
        return cls.from_options(spec.options, where)

    # -- checks and serialisation ---------------------------------------------------------------------------
    def validate(self: O, where: str = "layers[]") -> O:
        """Every setting has its declared type, choice and bounds, then :meth:`check`; returns ``self``."""
        for f in dataclasses.fields(self):
            _check_value(type(self), f.name, getattr(self, f.name), where)
        self.check(where)
        return self

    def check(self, where: str) -> None:
        """Checks across settings (e.g. ``top_k`` <= the number of experts); override in a component."""

    def to_options(self) -> dict[str, Any]:
        """The settings that differ from their defaults, as plain JSON values (the ``LayerSpec.options`` form)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v != f.default:
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


# -- value checks -----------------------------------------------------------------------------------------
def _check_value(cls: type, name: str, v: Any, where: str) -> None:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    meta = f.metadata
    allowed = _allowed_types(cls, name)
    if v is None:
        if type(None) in allowed:
            return
        raise ConfigError(f"{where}: {name} must not be null")
    choices = meta.get("choices")
    if choices is not None:
        if v not in choices or isinstance(v, bool) != any(isinstance(c, bool) for c in choices):
            raise ConfigError(f"{where}: unknown {name} {v!r}; choose one of: {', '.join(map(str, choices))}")
        return
    if not any(_is(v, t) for t in allowed):
        raise ConfigError(f"{where}: {name} must be {_describe(allowed, meta)}, got {v!r}")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        bounds = [(op, meta.get(op)) for op in ("ge", "gt", "le", "lt") if meta.get(op) is not None]
        ok = math.isfinite(v) and all(_holds(v, op, b) for op, b in bounds)
        if not ok:
            raise ConfigError(f"{where}: {name} must be {_describe(allowed, meta)}, got {v!r}")


@functools.cache
def _allowed_types(cls: type, name: str) -> tuple[type, ...]:  # resolving the hints is the slow part
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _is(v: Any, t: type) -> bool:
    if t is bool:
        return isinstance(v, bool)
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if t is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, t)


_OPS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _holds(v: float, op: str, b: float) -> bool:
    return {"ge": v >= b, "gt": v > b, "le": v <= b, "lt": v < b}[op]


def _describe(allowed: tuple[type, ...], meta: Mapping[str, Any]) -> str:
    kinds = [t for t in allowed if t is not type(None)]
    word = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    text = " or ".join(word.get(t, t.__name__) for t in kinds)
    bounds = [f"{_OPS[op]} {meta[op]:g}" for op in ("ge", "gt", "le", "lt") if meta.get(op) is not None]
    if bounds:
        text += " " + " and ".join(bounds)
    if type(None) in allowed:
        text += f", or null{' for ' + meta['null'] if meta.get('null') else ''}"
    return text
