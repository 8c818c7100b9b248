"""`HookedHFMHC`: a HuggingFace mHC model (transformers' DeepSeek-V4, or any model built from the
same hyper-connection modules) behind the hook names and semantics of `HookedMHC`, so every hook,
per-stream helper, frozen-mixing run and probe of `mhc_interp` works on it unchanged.

    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(path)             # or device_map="auto"
    model = HookedHFMHC(hf)                                     # wraps hf in place, no weight copy
    logits, cache = model.run_with_cache(tokens)                # == hf(tokens).logits

Nothing is copied: the adapter registers the HF model as its submodule `hf_model` and, for each
decoder layer, calls the layer's own `input_layernorm`, `self_attn`, `post_attention_layernorm`
and `mlp` and the model's `embed_tokens`, `rotary_emb`, `norm` and `lm_head` in the order
`DeepseekV4Model.forward` does, with TransformerLens hook points between them. The
hyper-connection modules (`attn_hc`, `ffn_hc`, `hc_head`) are recomputed from their weights (to
expose and freeze H_pre/H_post/H_res), and the decoder layers and the HF model itself never run
as modules: a torch hook registered on one of those would never fire, so a forward with one
raises instead. Splitting the decoder layer into its two hyper-connected sublayers
(rather than hooking `DeepseekV4DecoderLayer.forward` from outside) is what makes `H_pre` visible
(the HF module consumes it internally), lets frozen coefficients replace the computed ones, and
lets a run resume from a stream state at any sublayer (`start_at_sublayer`, used by the batched
causal probes): positions, rotary tables and the causal mask are rebuilt from the state's shape.

Hook points (same names, shapes and meaning as `HookedMHC`, see the README table):

    hook_embed                         [batch, pos, d_model]          token embedding
    hook_streams_init                  [batch, pos, n, d_model]       n copies of the embedding
    blocks.{l}.{attn,mlp}.hook_streams_in / hook_h_pre / hook_h_post / hook_h_res /
                          hook_read / hook_write / hook_res_mix / hook_streams_out
    head.hook_streams_in               [batch, pos, n, d_model]       final stream state
    head.hook_h_pre                    [batch, pos, n]                hc_head collapse weights
    head.hook_read                     [batch, pos, d_model]          sum_s w_s x_s (before the norm)
    head.hook_write                    [batch, pos, d_model]          final RMSNorm of the collapse
    hook_logits                        [batch, pos, d_vocab]          every position

Semantic differences from `HookedMHC` (and from the HF module's own conventions):

* H_res is reported in the papers' convention [target, source]. The HF module returns `comb`
  indexed [source, target] (the decoder layer mixes with `comb^T @ x`); `hook_h_res` holds
  `comb^T`. H_post = `post` = 2 sigmoid(.), H_pre = `pre` = sigmoid(.) + hc_eps (the eps is part of
  the HF definition, so H_pre never reaches 0). H_res is Sinkhorn-normalised with `hc_eps` in the
  denominators and `hc_sinkhorn_iters` iterations ending with a normalisation of comb's columns:
  the rows of H_res sum to 1 within hc_eps, its columns to 1 within the Sinkhorn residual.
* The branch of a sublayer is `F(read) = self_attn(input_layernorm(read))` (attention) or
  `mlp(post_attention_layernorm(read), input_ids)` (MoE); `hook_read` is before that norm, as in
  HookedMHC. There are no per-head attention hooks (hook_q/k/v/pattern) and no position-embedding
  hook: DeepSeek-V4 uses rotary embeddings inside attention.
* The final readout is **not** a plain sum of per-stream LayerNorms. DeepSeek-V4 collapses the
  streams with the learned, input-dependent `hc_head` (w = sigmoid(.) + hc_eps, one weight per
  stream and token, computed from the final state), then applies one RMSNorm and `lm_head`. The
  head is exposed as a read-only "sublayer" named `head` (streams_in -> h_pre -> read -> write),
  instead of HookedMHC's `hook_ln_final` / `hook_stream_sum`. A logit lens must go through the
  head: `model.unembed_streams(state)` applies the hc_head collapse computed from `state` itself
  (or fixed weights: `head_weights=` [batch, pos, n], e.g. the clean `head.hook_h_pre`), then the
  final norm and `lm_head`. Summing the streams instead is not what the model computes.
  `model.stream_contributions(state)` [batch, pos, n, d_vocab] is the exact per-stream split of
  that readout (c_s = W_U^T(gamma * w_s x_s * r), r the RMS normaliser of the *collapsed* state,
  shared by all streams; sum_s c_s = the logits). HookedMHC's per-stream lens (W_U^T LN_f(x_s),
  `model.ln_final`) has no counterpart here: there is no per-stream final norm.
* Frozen mixing: the function `mhc_interp.hooks.freeze.frozen_mixing` freezes every sublayer's
  H_pre/H_post/H_res and leaves the hc_head collapse weights recomputed from the edited final state;
  the method `model.frozen_mixing(cache)` - what the causal probes use - also freezes the head when
  the cache holds `head.hook_h_pre` (`clean_run` and `names_filter=is_mixing_hook` cache it), so
  in rescue and frozen patching the readout weights are the base run's too.
* Hash-routed MoE layers (`mlp_layer_types == "hash_moe"`) route by token id, not by the residual
  stream, so resuming from a stream state needs the token ids. `model(state,
  start_at_sublayer=k, tokens=ids)` takes them explicitly; without `tokens=` the adapter finds
  them itself when `state` (or a batch of replicas of it) is exactly a state that one of its last
  `token_memory` token runs produced at sublayer k - the case of every batched causal probe -
  by comparing an exact integer fingerprint of the state's bits; otherwise it raises.
* No KV cache, no padding attention mask: every run is one stateless prefill over positions
  0..pos-1 (right padding does not affect earlier positions under causal attention; the probe
  runner masks padded positions out of its statistics). Multi-token-prediction (MTP) layers of the
  checkpoint (`num_nextn_predict_layers`) are not part of transformers' model and are not hooked.
* Coefficients are computed in float32 (transformers keeps `attn_hc`/`ffn_hc`/`hc_head` in
  float32), like HookedMHC's.

Several devices (accelerate `device_map`, incl. cpu/disk offload): each sublayer runs on the
execution device of its layer, the state is moved there first, offloaded hyper-connection weights
are loaded for the step through accelerate's own hook, logits come back on `model.device` (the
embedding's execution device), and `stop_at_sublayer` states too. When the model spans several
devices, every TransformerLens hook receives its activation on `model.device` and whatever it
returns is moved back to where the hook fired - so caches aggregate on one device and the
probes' hooks (stream edits, masks, ablation values built on `model.device`) run unchanged.
nnsight envoys see activations where they fire.
"""
from __future__ import annotations

import inspect
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformer_lens.hook_points import HookPoint

from ..hooks.root import StreamHookedRoot
from ..model.compiled import torch_hooks_attached
from ..model.mixers import MixingCoefficients

__all__ = ["HookedHFMHC", "HFMHCConfig", "UnsupportedModelError", "find_hyper_connections",
           "hc_coefficients", "head_weights_of", "HEAD_HOOKS"]


# What a decoder layer must expose (DeepSeek-V4 layout): sublayer -> (hyper-connection, norm, branch)
LAYER_LAYOUT = {"attn": ("attn_hc", "input_layernorm", "self_attn"),
                "mlp": ("ffn_hc", "post_attention_layernorm", "mlp")}
HC_ATTRS = ("hc_mult", "fn", "base", "scale", "hc_sinkhorn_iters", "hc_eps", "input_norm")
HEAD_ATTRS = ("hc_fn", "hc_base", "hc_scale", "eps", "input_norm")
BASE_ATTRS = ("embed_tokens", "layers", "norm", "rotary_emb", "hc_head")
HEAD_HOOKS = ("head.hook_streams_in", "head.hook_h_pre", "head.hook_read", "head.hook_write")


class UnsupportedModelError(ValueError):
    """The HF model has no hyper-connections, or a structure / config the adapter does not support."""


@dataclass
class HFMHCConfig:
    """The `HookedMHC`-style view of an HF mHC config (what hooks and probes read)."""

    n_layers: int
    d_model: int
    n_streams: int
    d_vocab: int
    n_ctx: int
    n_heads: int
    d_head: int
    d_mlp: int                       # expert width x (routed per token + shared): a memory estimate
    hc_eps: float
    sinkhorn_iters: int
    hash_layers: Tuple[int, ...] = ()  # layers whose MoE routes by token id
    model_type: str = "deepseek_v4"
    hyper_conn_type: str = "mhc"      # DeepSeek-V4's hyper-connections are mHC (sigmoid / 2 sigmoid / Sinkhorn)
    attn_impl: str = "eager"
    tokenizer_name: Optional[str] = None

    @property
    def n_sublayers(self) -> int:
        return 2 * self.n_layers

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------- structure
def _is_hyper_connection(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("hc_mult", "fn", "base", "scale"))


def find_hyper_connections(model: nn.Module) -> List[str]:
    """Names of the modules that look like transformers' `DeepseekV4HyperConnection`."""
    return [name for name, m in model.named_modules() if _is_hyper_connection(m)]


def _base_model(hf_model: nn.Module) -> nn.Module:
    for candidate in (getattr(hf_model, "model", None), hf_model):
        if candidate is not None and hasattr(candidate, "layers"):
            return candidate
    return hf_model


def _describe_config(config) -> str:
    if config is None:
        return "no config"
    return (f"config.model_type={getattr(config, 'model_type', None)!r}, "
            f"hc_mult={getattr(config, 'hc_mult', None)!r}")


def _validate_structure(hf_model: nn.Module) -> Tuple[nn.Module, nn.Module]:
    """(base model, lm_head) or UnsupportedModelError saying what was looked for."""
    config = getattr(hf_model, "config", None)
    kind = type(hf_model).__name__
    if not isinstance(hf_model, nn.Module):
        raise UnsupportedModelError(f"expected a transformers model (torch.nn.Module), got {kind}")
    hcs = find_hyper_connections(hf_model)
    if not hcs:
        raise UnsupportedModelError(
            f"{kind} has no hyper-connections: looked for modules like transformers' "
            f"DeepseekV4HyperConnection (attributes {', '.join(HC_ATTRS)}) at "
            f"model.layers[i].attn_hc / .ffn_hc, and found none ({_describe_config(config)}). "
            f"The adapter supports mHC models such as DeepSeek-V4 (DeepseekV4ForCausalLM); a plain "
            f"residual model has one stream - use HookedMHC or TransformerLens for it."
        )
    base = _base_model(hf_model)
    missing = [a for a in BASE_ATTRS if not hasattr(base, a)]
    if missing:
        raise UnsupportedModelError(
            f"{kind} has hyper-connection modules ({hcs[:2]}...) but not the DeepSeek-V4 model "
            f"layout the adapter drives: its base model lacks {missing} (expected {list(BASE_ATTRS)})"
        )
    lm_head = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
    if lm_head is None:
        raise UnsupportedModelError(
            f"{kind} has no language-model head (get_output_embeddings() is None): load the causal "
            f"LM (e.g. DeepseekV4ForCausalLM / AutoModelForCausalLM), not the bare base model"
        )
    for i, layer in enumerate(base.layers):
        for attrs in LAYER_LAYOUT.values():
            absent = [a for a in attrs if not hasattr(layer, a)]
            if absent:
                raise UnsupportedModelError(
                    f"decoder layer {i} ({type(layer).__name__}) lacks {absent}: the adapter needs "
                    f"{[a for v in LAYER_LAYOUT.values() for a in v]} (the DeepSeek-V4 layout)"
                )
            hc = getattr(layer, attrs[0])
            absent = [a for a in HC_ATTRS if not hasattr(hc, a)]
            if absent:
                raise UnsupportedModelError(f"layer {i} {attrs[0]} ({type(hc).__name__}) lacks {absent}")
    absent = [a for a in HEAD_ATTRS if not hasattr(base.hc_head, a)]
    if absent:
        raise UnsupportedModelError(f"hc_head ({type(base.hc_head).__name__}) lacks {absent}")
    return base, lm_head


def _check_shapes(base: nn.Module, n: int, d: int) -> None:
    for i, layer in enumerate(base.layers):
        for hc_name, _, _ in LAYER_LAYOUT.values():
            hc = getattr(layer, hc_name)
            if int(hc.hc_mult) != n:
                raise UnsupportedModelError(f"layer {i} {hc_name} has hc_mult={hc.hc_mult}, the model {n}")
            want = ((2 + n) * n, n * d)
            if tuple(hc.fn.shape) != want or tuple(hc.base.shape) != (want[0],) or hc.scale.numel() != 3:
                raise UnsupportedModelError(
                    f"layer {i} {hc_name}: fn {tuple(hc.fn.shape)} / base {tuple(hc.base.shape)} / scale "
                    f"{tuple(hc.scale.shape)} do not match the mHC parameterisation for hc_mult={n}, "
                    f"hidden_size={d} (fn [(2+n)n, n*d], base [(2+n)n], scale [3])"
                )
    head = base.hc_head
    if tuple(head.hc_fn.shape) != (n, n * d):
        raise UnsupportedModelError(f"hc_head.hc_fn has shape {tuple(head.hc_fn.shape)}, expected {(n, n * d)}")


def _config_from(hf_model: nn.Module, base: nn.Module, lm_head: nn.Module) -> HFMHCConfig:
    config = getattr(hf_model, "config", None)
    layers = base.layers
    if len(layers) == 0:
        raise UnsupportedModelError("the model has no decoder layers")
    hc0 = layers[0].attn_hc
    n = int(hc0.hc_mult)
    if n < 1:
        raise UnsupportedModelError(f"hc_mult must be >= 1, got {n}")
    d = int(base.embed_tokens.weight.shape[-1])
    vocab = int(lm_head.weight.shape[0])
    attn = layers[0].self_attn
    n_heads = int(getattr(attn, "num_heads", getattr(config, "num_attention_heads", 1)))
    d_head = int(getattr(attn, "head_dim", getattr(config, "head_dim", d // max(n_heads, 1))))
    inter = int(getattr(config, "moe_intermediate_size", 4 * d) or 4 * d)
    per_tok = int(getattr(config, "num_experts_per_tok", 1) or 1) + int(getattr(config, "n_shared_experts", 0) or 0)
    n_ctx = int(getattr(config, "max_position_embeddings", 0) or 1 << 20)
    hash_layers = tuple(i for i, layer in enumerate(layers) if bool(getattr(layer.mlp, "is_hash", False)))
    impl = getattr(config, "_attn_implementation", None) or "eager"
    return HFMHCConfig(n_layers=len(layers), d_model=d, n_streams=n, d_vocab=vocab, n_ctx=n_ctx,
                       n_heads=n_heads, d_head=d_head, d_mlp=inter * per_tok, hc_eps=float(hc0.hc_eps),
                       sinkhorn_iters=int(hc0.hc_sinkhorn_iters), hash_layers=hash_layers,
                       model_type=str(getattr(config, "model_type", "unknown")), attn_impl=str(impl),
                       tokenizer_name=getattr(config, "_name_or_path", None) or None)


# ------------------------------------------------------------------------- devices / offload
def _hooks_of(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", [hook]))


def _execution_device(module: nn.Module, fallback: Optional[torch.device] = None) -> torch.device:
    """Where accelerate runs `module` (its hook's execution device), else where its weights are."""
    for hook in _hooks_of(module):
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    for t in list(module.parameters(recurse=False)) + list(module.parameters()):
        if t.device.type != "meta":
            return t.device
    if fallback is not None:
        return fallback
    raise UnsupportedModelError(f"cannot tell which device {type(module).__name__} runs on (meta weights, no hook)")


@contextmanager
def _onloaded(module: nn.Module) -> Iterator[None]:
    """Make an accelerate-offloaded module's own weights real for the duration (its hook's
    pre/post_forward, exactly what calling the module would do); a no-op otherwise."""
    hooks = [h for h in _hooks_of(module) if getattr(h, "offload", False)]
    for h in hooks:
        h.pre_forward(module)
    try:
        yield
    finally:
        for h in reversed(hooks):
            h.post_forward(module, None)


class _GatheringHook:
    """A TransformerLens hook run on `device`: the activation is moved there, the result back."""

    def __init__(self, fn: Callable, device: torch.device):
        self.fn, self.device = fn, device

    def __call__(self, act, hook):
        if not isinstance(act, Tensor) or act.device == self.device:
            return self.fn(act, hook=hook)
        out = self.fn(act.to(self.device), hook=hook)
        return out.to(act.device) if isinstance(out, Tensor) else out

    def __repr__(self) -> str:
        inner = getattr(self.fn, "func", self.fn)
        return f"gathered({getattr(inner, '__name__', type(inner).__name__)} on {self.device})"


class AdapterHookPoint(HookPoint):
    """A HookPoint that, when `gather_device` is set (model spread over several devices), runs
    its hooks on that device (see `_GatheringHook`)."""

    gather_device: Optional[torch.device] = None

    def add_hook(self, hook, dir="fwd", is_permanent=False, level=None, prepend=False, **kwargs):
        if self.gather_device is not None and not isinstance(hook, _GatheringHook):
            hook = _GatheringHook(hook, self.gather_device)
        return super().add_hook(hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend, **kwargs)


# ------------------------------------------------------------------------------ coefficients
def hc_coefficients(hc: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(pre [b,p,n], post [b,p,n], comb [b,p,n(source),n(target)]) of a DeepseekV4HyperConnection
    for streams x [b,p,n,d], float32, op for op as `DeepseekV4HyperConnection.forward` (which
    consumes `pre` internally and returns only post, comb and the collapsed read)."""
    b, p = x.shape[:2]
    n = int(hc.hc_mult)
    eps = hc.hc_eps
    flat = hc.input_norm(x.reshape(b, p, -1).float())
    flat = F.linear(flat, hc.fn.float())
    pre_w, post_w, comb_w = flat.split([n, n, n * n], dim=-1)
    pre_b, post_b, comb_b = hc.base.split([n, n, n * n])
    pre_scale, post_scale, comb_scale = hc.scale.unbind(0)
    comb_w = comb_w.view(*comb_w.shape[:-1], n, n)
    comb_b = comb_b.view(n, n)
    pre = torch.sigmoid(pre_w * pre_scale + pre_b) + eps
    post = 2 * torch.sigmoid(post_w * post_scale + post_b)
    comb = torch.softmax(comb_w * comb_scale + comb_b, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(int(hc.hc_sinkhorn_iters) - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return pre, post, comb


def head_weights_of(head: nn.Module, x: Tensor) -> Tensor:
    """hc_head collapse weights [b,p,n] (float32), op for op as `DeepseekV4HyperHead.forward`."""
    flat = head.input_norm(x.flatten(2).float())
    mixes = F.linear(flat, head.hc_fn.float())
    return torch.sigmoid(mixes * head.hc_scale.float() + head.hc_base.float()) + head.eps


def _no_cache(fn: Callable) -> Dict[str, None]:
    """`cache=None` or `past_key_values=None`, whichever `fn` names (transformers 5.24 renamed the
    second to the first and deprecates it); {} if it names neither."""
    params = inspect.signature(fn).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return {name: None}
    return {}


def _bypassed_modules(hf_model: nn.Module, base: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of the HF modules whose forward the adapter never calls: it recomputes the
    hyper-connection modules (to expose and freeze H_pre/H_post/H_res) and runs each decoder
    layer's parts itself, so the HF model, its decoder layers, attn_hc / ffn_hc and hc_head do
    not run as modules."""
    names = {id(m): n for n, m in hf_model.named_modules()}
    chosen = [hf_model, base, base.hc_head]
    for layer in base.layers:
        chosen += [layer, layer.attn_hc, layer.ffn_hc]
    return [(names.get(id(m), type(m).__name__) or "the HF model", m) for m in dict.fromkeys(chosen)]


def _refuse_bypassed_hooks(bypassed: List[Tuple[str, nn.Module]]) -> None:
    """A torch hook on a module the adapter does not run would silently never fire."""
    hooked = [name for name, m in bypassed if torch_hooks_attached(m)]
    if hooked:
        raise RuntimeError(
            f"torch hooks are registered on {hooked[:4]}{' ...' if len(hooked) > 4 else ''}, which the adapter "
            f"does not run as modules (it recomputes the hyper-connections and calls each layer's parts "
            f"itself), so they would never fire; use the adapter's hook points (blocks.{{l}}.attn.hook_h_pre, "
            f"...hook_streams_out, head.hook_h_pre, ...) or hooks on the parts it calls (self_attn, mlp, "
            f"input_layernorm, norm, lm_head)")


def _repeat_to(t: Tensor, batch: int, what: str, name: str) -> Tensor:
    """Frozen / context tensors of batch B serve a run of batch k*B (replica-major); always a new
    tensor (hooks may edit what they get in place)."""
    if t.shape[0] == batch:
        return t.clone()
    if batch % t.shape[0]:
        raise ValueError(f"{what} for {name!r} has batch {t.shape[0]}, the run {batch}: the run's batch "
                         f"must be a multiple")
    return t.repeat(batch // t.shape[0], *([1] * (t.ndim - 1)))


# ---------------------------------------------------------------------------- run context
class _Context:
    """What the branches need besides the streams: positions, rotary tables, causal mask, token
    ids (hash routing), built once per run on the main device and copied per device on demand."""

    def __init__(self, position_ids, position_embeddings, attention_mask, input_ids):
        self.position_ids = position_ids
        self.position_embeddings = position_embeddings
        self.attention_mask = attention_mask
        self.input_ids = input_ids
        self._on: Dict[torch.device, "_Context"] = {}

    def on(self, device: torch.device) -> "_Context":
        if self.position_ids.device == device:
            return self
        if device not in self._on:
            mv = lambda t: None if t is None else t.to(device)  # noqa: E731
            pe = {k: (mv(c), mv(s)) for k, (c, s) in self.position_embeddings.items()}
            self._on[device] = _Context(mv(self.position_ids), pe, mv(self.attention_mask), mv(self.input_ids))
        return self._on[device]


# --------------------------------------------------------------------------- token memory
class _TokenMemory:
    """Which token ids produced a stream state: an exact fingerprint of the state entering each
    hash-relevant sublayer, per row and position, for the last `size` token runs.

    fingerprint(x)[b, p] = sum_e bits16(x[b, p])_e * w_e  (int64, exact, order-independent), where
    bits16 reinterprets the floats as 16-bit integers and w is a fixed pseudo-random weight per
    element (so permuting streams changes it)."""

    def __init__(self, size: int):
        self.runs: deque = deque(maxlen=max(1, size))
        self._weights: Dict[Tuple[torch.device, int], Tensor] = {}

    def fingerprint(self, x: Tensor) -> Tensor:
        b, p = x.shape[:2]
        bits = x.detach().contiguous().view(torch.int16).reshape(b * p, -1)   # [b*p, m]
        m = bits.shape[-1]
        key = (bits.device, m)
        if key not in self._weights:
            g = torch.Generator().manual_seed(0x5EED)
            self._weights[key] = torch.randint(1, 1 << 15, (m,), generator=g, dtype=torch.int32).to(bits.device)
        w = self._weights[key]
        out = torch.empty(b * p, dtype=torch.int64, device=bits.device)
        step = max(1, (1 << 24) // m)   # bounded int32 temporaries (|bits * w| < 2^30), int64 sums
        for i in range(0, b * p, step):
            out[i:i + step] = (bits[i:i + step].to(torch.int32) * w).sum(-1, dtype=torch.int64)
        return out.view(b, p).cpu()

    def new_run(self, ids: Tensor) -> dict:
        run = {"ids": ids.detach().cpu(), "fp": {}}
        self.runs.appendleft(run)
        return run

    def lookup(self, sublayer: int, x: Tensor) -> Optional[Tensor]:
        """Token ids [K, pos] for the K rows of x, or None if some row is unknown."""
        fp = self.fingerprint(x)
        found: List[Optional[Tensor]] = [None] * fp.shape[0]
        for run in self.runs:
            ref = run["fp"].get(sublayer)
            if ref is None or ref.shape[1] != fp.shape[1]:
                continue
            index = run.setdefault("index", {}).get(sublayer)
            if index is None:
                index = {row.numpy().tobytes(): i for i, row in enumerate(ref)}
                run["index"][sublayer] = index
            for r in range(fp.shape[0]):
                i = index.get(fp[r].numpy().tobytes())
                if i is None:
                    continue
                ids = run["ids"][i]
                if found[r] is not None and not torch.equal(found[r], ids):
                    raise ValueError(
                        f"row {r} of the state entering sublayer {sublayer} matches token runs with "
                        f"different token ids; pass tokens= explicitly"
                    )
                found[r] = ids
        if any(f is None for f in found):
            return None
        return torch.stack(found)


# ------------------------------------------------------------------------------ sublayers
class HFHyperConnectedSublayer(nn.Module):
    """One hyper-connected sublayer of an HF decoder layer, driven with HookedMHC's hook points.

    The HF modules are referenced, not registered (so they are not walked twice and their weights
    live only under `HookedHFMHC.hf_model`): `self.hf.hc`, `self.hf.norm`, `self.hf.branch`."""

    def __init__(self, layer: nn.Module, kind: str, index: int):
        super().__init__()
        hc_name, norm_name, branch_name = LAYER_LAYOUT[kind]
        self.kind, self.index = kind, index
        self.hf = SimpleNamespace(layer=layer, hc=getattr(layer, hc_name), norm=getattr(layer, norm_name),
                                  branch=getattr(layer, branch_name))
        self.hf.no_cache = _no_cache(self.hf.branch.forward)   # read once, not on every forward
        self.needs_input_ids = kind == "mlp" and bool(getattr(self.hf.branch, "is_hash", False))
        self.frozen: Optional[MixingCoefficients] = None
        self.device: Optional[torch.device] = None  # execution device, set by the adapter
        self.hook_streams_in = AdapterHookPoint()   # [batch, pos, n_streams, d_model]
        self.hook_h_pre = AdapterHookPoint()        # [batch, pos, n_streams]
        self.hook_h_post = AdapterHookPoint()       # [batch, pos, n_streams]
        self.hook_h_res = AdapterHookPoint()        # [batch, pos, n_streams(target), n_streams(source)]
        self.hook_read = AdapterHookPoint()         # [batch, pos, d_model]
        self.hook_write = AdapterHookPoint()        # [batch, pos, d_model]
        self.hook_res_mix = AdapterHookPoint()      # [batch, pos, n_streams, d_model]
        self.hook_streams_out = AdapterHookPoint()  # [batch, pos, n_streams, d_model]

    def coefficients(self, x: Tensor) -> MixingCoefficients:
        """(H_pre, H_post, H_res [target, source]) for state x: the HF module's, or the frozen
        ones (a frozen cache of batch B serves a run of batch k*B)."""
        if self.frozen is None:
            with _onloaded(self.hf.hc):
                pre, post, comb = hc_coefficients(self.hf.hc, x)
            return MixingCoefficients(pre, post, comb.transpose(-1, -2))
        return self.frozen.fit(x, self.name)

    def branch(self, read: Tensor, ctx: _Context) -> Tensor:
        h = self.hf.norm(read)
        if self.kind == "attn":
            out, _ = self.hf.branch(h, position_embeddings=ctx.position_embeddings, position_ids=ctx.position_ids,
                                    attention_mask=ctx.attention_mask, **self.hf.no_cache)
            return out
        ids = ctx.input_ids
        if ids is not None:
            ids = _repeat_to(ids, read.shape[0], "token ids", self.name)
        elif self.needs_input_ids:
            raise ValueError(f"{self.name} routes by token id (hash MoE) and no token ids are available")
        return self.hf.branch(h, input_ids=ids)

    def forward(self, x: Tensor, ctx: _Context) -> Tensor:
        if self.device is not None and x.device != self.device:
            x = x.to(self.device)
        ctx = ctx.on(x.device)
        x = self.hook_streams_in(x)
        coeffs = self.coefficients(x)
        h_pre = self.hook_h_pre(coeffs.h_pre)
        h_post = self.hook_h_post(coeffs.h_post)
        h_res = self.hook_h_res(coeffs.h_res)
        read = self.hook_read((h_pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype))
        write = self.hook_write(self.branch(read, ctx))
        mixed = self.hook_res_mix(torch.matmul(h_res.to(x.dtype), x))
        return self.hook_streams_out(h_post.to(x.dtype).unsqueeze(-1) * write.unsqueeze(-2) + mixed)


class HFBlock(nn.Module):
    def __init__(self, layer: nn.Module, index: int):
        super().__init__()
        self.attn = HFHyperConnectedSublayer(layer, "attn", index)
        self.mlp = HFHyperConnectedSublayer(layer, "mlp", index)


class HFHead(nn.Module):
    """The final readout as a read-only sublayer: w = hc_head weights (or frozen), read = sum_s w_s
    x_s, write = final RMSNorm(read); logits = lm_head(write)."""

    def __init__(self, base: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.hf = SimpleNamespace(head=base.hc_head, norm=base.norm, lm_head=lm_head)
        self.frozen: Optional[Tensor] = None
        self.device: Optional[torch.device] = None
        self.hook_streams_in = AdapterHookPoint()  # [batch, pos, n_streams, d_model]
        self.hook_h_pre = AdapterHookPoint()       # [batch, pos, n_streams]
        self.hook_read = AdapterHookPoint()        # [batch, pos, d_model]
        self.hook_write = AdapterHookPoint()       # [batch, pos, d_model]

    def forward(self, x: Tensor, weights: Optional[Tensor] = None) -> Tensor:
        """final state [b, p, n, d] -> normed read [b, p, d] (before lm_head)."""
        if self.device is not None and x.device != self.device:
            x = x.to(self.device)
        x = self.hook_streams_in(x)
        if weights is None:
            weights = self.frozen
        if weights is None:
            with _onloaded(self.hf.head):
                w = head_weights_of(self.hf.head, x)
        else:
            w = _repeat_to(weights.to(x.device), x.shape[0], "head weights", "head")
            if w.shape[:2] != x.shape[:2]:
                raise ValueError(f"head weights {tuple(weights.shape)} do not fit the state {tuple(x.shape)}")
        w = self.hook_h_pre(w)
        read = self.hook_read((w.unsqueeze(-1) * x).sum(dim=2).to(x.dtype))
        return self.hook_write(self.hf.norm(read))


# ---------------------------------------------------------------------------------- adapter
class HookedHFMHC(StreamHookedRoot):
    """HookedMHC's hook API on a HuggingFace mHC model (DeepSeek-V4); see the module docstring.

    hf_model: a causal LM whose base model has `embed_tokens`, `layers` (each with `attn_hc`,
        `input_layernorm`, `self_attn`, `ffn_hc`, `post_attention_layernorm`, `mlp`), `norm`,
        `rotary_emb` and `hc_head` - transformers' `DeepseekV4ForCausalLM`. Wrapped in place.
    check: verify once that the adapter's split of a decoder layer reproduces the HF layer (and
        the head) on a small random input, raising `UnsupportedModelError` if not - a guard
        against a model whose modules look the same but compute something else.
    token_memory: how many recent token runs to remember for resuming hash-routed layers.
    """

    def __init__(self, hf_model: nn.Module, tokenizer: Any = None, *, check: bool = True,
                 token_memory: int = 16):
        super().__init__()
        base, lm_head = _validate_structure(hf_model)
        self.cfg = _config_from(hf_model, base, lm_head)
        _check_shapes(base, self.cfg.n_streams, self.cfg.d_model)
        self.hf_model = hf_model  # registered: parameters()/eval()/named_modules() see it, nothing is copied
        self.tokenizer = tokenizer
        self._hf = SimpleNamespace(base=base, lm_head=lm_head, config=getattr(hf_model, "config", None),
                                   bypassed=_bypassed_modules(hf_model, base))
        self.blocks = nn.ModuleList([HFBlock(layer, i) for i, layer in enumerate(base.layers)])
        self.head = HFHead(base, lm_head)
        self.hook_embed = AdapterHookPoint()         # [batch, pos, d_model]
        self.hook_streams_init = AdapterHookPoint()  # [batch, pos, n_streams, d_model]
        self.hook_logits = AdapterHookPoint()        # [batch, pos, d_vocab]
        hash_subs = [k for k, s in enumerate(self.sublayers) if s.needs_input_ids]
        self._last_hash_sublayer = max(hash_subs) if hash_subs else -1
        self._tokens = _TokenMemory(token_memory)
        self.setup()
        self.refresh_devices()
        if check:
            self.check_against_hf()

    # ------------------------------------------------------------------------------ set-up
    def setup(self) -> None:
        """TransformerLens set-up over the adapter's own modules only (the HF tree is not renamed)."""
        self.mod_dict, self.hook_dict = {}, {}
        for name, module in self.named_modules():
            if name == "" or name == "hf_model" or name.startswith("hf_model."):
                continue
            module.name = name
            self.mod_dict[name] = module
            if isinstance(module, HookPoint):
                self.hook_dict[name] = module

    def refresh_devices(self) -> None:
        """Re-read where every part runs (call after moving or re-dispatching the HF model)."""
        base = self._hf.base
        main = _execution_device(base.embed_tokens)
        self._main_device = main
        for sub in self.sublayers:
            sub.device = _execution_device(sub.hf.hc, fallback=_execution_device(sub.hf.branch, main))
        self.head.device = _execution_device(base.hc_head, fallback=_execution_device(base.norm, main))
        devices = {main, self.head.device, *(s.device for s in self.sublayers)}
        self.devices = sorted(devices, key=str)
        gather = main if len(devices) > 1 else None
        for hp in self.hook_dict.values():
            hp.gather_device = gather

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half(): re-read the devices afterwards
        out = super()._apply(fn, recurse)
        if hasattr(self, "head"):
            self.refresh_devices()
        return out

    # ----------------------------------------------------------------------------- structure
    @property
    def device(self) -> torch.device:
        return self._main_device

    @property
    def dtype(self) -> torch.dtype:
        return self._hf.base.embed_tokens.weight.dtype

    @property
    def W_U(self) -> Tensor:  # [d_model, d_vocab]
        return self._hf.lm_head.weight.T

    @property
    def is_multi_device(self) -> bool:
        return len(self.devices) > 1

    # -------------------------------------------------------------------------------- forward
    def _context(self, like: Tensor, input_ids: Optional[Tensor]) -> _Context:
        """Positions 0..pos-1, rotary tables and the sliding-window causal mask, as
        `DeepseekV4Model.forward` builds them (from the shape/dtype of `like` [b, p, d])."""
        from transformers.masking_utils import create_sliding_window_causal_mask

        base, config = self._hf.base, self._hf.config
        like = like.to(self.device)
        b, p = like.shape[:2]
        position_ids = torch.arange(p, device=like.device).unsqueeze(0)
        mask = create_sliding_window_causal_mask(config=config, inputs_embeds=like, attention_mask=None,
                                                 position_ids=position_ids,
                                                 **_no_cache(create_sliding_window_causal_mask))
        layer_types = getattr(base.rotary_emb, "layer_types", ["main", "compress"])
        pe = {t: base.rotary_emb(like, position_ids=position_ids, layer_type=t) for t in layer_types}
        return _Context(position_ids, pe, mask, input_ids)

    def _needs_ids(self, start: int, stop: int) -> bool:
        return any(s.needs_input_ids for s in self.sublayers[start:stop])

    def _resume_ids(self, x: Tensor, start: int, stop: int, tokens: Optional[Tensor]) -> Optional[Tensor]:
        if tokens is not None:
            ids = self._check_tokens(tokens)
            if ids.shape[1] != x.shape[1]:
                raise ValueError(f"tokens= has {ids.shape[1]} positions, the state {x.shape[1]}")
            return _repeat_to(ids, x.shape[0], "tokens=", "the resumed run")
        if not self._needs_ids(start, stop):
            return None
        ids = self._tokens.lookup(start, x)
        if ids is None:
            hashed = [s.name for s in self.sublayers[start:stop] if s.needs_input_ids]
            raise ValueError(
                f"resuming at sublayer {start} ({self.sublayer_names[start] if start < len(self.sublayers) else 'head'}) "
                f"runs {hashed}, whose MoE routes by token id (hash routing), and this state is not one "
                f"that the adapter's last {self._tokens.runs.maxlen} token runs produced there: pass the "
                f"token ids, model(state, start_at_sublayer={start}, tokens=ids)"
            )
        return ids.to(self.device)

    def forward(self, input: Any, return_type: Optional[str] = "logits", *,
                start_at_sublayer: Optional[int] = None, stop_at_sublayer: Optional[int] = None,
                tokens: Optional[Tensor] = None) -> Any:
        """Same contract as `HookedMHC.forward`: tokens [batch, pos] (or text), or with
        `start_at_sublayer=k` the stream state entering sublayer k; `stop_at_sublayer=k` returns
        the state entering sublayer k (on `model.device`). return_type "logits" | "loss" | "both" |
        None. `tokens=`: the token ids of a resumed run (hash-routed layers; the loss)."""
        start, stop = self._check_sublayer_span(start_at_sublayer, stop_at_sublayer)
        _refuse_bypassed_hooks(self._hf.bypassed)
        end = self.cfg.n_sublayers if stop is None else stop
        record = None
        if start_at_sublayer is None:
            tokens = self._check_tokens(input)
            embeds = self.hook_embed(self._hf.base.embed_tokens(tokens))
            x = self.hook_streams_init(embeds.unsqueeze(2).expand(-1, -1, self.cfg.n_streams, -1).contiguous())
            ids = tokens
            if self._last_hash_sublayer >= 0:
                record = self._tokens.new_run(tokens)
        else:
            x = self._check_state(input, self._hf.base.embed_tokens.weight.dtype)
            ids = self._resume_ids(x, start, end, tokens)
            if tokens is not None:
                tokens = ids
        ctx = self._context(x[:, :, 0], ids)
        for k in range(start, end):
            if record is not None and k <= self._last_hash_sublayer:
                record["fp"][k] = self._tokens.fingerprint(x)
            x = self.sublayers[k](x, ctx)
        if stop is not None:
            if record is not None and stop <= self._last_hash_sublayer:
                record["fp"][stop] = self._tokens.fingerprint(x)
            return x.to(self.device)
        return self.readout(x, return_type, tokens)

    def unembed_streams(self, x: Tensor, head_weights: Optional[Tensor] = None) -> Tensor:
        """stream state [batch, pos, n, d] -> logits [batch, pos, d_vocab] (on model.device), the
        way the model reads its final state: hc_head collapse (weights computed from `x`, or
        `head_weights` [batch, pos, n]), final RMSNorm, lm_head. Use this for a logit lens."""
        normed = self.head(x, head_weights)
        return self.hook_logits(self._hf.lm_head(normed)).to(self.device)

    @torch.no_grad()
    def stream_contributions(self, x: Tensor, head_weights: Optional[Tensor] = None,
                             dtype: torch.dtype = torch.float32) -> Tensor:
        """Exact per-stream decomposition of the readout (the per-stream logit lens of DeepSeek-V4):
        x [batch, pos, n, d] -> c [batch, pos, n, d_vocab] with sum_s c_s = unembed_streams(x):

            w = hc_head weights of x (or `head_weights`),  r = rsqrt(mean_d(sum_s w_s x_s)^2 + eps)
            c_s = W_U^T (gamma * w_s x_s * r)

        The normaliser r is the one of the collapsed state, shared by all streams (it is not a
        per-stream LayerNorm as in HookedMHC): c_s is stream s's own term of the sum."""
        head, norm, lm_head = self._hf.base.hc_head, self._hf.base.norm, self._hf.lm_head
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if eps is None or not hasattr(norm, "weight"):
            raise NotImplementedError(f"stream_contributions needs an RMSNorm final norm, got {type(norm).__name__}")
        x = x.to(self.head.device)
        if head_weights is None:
            with _onloaded(head):
                w = head_weights_of(head, x)
        else:
            w = _repeat_to(head_weights.to(x.device), x.shape[0], "head weights", "head")
        terms = (w.unsqueeze(-1) * x).to(dtype)                        # [b, p, n, d]
        collapsed = terms.sum(-2)
        r = torch.rsqrt(collapsed.pow(2).mean(-1, keepdim=True) + eps)  # [b, p, 1]
        with _onloaded(norm), _onloaded(lm_head):
            gamma = norm.weight.to(terms.device, dtype)
            W_U = lm_head.weight.to(terms.device, dtype)               # [vocab, d]
            bias = getattr(lm_head, "bias", None)
            bias = None if bias is None else bias.to(terms.device, dtype)
        out = (gamma * terms * r.unsqueeze(-2)) @ W_U.T
        if bias is not None:                                           # not in DeepSeek-V4; shared evenly
            out = out + bias / x.shape[-2]
        return out.to(self.device)

    # ------------------------------------------------------------------------- self-check
    @torch.no_grad()
    def check_against_hf(self, tolerance: Optional[float] = None) -> float:
        """Run decoder layer 0 and the head both ways (HF forward, adapter split) on a small random
        state; raise UnsupportedModelError if they differ. Returns the relative difference."""
        base = self._hf.base
        layer = base.layers[0]
        n, d, p = self.cfg.n_streams, self.cfg.d_model, 4
        dev = self.sublayers[0].device
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, p, n, d, generator=g).to(dev, self.dtype)
        ids = torch.randint(0, self.cfg.d_vocab, (1, p), generator=g).to(self.device)
        ctx = self._context(x[:, :, 0], ids)
        frozen = [(s, s.frozen) for s in self.sublayers[:2]]
        try:
            for s, _ in frozen:
                s.frozen = None
            ours = self.sublayers[1](self.sublayers[0](x, ctx), ctx)
            head_ours = self.head(x, None) if self.head.frozen is None else None
        finally:
            for s, f in frozen:
                s.frozen = f
        c = ctx.on(dev)
        ref = layer(x, position_embeddings=c.position_embeddings, position_ids=c.position_ids,
                    attention_mask=c.attention_mask, input_ids=c.input_ids, **_no_cache(layer.forward))
        ref = ref[0] if isinstance(ref, tuple) else ref
        errs = [_rel_err(ours, ref)]
        if head_ours is not None:
            errs.append(_rel_err(head_ours, base.norm(base.hc_head(x.to(self.head.device)))))
        err = max(errs)
        tol = tolerance if tolerance is not None else (1e-4 if self.dtype in (torch.float32, torch.float64) else 3e-2)
        if not err <= tol:
            raise UnsupportedModelError(
                f"{type(layer).__name__} does not compute x' = H_res x + H_post^T F(H_pre x) the way the "
                f"adapter assumes (the DeepseekV4DecoderLayer / DeepseekV4HyperHead maths): relative "
                f"difference {err:.2e} > {tol:.0e} between the HF forward and the adapter's split"
            )
        return err

    @contextmanager
    def frozen_mixing(self, source, sublayers=None, head: Optional[bool] = None) -> Iterator["HookedHFMHC"]:
        """Sublayers' H_pre/H_post/H_res from `source` (see `mhc_interp.hooks.freeze`), and -
        when `head` is True, or None with all sublayers frozen and `head.hook_h_pre` cached - the
        hc_head collapse weights too."""
        from ..hooks.freeze import frozen_mixing

        key = "head.hook_h_pre"
        freeze_head = (sublayers is None and key in source) if head is None else bool(head)
        if freeze_head and key not in source:
            raise KeyError(f"cannot freeze the head: the cache lacks {key!r}")
        with frozen_mixing(self, source, sublayers):
            previous = self.head.frozen
            try:
                if freeze_head:
                    self.head.frozen = source[key]
                yield self
            finally:
                self.head.frozen = previous

    # --------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, name_or_path: str, *, device_map: Any = None, tp_plan: Any = None,
                        dtype: Any = None, tokenizer: Any = True, check: bool = True, **hf_kwargs) -> "HookedHFMHC":
        """`AutoModelForCausalLM.from_pretrained(name_or_path, device_map=, tp_plan=, dtype=, ...)`
        wrapped. device_map="auto" (accelerate) shards over the visible GPUs (and offloads to cpu /
        disk past them); tp_plan="auto" uses transformers' tensor-parallel plan (run under torchrun,
        one process per GPU). tokenizer=True loads the checkpoint's tokenizer if there is one."""
        from transformers import AutoModelForCausalLM

        kwargs = dict(hf_kwargs)
        if device_map is not None:
            kwargs["device_map"] = device_map
        if tp_plan is not None:
            kwargs["tp_plan"] = tp_plan
        if dtype is not None:
            kwargs["dtype"] = dtype
        hf = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs).eval()
        tok = None
        if tokenizer is True:
            try:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(name_or_path, **{k: v for k, v in hf_kwargs.items()
                                                                   if k in ("revision", "cache_dir", "local_files_only", "token")})
            except Exception:  # a checkpoint without a tokenizer: the model takes token ids
                tok = None
        elif tokenizer not in (None, False):
            tok = tokenizer
        return cls(hf, tok, check=check)

    def summary(self) -> str:
        c = self.cfg
        n_params = sum(p.numel() for p in self.hf_model.parameters())
        return (f"HookedHFMHC({type(self.hf_model).__name__}) {c.model_type} | {c.n_layers} layers x 2 "
                f"sublayers | d_model {c.d_model} | {c.n_streams} streams | vocab {c.d_vocab} | hash-MoE "
                f"layers {list(c.hash_layers)} | {n_params / 1e6:.2f}M params | {len(self.hook_dict)} hook "
                f"points | {self.dtype} on {', '.join(map(str, self.devices))}")


def _rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.float(), b.to(a.device).float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
