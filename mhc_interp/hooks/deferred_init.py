"""Import TransformerLens's hook machinery without the rest of TransformerLens.

`transformer_lens/__init__.py` imports the whole library - its tokenizer and dataset utilities
pull `transformers`, `datasets`, `pandas` and `pyarrow` (seconds, more than torch itself) - but
this package needs only `transformer_lens.hook_points` and `transformer_lens.HookedRootModule`.
`defer_package_inits()` (called by `mhc_interp/__init__.py`, before anything imports
TransformerLens) makes the first import of each package in `DEFERRED` create the package module
without running its `__init__`: its submodules import as usual, and the `__init__` runs, into the
same module object, the first time anyone reads an attribute the module does not have yet (e.g.
`transformer_lens.ActivationCache`, `from transformer_lens import HookedRootModule`). Every class
is therefore the one a plain `import transformer_lens` gives. A name in `LIGHT_NAMES` is served
from its submodule without running the package's `__init__` (the names `HookedRootModule.py`
takes from `transformer_lens.utilities`), by the object that `__init__` would bind to it.

If TransformerLens is already imported, nothing changes; if its layout differs, the deferred
`__init__` simply runs on the first attribute read (what a plain import would have done up front).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from typing import Dict, Optional

DEFERRED = (
    "transformer_lens",
    "transformer_lens.utilities",
    "transformer_lens.conversion_utils",
    "transformer_lens.conversion_utils.conversion_steps",
)
# package -> {name: submodule defining it}: served without running the package's __init__
LIGHT_NAMES: Dict[str, Dict[str, str]] = {
    "transformer_lens.utilities": {
        "Slice": "slice",
        "SliceInput": "slice",
        "remove_batch_dim": "tensors",
        "warn_if_mps": "devices",
    },
}


class _DeferredPackage(types.ModuleType):
    """A package module whose `__init__` has not run yet; it runs on the first missing attribute."""

    def __setattr__(self, name: str, value) -> None:
        # the import system binds each loaded submodule on its parent; keep those aside, so that
        # a later read of the name still runs `__init__` (which may bind something else there)
        if isinstance(value, types.ModuleType) and value.__name__ == f"{self.__name__}.{name}":
            self.__dict__.setdefault("_deferred_submodules", {})[name] = value
        else:
            super().__setattr__(name, value)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        light = LIGHT_NAMES.get(self.__name__, {}).get(name)
        if light is not None:
            value = getattr(importlib.import_module(f"{self.__name__}.{light}"), name)
            super().__setattr__(name, value)
            return value
        run_deferred_init(self)
        return getattr(self, name)


def run_deferred_init(module: types.ModuleType) -> None:
    """Run a deferred package's `__init__` into `module` (once), then bind the submodules loaded
    before it that `__init__` did not bind to something else."""
    if not isinstance(module, _DeferredPackage):
        return
    module.__class__ = types.ModuleType
    submodules = module.__dict__.pop("_deferred_submodules", {})
    module.__spec__.loader.loader.exec_module(module)  # the real loader, behind _DeferringLoader
    for name, sub in submodules.items():
        module.__dict__.setdefault(name, sub)


class _DeferringLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def exec_module(self, module: types.ModuleType) -> None:
        module.__class__ = _DeferredPackage

    def __getattr__(self, name: str):  # resource readers etc.: the real loader's
        return getattr(self.loader, name)


class _DeferringFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path=None, target=None) -> Optional[importlib.machinery.ModuleSpec]:
        if name not in DEFERRED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or spec.submodule_search_locations is None:
            return None
        spec.loader = _DeferringLoader(spec.loader)
        return spec


_FINDER = _DeferringFinder()


def defer_package_inits() -> None:
    """Defer the `__init__` of the packages in `DEFERRED` not imported yet (idempotent). Only for
    TransformerLens 4.x: 3.x (the SAELens environment) has utilities <-> FactoredMatrix import
    cycles that only its own `__init__` order resolves, so there it is imported whole."""
    if "transformer_lens" in sys.modules or _FINDER in sys.meta_path:
        return
    try:
        from importlib.metadata import version

        major = int(version("transformer-lens").split(".")[0])
    except Exception:  # noqa: BLE001 - not installed or an odd version string: import it plainly
        return
    if major >= 4:
        sys.meta_path.insert(0, _FINDER)
