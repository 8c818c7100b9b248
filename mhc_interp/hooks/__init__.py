"""The hook API around `HookedMHC`: names and shapes, per-stream addressing, frozen mixing.

The names below are imported on first use (PEP 562), so that importing a light submodule (e.g.
`mhc_interp.hooks.deferred_init`) does not import torch."""

from importlib import import_module

_SOURCES = {
    "MHCCache": "cache",
    "frozen_mixing": "freeze",
    "is_mixing_hook": "freeze",
    "HOOK_SPECS": "names",
    "STREAM_VALUED": "names",
    "HookNameError": "names",
    "hook_table": "names",
    "hook_table_markdown": "names",
    "check_streams": "streams",
    "stream_hook": "streams",
}
__all__ = list(_SOURCES)


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_SOURCES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_SOURCES))
