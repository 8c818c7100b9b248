"""The hook API around `HookedMHC`: names and shapes, per-stream addressing, frozen mixing.

The names below are imported on first use (PEP 562), so that importing a light submodule (e.g.
`mhc_interp.hooks.deferred_init`) does not import torch."""

import sys
from importlib import import_module


def lazy_exports(package: str, sources: dict):
    """(`__getattr__`, `__dir__`) for `package` whose names {name: relative module} in `sources` are
    imported on first use (PEP 562) and then kept in the package."""

    def __getattr__(name: str):
        if name not in sources:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(sources[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(sources))

    return __getattr__, __dir__


_SOURCES = {
    "MHCCache": ".cache",
    "frozen_mixing": ".freeze",
    "is_mixing_hook": ".freeze",
    "HOOK_SPECS": ".names",
    "STREAM_VALUED": ".names",
    "HookNameError": ".names",
    "hook_table": ".names",
    "hook_table_markdown": ".names",
    "check_streams": ".streams",
    "stream_hook": ".streams",
}
__all__ = list(_SOURCES)
__getattr__, __dir__ = lazy_exports(__name__, _SOURCES)
