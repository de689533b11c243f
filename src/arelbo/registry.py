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
    return cls(**kwargs)
