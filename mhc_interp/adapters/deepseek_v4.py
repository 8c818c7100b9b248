"""DeepSeek-V4 helpers: a tiny randomly initialised model built offline (tests, examples, smoke
runs on CPU in milliseconds) and loading a real checkpoint into the adapter.

    from mhc_interp.adapters import HookedHFMHC, tiny_deepseek_v4
    model = HookedHFMHC(tiny_deepseek_v4(seed=0))          # hidden 64, 2 layers, 4 experts, 4 streams

    model = HookedHFMHC.from_pretrained("deepseek-ai/DeepSeek-V4-Flash-Base", device_map="auto",
                                        dtype=torch.bfloat16)   # sharded over the visible GPUs

`tiny_deepseek_v4` covers every code path of transformers' DeepSeek-V4: a compressed-sparse-
attention layer (CSA: compressor + lightning indexer) and a heavily-compressed one (HCA), with
compression rates small enough to fire on 16-token inputs, a hash-routed MoE layer and a top-k
routed one, 4 hyper-connection streams, no multi-token-prediction layers.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["tiny_deepseek_v4_config", "tiny_deepseek_v4"]


def tiny_deepseek_v4_config(**overrides: Any):
    """A DeepseekV4Config small enough for CPU tests (hidden 64, 2 layers, 4 experts, hc_mult 4)."""
    from transformers import DeepseekV4Config

    kwargs = dict(
        vocab_size=96, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, head_dim=16, q_lora_rank=32, o_groups=2, o_lora_rank=16,
        num_experts_per_tok=2, n_routed_experts=4, n_shared_experts=1,
        index_n_heads=2, index_head_dim=16, index_topk=4, sliding_window=8,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        layer_types=["compressed_sparse_attention", "heavily_compressed_attention"],
        mlp_layer_types=["hash_moe", "moe"], num_nextn_predict_layers=0,
        max_position_embeddings=64, partial_rotary_factor=0.5, hc_mult=4, initializer_range=0.1,
    )
    kwargs.update(overrides)
    n = kwargs["num_hidden_layers"]
    for key, default in (("layer_types", "heavily_compressed_attention"), ("mlp_layer_types", "moe")):
        kwargs[key] = (list(kwargs[key]) + [default] * n)[:n]
    return DeepseekV4Config(**kwargs)


def tiny_deepseek_v4(seed: int = 0, *, mixing_std: float = 0.05, **overrides: Any):
    """A randomly initialised tiny `DeepseekV4ForCausalLM` (eval mode), deterministic in `seed`.

    transformers' init leaves the hyper-connections near-uniform (base 0, fn ~ N(0, init_range))
    and the hash-routing table all zeros; here every hyper-connection gets a random bias and
    projection (`mixing_std`) and `tid2eid` a random table, so streams, routing and mixing all
    differ from token to token and every term of the forward matters."""
    from transformers import DeepseekV4ForCausalLM

    config = tiny_deepseek_v4_config(**overrides)
    gen = torch.Generator().manual_seed(seed)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = DeepseekV4ForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    with torch.no_grad():
        for module in model.modules():
            kind = type(module).__name__
            if kind == "DeepseekV4HyperConnection":
                module.fn.copy_(torch.randn(module.fn.shape, generator=gen) * mixing_std)
                module.base.copy_(torch.randn(module.base.shape, generator=gen))
            elif kind == "DeepseekV4HyperHead":
                module.hc_fn.copy_(torch.randn(module.hc_fn.shape, generator=gen) * mixing_std)
                module.hc_base.copy_(torch.randn(module.hc_base.shape, generator=gen))
            elif kind == "DeepseekV4HashRouter":
                module.tid2eid.copy_(torch.randint(0, module.num_experts, module.tid2eid.shape, generator=gen))
            elif kind == "DeepseekV4Attention":
                module.sinks.copy_(torch.randn(module.sinks.shape, generator=gen) * 0.5)
    return model.eval()
