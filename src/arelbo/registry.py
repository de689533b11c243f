"""Name -> class registries (decoder-variance policies, ex-post samplers): one way to register and to build
by name, with errors that list the known names and the valid arguments."""

from __future__ import annotations

import inspect
from typing import Any


def register(registry: dict[str, type], cls: type, kind: str) -> type:
    """Add ``cls`` under its ``name`` attribute; empty or duplicate names are errors."""
    if not cls.name or cls.name in registry:
        raise ValueError(f"{kind} name {cls.name!r} is empty or already registered")
    registry[cls.name] = cls
    return cls


def build(registry: dict[str, type], name: str, kwargs: dict[str, Any], *, kind: str, long_kind: str, plural: str):
    """Instantiate ``registry[name](**kwargs)``; unknown names and arguments are errors that list what is valid."""
    if name not in registry:
        raise ValueError(f"unknown {long_kind} {name!r}; known {plural}: {', '.join(sorted(registry))}")
    cls = registry[name]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"{kind} {name!r} takes no argument(s) {unknown}; valid: {valid}")
    try:
        built = cls(**kwargs)  # the class's own checks (and messages) first
    except TypeError:
        _check_types(cls, name, kwargs, kind)  # a wrongly typed option: say which
        raise
    _check_types(cls, name, kwargs, kind)  # also what the class accepted by converting it (2.7 -> 2)
    return built


def _check_types(cls: type, name: str, kwargs: dict[str, Any], kind: str) -> None:
    params = inspect.signature(cls.__init__).parameters
    for key, value in kwargs.items():
        expected = _expected_type(params[key].default)
        if expected is not None and value is not None and not _is_a(value, expected):
            raise ValueError(f"{kind} {name!r}: option {key} must be {_describe(expected)} (default "
                             f"{params[key].default!r}), got {value!r}")


# Option types are read off the constructor's defaults (an option whose default is None is not checked), so a
# wrongly typed value from a config or --sampler-option is a one-line error here, not a TypeError deep inside.
def _expected_type(default):
    if default is inspect.Parameter.empty or default is None:
        return None
    if isinstance(default, (list, tuple)):
        inner = _expected_type(default[0]) if default else None
        return ("sequence", inner)
    for t in (bool, int, float, str):
        if isinstance(default, t):
            return t
    return None


def _is_a(value, expected) -> bool:
    if isinstance(expected, tuple):  # ("sequence", element type)
        return isinstance(value, (list, tuple)) and (expected[1] is None or all(_is_a(v, expected[1]) for v in value))
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, expected)


def _describe(expected) -> str:
    if isinstance(expected, tuple):
        plural = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}
        return "a list" + ("" if not isinstance(expected[1], type) else f" of {plural[expected[1]]}")
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[expected]
