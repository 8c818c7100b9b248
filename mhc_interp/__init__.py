"""mhc-interp: mechanistic interpretability for multi-stream residual transformers
(Hyper-Connections, mHC, mHC-lite)."""
from .config import MHCConfig
from .model import HookedMHC

__all__ = ["HookedMHC", "MHCConfig"]
__version__ = "0.1.0"
