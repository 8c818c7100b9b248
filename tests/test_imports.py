"""`import mhc_interp` is light, and `HookedMHC` needs TransformerLens's hook machinery only:
its `__init__` (transformers, datasets) runs when something else of it is used, and then every
class is the one a plain `import transformer_lens` gives."""
import importlib.metadata
import subprocess
import sys

import pytest

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


@pytest.mark.skipif(TL_MAJOR < 4, reason="the deferred TransformerLens __init__ is for transformer-lens 4.x; "
                                          "3.x (the SAELens environment) is imported whole")
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
