"""mhc-interp: mechanistic interpretability for multi-stream residual transformers
(Hyper-Connections, mHC, mHC-lite).

`import mhc_interp` is light: `HookedMHC` (torch, TransformerLens's hook machinery) is imported
on first use, and TransformerLens's own `__init__` (which pulls transformers and datasets) only
when something other than its hook machinery is used (`hooks.deferred_init`)."""

from importlib import import_module

from .hooks.deferred_init import defer_package_inits

defer_package_inits()

_SOURCES = {"HookedMHC": ".model", "MHCConfig": ".config"}
__all__ = ["HookedMHC", "MHCConfig"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_SOURCES[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_SOURCES))
