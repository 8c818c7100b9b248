"""DeepSeek-V4 (transformers' `DeepseekV4ForCausalLM`) for the generic HF adapter: its spec
(`DEEPSEEK_V4`: layer layout, mHC coefficients, hc_head weights, attention context, hash routing)
and a tiny randomly initialised model built offline (tests, examples, smoke runs on CPU).

    from mhc_interp.adapters import HookedHFMHC, tiny_deepseek_v4
    model = HookedHFMHC(tiny_deepseek_v4(seed=0))          # hidden 64, 2 layers, 4 experts, 4 streams

    model = HookedHFMHC.from_pretrained("deepseek-ai/DeepSeek-V4-Flash-Base", device_map="auto",
                                        dtype=torch.bfloat16)   # sharded over the visible GPUs

`tiny_deepseek_v4` covers every code path of transformers' DeepSeek-V4: a compressed-sparse-
attention layer (CSA: compressor + lightning indexer) and a heavily-compressed one (HCA), with
compression rates small enough to fire on 16-token inputs, a hash-routed MoE layer and a top-k
routed one, 4 hyper-connection streams, no multi-token-prediction layers. The conventions
(H_res = comb^T, hc_eps in H_pre, the hc_head readout) are in docs/adapters.md.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .spec import HyperConnectionSpec, UnsupportedModelError

__all__ = ["DEEPSEEK_V4", "hc_coefficients", "head_weights_of", "tiny_deepseek_v4_config", "tiny_deepseek_v4"]


def hc_coefficients(hc: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(pre [b,p,n], post [b,p,n], comb [b,p,n(source),n(target)]) of a DeepseekV4HyperConnection
    for streams x [b,p,n,d], float32, op for op as its forward (which consumes `pre` internally):

        pre = sigmoid(.) + eps,  post = 2 sigmoid(.),  comb = Sinkhorn(softmax(.) + eps)"""
    b, p = x.shape[:2]
    n, eps = int(hc.hc_mult), hc.hc_eps
    flat = F.linear(hc.input_norm(x.reshape(b, p, -1).float()), hc.fn.float())  # [b, p, (2+n)n]
    pre_w, post_w, comb_w = flat.split([n, n, n * n], dim=-1)
    pre_b, post_b, comb_b = hc.base.split([n, n, n * n])
    pre_scale, post_scale, comb_scale = hc.scale.unbind(0)
    pre = torch.sigmoid(pre_w * pre_scale + pre_b) + eps
    post = 2 * torch.sigmoid(post_w * post_scale + post_b)
    comb = torch.softmax(comb_w.view(b, p, n, n) * comb_scale + comb_b.view(n, n), dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(int(hc.hc_sinkhorn_iters) - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return pre, post, comb


def _coefficients(hc: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(H_pre, H_post, H_res [target, source]): the decoder layer mixes with comb^T @ x."""
    pre, post, comb = hc_coefficients(hc, x)
    return pre, post, comb.transpose(-1, -2)


def head_weights_of(head: nn.Module, x: Tensor) -> Tensor:
    """hc_head collapse weights [b,p,n] (float32), op for op as `DeepseekV4HyperHead.forward`."""
    mixes = F.linear(head.input_norm(x.flatten(2).float()), head.hc_fn.float())
    return torch.sigmoid(mixes * head.hc_scale.float() + head.hc_base.float()) + head.eps


def _no_cache(fn: Callable) -> Dict[str, None]:
    """`cache=None` or `past_key_values=None`, whichever `fn` names (transformers 5.24 renamed the
    second to the first and deprecates it); {} if it names neither."""
    params = inspect.signature(fn).parameters
    return next(({name: None} for name in ("cache", "past_key_values") if name in params), {})


def _context(hf_model: nn.Module, like: Tensor) -> Dict[str, Any]:
    """Positions 0..pos-1, rotary tables and the sliding-window causal mask, as
    `DeepseekV4Model.forward` builds them (from the shape / dtype of `like` [b, p, d])."""
    from transformers.masking_utils import create_sliding_window_causal_mask

    base = getattr(hf_model, "model", hf_model)
    position_ids = torch.arange(like.shape[1], device=like.device).unsqueeze(0)  # [1, pos]
    mask = create_sliding_window_causal_mask(
        config=hf_model.config,
        inputs_embeds=like,
        attention_mask=None,
        position_ids=position_ids,
        **_no_cache(create_sliding_window_causal_mask),
    )
    layer_types = getattr(base.rotary_emb, "layer_types", ["main", "compress"])
    rotary = {t: base.rotary_emb(like, position_ids=position_ids, layer_type=t) for t in layer_types}
    return dict(
        position_embeddings=rotary,
        position_ids=position_ids,
        attention_mask=mask,
        **_no_cache(base.layers[0].self_attn.forward),
    )


def _branch(
    kind: str, module: nn.Module, h: Tensor, context: Dict[str, Any], ids: Optional[Tensor]
) -> Tensor:
    if kind == "attn":
        return module(h, **context)[0]
    return module(h, input_ids=ids)


def _layer_forward(layer: nn.Module, x: Tensor, context: Dict[str, Any], ids: Optional[Tensor]) -> Tensor:
    out = layer(x, input_ids=ids, **context)
    return out[0] if isinstance(out, tuple) else out


def _check_shapes(base: nn.Module, n: int, d: int) -> None:
    want = ((2 + n) * n, n * d)
    for i, layer in enumerate(base.layers):
        for name in ("attn_hc", "ffn_hc"):
            hc = getattr(layer, name)
            if tuple(hc.fn.shape) != want or tuple(hc.base.shape) != (want[0],) or hc.scale.numel() != 3:
                raise UnsupportedModelError(
                    f"layer {i} {name}: fn {tuple(hc.fn.shape)} / base {tuple(hc.base.shape)} / scale "
                    f"{tuple(hc.scale.shape)} do not match the mHC parameterisation for hc_mult={n}, "
                    f"hidden_size={d} (fn [(2+n)n, n*d], base [(2+n)n], scale [3])"
                )
    if tuple(base.hc_head.hc_fn.shape) != (n, n * d):
        raise UnsupportedModelError(
            f"hc_head.hc_fn has shape {tuple(base.hc_head.hc_fn.shape)}, expected {(n, n * d)}"
        )


def _describe(hf_model: nn.Module, base: nn.Module) -> Dict[str, Any]:
    config, hc0, attn = getattr(hf_model, "config", None), base.layers[0].attn_hc, base.layers[0].self_attn
    inter = int(getattr(config, "moe_intermediate_size", 0) or 4 * hc0.fn.shape[1] // int(hc0.hc_mult))
    per_tok = int(getattr(config, "num_experts_per_tok", 1) or 1) + int(
        getattr(config, "n_shared_experts", 0) or 0
    )
    # hyper_conn_type: HFMHCConfig's default "mhc" (sigmoid / 2 sigmoid / Sinkhorn)
    out = dict(d_mlp=inter * per_tok, hc_eps=float(hc0.hc_eps), sinkhorn_iters=int(hc0.hc_sinkhorn_iters))
    for key, attr in (("n_heads", "num_heads"), ("d_head", "head_dim")):
        if hasattr(attn, attr):
            out[key] = int(getattr(attn, attr))
    return out


DEEPSEEK_V4 = HyperConnectionSpec(
    name="deepseek_v4",
    description="transformers' DeepSeek-V4: DeepseekV4ForCausalLM, hyper-connections like DeepseekV4HyperConnection",
    layout={
        "attn": ("attn_hc", "input_layernorm", "self_attn"),
        "mlp": ("ffn_hc", "post_attention_layernorm", "mlp"),
    },
    hc_attrs=("hc_mult", "fn", "base", "scale", "hc_sinkhorn_iters", "hc_eps", "input_norm"),
    head_attrs=("hc_fn", "hc_base", "hc_scale", "eps", "input_norm"),
    coefficients=_coefficients,
    head_weights=head_weights_of,
    branch=_branch,
    layer_forward=_layer_forward,
    context=_context,
    routes_by_token=lambda branch: bool(getattr(branch, "is_hash", False)),
    check_shapes=_check_shapes,
    describe=_describe,
    parts=dict(embed="embed_tokens", layers="layers", final_norm="norm", head="hc_head", rotary="rotary_emb"),
)


def tiny_deepseek_v4_config(**overrides: Any):
    """A DeepseekV4Config small enough for CPU tests (hidden 64, 2 layers, 4 experts, hc_mult 4)."""
    from transformers import DeepseekV4Config

    kwargs = dict(
        vocab_size=96,
        hidden_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=16,
        q_lora_rank=32,
        o_groups=2,
        o_lora_rank=16,
        num_experts_per_tok=2,
        n_routed_experts=4,
        n_shared_experts=1,
        index_n_heads=2,
        index_head_dim=16,
        index_topk=4,
        sliding_window=8,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        layer_types=["compressed_sparse_attention", "heavily_compressed_attention"],
        mlp_layer_types=["hash_moe", "moe"],
        num_nextn_predict_layers=0,
        max_position_embeddings=64,
        partial_rotary_factor=0.5,
        hc_mult=4,
        initializer_range=0.1,
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
    with torch.random.fork_rng(devices=[]):  # the global CPU generator is left as it was
        torch.manual_seed(seed)
        model = DeepseekV4ForCausalLM(config)
    normal = {  # module class -> (parameter, standard deviation) drawn from N(0, std^2), in this order
        "DeepseekV4HyperConnection": (("fn", mixing_std), ("base", 1.0)),
        "DeepseekV4HyperHead": (("hc_fn", mixing_std), ("hc_base", 1.0)),
        "DeepseekV4Attention": (("sinks", 0.5),),
    }
    with torch.no_grad():
        for module in model.modules():
            for name, std in normal.get(type(module).__name__, ()):
                weight = getattr(module, name)
                weight.copy_(torch.randn(weight.shape, generator=gen) * std)
            if type(module).__name__ == "DeepseekV4HashRouter":
                module.tid2eid.copy_(
                    torch.randint(0, module.num_experts, module.tid2eid.shape, generator=gen)
                )
    return model.eval()
