"""`import mhc_interp` is light, and `HookedMHC` needs TransformerLens's hook machinery only:
its `__init__` (transformers, datasets) runs when something else of it is used, and then every
class is the one a plain `import transformer_lens` gives."""

import ast
import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import mhc_interp

TL_MAJOR = int(importlib.metadata.version("transformer-lens").split(".")[0])

LIGHT = r"""
import sys
import mhc_interp
assert "torch" not in sys.modules, "import mhc_interp imported torch"
from mhc_interp import HookedMHC
from mhc_interp.hooks import stream_hook
heavy = sorted(m for m in ("transformers", "datasets", "pandas", "pyarrow") if m in sys.modules)
assert not heavy, f"HookedMHC imported {heavy}"
"""


@pytest.mark.skipif(
    TL_MAJOR < 4,
    reason="the deferred TransformerLens __init__ is for transformer-lens 4.x; "
    "3.x (the SAELens environment) is imported whole",
)
def test_import_is_light():
    done = subprocess.run([sys.executable, "-c", LIGHT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_transformer_lens_stays_whole():
    """In this process TransformerLens was first imported through mhc_interp (conftest)."""
    import transformer_lens
    from transformer_lens import ActivationCache, HookedRootModule  # noqa: F401  (runs the deferred __init__)
    from transformer_lens.hook_points import HookPoint

    from mhc_interp import HookedMHC, MHCConfig

    assert isinstance(HookedRootModule, type) and issubclass(HookedMHC, HookedRootModule)
    assert transformer_lens.HookedRootModule is HookedRootModule
    assert transformer_lens.utilities.slice.Slice is transformer_lens.utilities.Slice
    assert transformer_lens.hook_points.HookPoint is HookPoint
    model = HookedMHC(MHCConfig(n_layers=1, n_heads=1, d_model=8, n_ctx=4, d_vocab=10, n_streams=2))
    assert isinstance(model.blocks[0].attn.hook_streams_in, HookPoint)


PACKAGE = Path(mhc_interp.__file__).parent


def imported_modules(source: str, package: str) -> set:
    """The absolute names of every module an import anywhere in `source` (a module of `package`;
    inside functions too) names: `from .x import y` gives <package>.x and <package>.x.y."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


def test_imported_modules_sees_function_local_imports():
    source = "import os\n\ndef f():\n    from ..model import mixers\n"
    assert imported_modules(source, "mhc_interp.hooks") >= {
        "os",
        "mhc_interp.model",
        "mhc_interp.model.mixers",
    }


@pytest.mark.parametrize("path", sorted((PACKAGE / "hooks").glob("*.py")), ids=lambda p: p.name)
def test_hooks_do_not_import_the_models(path):
    """model/ builds on hooks/ (HookedMHC is a StreamHookedRoot), so hooks/ imports nothing of
    mhc_interp but itself and the contract - not even inside a function, the way the model <-> hooks
    cycle used to be dodged."""
    ours = {m for m in imported_modules(path.read_text(), "mhc_interp.hooks") if m.startswith("mhc_interp.")}
    assert all(m.startswith(("mhc_interp.hooks", "mhc_interp.contract")) for m in ours), sorted(ours)


def test_contract_imports_neither_torch_nor_the_models():
    code = (
        "import sys, mhc_interp.contract\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('mhc_interp.model', "
        "'mhc_interp.hooks.root')))\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
