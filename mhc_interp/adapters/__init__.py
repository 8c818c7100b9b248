"""Adapters: other implementations of multi-stream models behind `HookedMHC`'s hook API.

    from mhc_interp.adapters import HookedHFMHC
    model = HookedHFMHC(hf_deepseek_v4_model)      # transformers' DeepSeek-V4, wrapped in place

See `hf_mhc.py` for the hook names and the semantic differences from HookedMHC, `deepseek_v4.py`
for a tiny offline DeepSeek-V4 and loading with `device_map`, and `distributed.py` for splitting
causal sweeps over processes (torch.distributed / accelerate launch).
"""
from .hf_mhc import HEAD_HOOKS, HFMHCConfig, HookedHFMHC, UnsupportedModelError, find_hyper_connections, hc_coefficients
from .deepseek_v4 import tiny_deepseek_v4, tiny_deepseek_v4_config
from .distributed import distributed_activation_patching, distributed_ablate_and_rescue, merge_sublayer_results, split_sublayers

__all__ = ["HookedHFMHC", "HFMHCConfig", "UnsupportedModelError", "find_hyper_connections", "hc_coefficients",
           "HEAD_HOOKS", "tiny_deepseek_v4", "tiny_deepseek_v4_config", "distributed_ablate_and_rescue",
           "distributed_activation_patching", "merge_sublayer_results", "split_sublayers"]
