"""The one rule of every registry here (mixers, probes, result classes): a name belongs to one
class. Registering another class under a taken name is an error naming both; registering the same
class again (a re-import, e.g. a reloaded module) replaces it."""

from __future__ import annotations

from typing import Dict, TypeVar

T = TypeVar("T", bound=type)


def register(registry: Dict[str, type], key: str, cls: T, what: str) -> T:
    """registry[key] = cls, refusing a key taken by another class."""
    taken = registry.get(key)
    if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(
            f"{what} {key!r} is already registered by {taken.__module__}.{taken.__qualname__}; "
            f"give {cls.__module__}.{cls.__qualname__} another name"
        )
    registry[key] = cls
    return cls
