"""Typed configuration sections: dataclasses whose fields are type-checked (and coerced) from their annotations on
construction, with errors that name the key; shared by the run config and the evaluation config."""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from typing import Any, Union

__all__ = ["ConfigError", "Section", "coerce", "type_name"]


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message names the key and what is valid."""


# --------------------------------------------------------------------------------------------------------------
# Type checking of dataclass fields (from their annotations)


def type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"list of {type_name(arg)}"
    if origin is dict or tp is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def coerce(value, tp, key: str):
    """Return ``value`` as type ``tp`` or raise ConfigError. Ints are accepted for floats (and numeric strings,
    since YAML 1.1 reads ``1e-3`` as a string); bools are never numbers."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        # exact type matches first (so int stays int in int | float), then coercions
        for arg in args:
            if arg is not type(None) and typing.get_origin(arg) is None and type(value) is arg:
                return value
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key} must be {type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be {type_name(tp)}, got {value!r}")
        return [coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be int, got {value!r}")
    if tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be str, got {value!r}")
    raise TypeError(f"unsupported config field type {tp!r} for {key}")  # a schema bug, not a user error


class Section:
    """Mixin for config sections: fields are type-checked (and coerced) on construction, then ``validate()``."""

    _section: typing.ClassVar[str] = ""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(getattr(self, f.name), hints[f.name], f"{self._section}.{f.name}"))
        self.validate()

    def validate(self) -> None:
        pass

    def _choice(self, name: str, choices) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ConfigError(f"{self._section}.{name} {value!r} unknown; valid: {', '.join(map(str, choices))}")

    def _positive(self, *names: str, allow_zero: bool = False) -> None:
        for name in names:
            value = getattr(self, name)
            if value is None:
                continue
            if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
                bound = ">= 0" if allow_zero else "> 0"
                raise ConfigError(f"{self._section}.{name} must be {bound}, got {value!r}")

