"""What ships inside the package: the demo model (the default everywhere), the tiny parity
checkpoint written by the public mHC code, and the corpus; and how a model name resolves.

Light on purpose (no torch): the command line resolves names before it imports the model."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import List, Optional, Union

DEMO_MODEL = "demo-mhc"  # trained on Shakespeare by examples/train_demo_model.py
PARITY_MODEL = "tiny-mhc-n4"  # written by the public mHC code, with its logits


def asset(name: str) -> Path:
    return Path(str(resources.files("mhc_interp") / "assets" / name))


def default_model_path() -> Path:
    """The embedded default: the demo model if shipped, else the tiny parity checkpoint."""
    return asset(DEMO_MODEL) if (asset(DEMO_MODEL) / "config.json").is_file() else asset(PARITY_MODEL)


def default_corpus() -> List[Path]:
    return sorted(asset("corpus").glob("*.txt"))


def resolve_model_path(name: Optional[str]) -> Union[Path, str]:
    """A shipped model's name, a local path (takes precedence: `./demo-mhc` or `demo-mhc` that
    exists here is that folder), or a hub id (returned as is); None is the default model."""
    if name is None:
        return default_model_path()
    path = Path(name).expanduser()
    if path.exists():
        return path
    if name in (DEMO_MODEL, PARITY_MODEL):
        return asset(name)
    if name.startswith((".", "/", "~")) or name.endswith((".pt", ".pth")):
        raise FileNotFoundError(f"model path {name!r} does not exist")
    return name


def torch_dtype(name: str):
    """A torch dtype by its name ("float32", "bfloat16", ...), or "auto" (the checkpoint's own)."""
    import torch

    return name if name == "auto" else getattr(torch, name)


def load(name: Optional[str], device: str = "cpu", dtype: str = "float32"):
    """`HookedMHC.from_pretrained` on a resolved name, dtype given by its torch name (or "auto")."""
    from .model import HookedMHC

    return HookedMHC.from_pretrained(resolve_model_path(name), device=device, dtype=torch_dtype(dtype))
