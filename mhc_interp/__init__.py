"""mhc-interp: mechanistic interpretability for multi-stream residual transformers
(Hyper-Connections, mHC, mHC-lite).

`import mhc_interp` is light: `HookedMHC` (torch, TransformerLens's hook machinery) is imported
on first use, and TransformerLens's own `__init__` (which pulls transformers and datasets) only
when something other than its hook machinery is used (`hooks.deferred_init`)."""

from .hooks import lazy_exports
from .hooks.deferred_init import defer_package_inits

defer_package_inits()

_SOURCES = {"HookedMHC": ".model", "MHCConfig": ".config"}
__all__ = list(_SOURCES)
__version__ = "0.1.0"
__getattr__, __dir__ = lazy_exports(__name__, _SOURCES)
