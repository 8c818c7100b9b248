"""Adapters: HuggingFace hyper-connection models behind `HookedMHC`'s hook API.

    from mhc_interp.adapters import HookedHFMHC
    model = HookedHFMHC(hf_deepseek_v4_model)      # transformers' DeepSeek-V4, wrapped in place

`hf_mhc.py` is the generic adapter, `spec.py` what it needs to know about a model family, and
`deepseek_v4.py` DeepSeek-V4's spec and a tiny offline model; docs/adapters.md has the details.
"""

from .deepseek_v4 import DEEPSEEK_V4, hc_coefficients, tiny_deepseek_v4, tiny_deepseek_v4_config
from .hf_mhc import HEAD_HOOKS, HFMHCConfig, HookedHFMHC
from .spec import HyperConnectionSpec, UnsupportedModelError, find_hyper_connections

__all__ = [
    "HookedHFMHC",
    "HFMHCConfig",
    "HyperConnectionSpec",
    "DEEPSEEK_V4",
    "UnsupportedModelError",
    "find_hyper_connections",
    "hc_coefficients",
    "HEAD_HOOKS",
    "tiny_deepseek_v4",
    "tiny_deepseek_v4_config",
]
