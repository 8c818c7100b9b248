"""`HookedHFMHC`: a HuggingFace hyper-connection model behind the hook names and semantics of
`HookedMHC`, so every hook, per-stream helper, frozen-mixing run and probe of `mhc_interp` works
on it unchanged. Nothing is copied: the HF model is wrapped in place, and each decoder layer's
parts are called in forward order with hook points between them. What the adapter needs to know
about a model family is a `HyperConnectionSpec` (`spec.py`; DeepSeek-V4's: `deepseek_v4.py`).

    model = HookedHFMHC(hf)                                     # DeepSeek-V4 (the default spec)
    model = HookedHFMHC(hf, spec=MY_FAMILY)                     # another family
    logits, cache = model.run_with_cache(tokens)                # == hf(tokens).logits

Hook points, the semantic differences from `HookedMHC`, resuming token-routed layers and
several-device runs: docs/adapters.md.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ..contract import MixingCoefficients, ModelConfig, repeat_batch
from ..hooks.root import StreamHookedRoot
from ..model.compiled import torch_hooks_attached
from ..model.sublayer import HookedSublayer
from .deepseek_v4 import DEEPSEEK_V4
from .devices import AdapterHookPoint, execution_device, onloaded
from .spec import HyperConnectionSpec, UnsupportedModelError, stream_count, validate_structure

__all__ = ["HookedHFMHC", "HFMHCConfig", "HEAD_HOOKS"]

HEAD_HOOKS = ("head.hook_streams_in", "head.hook_h_pre", "head.hook_read", "head.hook_write")


@dataclass
class HFMHCConfig(ModelConfig):
    """The `HookedMHC`-style view of an HF hyper-connection config (what hooks and probes read)."""

    n_layers: int
    d_model: int
    n_streams: int
    d_vocab: int
    n_ctx: int
    n_heads: int
    d_head: int
    d_mlp: int  # a memory estimate (DeepSeek-V4: expert width x experts per token)
    hc_eps: float = 0.0
    sinkhorn_iters: int = 0
    hash_layers: Tuple[int, ...] = ()  # layers with a branch that routes by token id
    model_type: str = "unknown"
    hyper_conn_type: str = "mhc"
    attn_impl: str = "eager"
    tokenizer_name: Optional[str] = None


def _config_from(
    hf_model: nn.Module, base: nn.Module, lm_head: nn.Module, spec: HyperConnectionSpec
) -> HFMHCConfig:
    config = getattr(hf_model, "config", None)
    layers = spec.part(base, "layers")
    d = int(spec.part(base, "embed").weight.shape[-1])
    n_heads = int(getattr(config, "num_attention_heads", 1) or 1)
    token_routed = [
        i
        for i, layer in enumerate(layers)
        if any(spec.routes_by_token(getattr(layer, branch)) for _, _, branch in spec.layout.values())
    ]
    fields = dict(
        n_layers=len(layers),
        d_model=d,
        n_streams=stream_count(base, spec),
        d_vocab=int(lm_head.weight.shape[0]),
        n_ctx=int(getattr(config, "max_position_embeddings", 0) or 1 << 20),
        n_heads=n_heads,
        d_head=int(getattr(config, "head_dim", 0) or d // n_heads),
        d_mlp=4 * d,
        hash_layers=tuple(token_routed),
        model_type=str(getattr(config, "model_type", spec.name)),
        attn_impl=str(getattr(config, "_attn_implementation", None) or "eager"),
        tokenizer_name=getattr(config, "_name_or_path", None) or None,
    )
    return HFMHCConfig(**dict(fields, **spec.describe(hf_model, base)))


def _bypassed_modules(
    hf_model: nn.Module, base: nn.Module, spec: HyperConnectionSpec
) -> List[Tuple[str, nn.Module]]:
    """(name, module) of the HF modules whose forward the adapter never calls: it recomputes the
    hyper-connection modules (to expose and freeze H_pre/H_post/H_res) and runs each decoder
    layer's parts itself, so the HF model, its decoder layers, their hyper-connections and the
    head do not run as modules."""
    names = {id(m): n for n, m in hf_model.named_modules()}
    chosen = [hf_model, base, spec.part(base, "head")]
    for layer in spec.part(base, "layers"):
        chosen += [layer] + [getattr(layer, hc) for hc, _, _ in spec.layout.values()]
    return [(names.get(id(m), type(m).__name__) or "the HF model", m) for m in dict.fromkeys(chosen)]


def _refuse_bypassed_hooks(bypassed: List[Tuple[str, nn.Module]]) -> None:
    """A torch hook on a module the adapter does not run would silently never fire."""
    hooked = [name for name, m in bypassed if torch_hooks_attached(m)]
    if hooked:
        raise RuntimeError(
            f"torch hooks are registered on {hooked[:4]}{' ...' if len(hooked) > 4 else ''}, which the adapter "
            f"does not run as modules (it recomputes the hyper-connections and calls each layer's parts "
            f"itself), so they would never fire; use the adapter's hook points (blocks.{{l}}.attn.hook_h_pre, "
            f"...hook_streams_out, head.hook_h_pre, ...) or hooks on the parts it calls (the branches, "
            f"their norms, the final norm, lm_head)"
        )


def _repeat_to(t: Tensor, batch: int, what: str, name: str) -> Tensor:
    """Frozen / context tensors of batch B serve a run of batch k*B (`repeat_batch`)."""
    if batch % t.shape[0]:
        raise ValueError(
            f"{what} for {name!r} has batch {t.shape[0]}, the run {batch}: the run's batch must be a multiple"
        )
    return repeat_batch(t, batch)


def _moved(obj: Any, device: torch.device) -> Any:
    """Every tensor in a nest of dicts / tuples / lists on `device`."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _moved(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_moved(v, device) for v in obj)
    return obj


class _Context:
    """What the branches need besides the streams: the spec's keyword tensors (positions, masks)
    and the token ids [batch, pos] (or None), built once per run on the main device and copied
    per device on demand."""

    def __init__(self, kwargs: Dict[str, Any], ids: Optional[Tensor], device: torch.device):
        self.kwargs, self.ids, self.device = kwargs, ids, device
        self._on: Dict[torch.device, "_Context"] = {}

    def on(self, device: torch.device) -> "_Context":
        if device == self.device:
            return self
        if device not in self._on:
            self._on[device] = _Context(_moved(self.kwargs, device), _moved(self.ids, device), device)
        return self._on[device]


# ------------------------------------------------------------------------------ sublayers
class HFHyperConnectedSublayer(HookedSublayer):
    """One hyper-connected sublayer of an HF decoder layer, driven with HookedMHC's hook points.

    The HF modules are referenced, not registered (so they are not walked twice and their weights
    live only under `HookedHFMHC.hf_model`): `self.hf.hc`, `self.hf.norm`, `self.hf.branch`."""

    hook_point_class = AdapterHookPoint

    def __init__(self, layer: nn.Module, kind: str, index: int, spec: HyperConnectionSpec):
        super().__init__()
        hc_name, norm_name, branch_name = spec.layout[kind]
        self.kind, self.index, self.spec = kind, index, spec
        self.hf = SimpleNamespace(
            layer=layer,
            hc=getattr(layer, hc_name),
            norm=getattr(layer, norm_name),
            branch=getattr(layer, branch_name),
        )
        self.needs_input_ids = spec.routes_by_token(self.hf.branch)
        self.device: Optional[torch.device] = None  # execution device, set by the adapter

    def coefficients(self, x: Tensor) -> MixingCoefficients:
        """(H_pre, H_post, H_res [target, source]) for state x: the spec's, or the frozen ones (a
        frozen cache of batch B serves a run of batch k*B)."""
        if self.frozen is None:
            with onloaded(self.hf.hc):
                return MixingCoefficients(*self.spec.coefficients(self.hf.hc, x))
        return self.frozen.fit(x, self.name)

    def forward(self, x: Tensor, ctx: _Context) -> Tensor:
        """x' = H_res x + H_post^T F(H_pre x): x [batch, pos, n, d] -> [batch, pos, n, d]."""
        x = x.to(self.device)  # (None: where it is)
        ctx = ctx.on(x.device)
        x, h_pre, h_post, h_res = self.hooked_coefficients(x)
        read = self.hook_read((h_pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype))
        write = self.hook_write(
            self.spec.branch(self.kind, self.hf.branch, self.hf.norm(read), ctx.kwargs, ctx.ids)
        )
        mixed = self.hook_res_mix(torch.matmul(h_res.to(x.dtype), x))
        return self.hook_streams_out(h_post.to(x.dtype).unsqueeze(-1) * write.unsqueeze(-2) + mixed)


class HFHead(nn.Module):
    """The final readout as a read-only sublayer: w = head weights (or frozen), read = sum_s w_s
    x_s, write = final norm(read); logits = lm_head(write)."""

    def __init__(self, base: nn.Module, lm_head: nn.Module, spec: HyperConnectionSpec):
        super().__init__()
        self.hf = SimpleNamespace(
            head=spec.part(base, "head"), norm=spec.part(base, "final_norm"), lm_head=lm_head
        )
        self.weights_of = spec.head_weights
        self.frozen: Optional[Tensor] = None
        self.device: Optional[torch.device] = None
        self.hook_streams_in = AdapterHookPoint()  # [batch, pos, n_streams, d_model]
        self.hook_h_pre = AdapterHookPoint()  # [batch, pos, n_streams]
        self.hook_read = AdapterHookPoint()  # [batch, pos, d_model]
        self.hook_write = AdapterHookPoint()  # [batch, pos, d_model]

    def weights(self, x: Tensor, weights: Optional[Tensor] = None) -> Tensor:
        """Collapse weights [b, p, n] for the final state x: `weights`, else the frozen ones, else
        computed from x; given ones of batch B serve a run of batch k*B."""
        weights = self.frozen if weights is None else weights
        if weights is None:
            with onloaded(self.hf.head):
                return self.weights_of(self.hf.head, x)
        w = _repeat_to(weights.to(x.device), x.shape[0], "head weights", "head")
        if w.shape[:2] != x.shape[:2]:
            raise ValueError(f"head weights {tuple(weights.shape)} do not fit the state {tuple(x.shape)}")
        return w

    def forward(self, x: Tensor, weights: Optional[Tensor] = None) -> Tensor:
        """final state [b, p, n, d] -> normed read [b, p, d] (before lm_head)."""
        x = x.to(self.device)  # (None: where it is)
        x = self.hook_streams_in(x)
        w = self.hook_h_pre(self.weights(x, weights))
        read = self.hook_read((w.unsqueeze(-1) * x).sum(dim=2).to(x.dtype))
        return self.hook_write(self.hf.norm(read))


# ---------------------------------------------------------------------------------- adapter
class HookedHFMHC(StreamHookedRoot):
    """HookedMHC's hook API on a HuggingFace hyper-connection model (docs/adapters.md).

    hf_model: a causal LM laid out as `spec` says (default: transformers' DeepseekV4ForCausalLM).
        Wrapped in place.
    check: verify once that the adapter's split of decoder layer 0 and the head reproduces the HF
        modules on a small random input, raising `UnsupportedModelError` if not - a guard against
        a model whose modules look the same but compute something else.
    """

    def __init__(
        self,
        hf_model: nn.Module,
        tokenizer: Any = None,
        *,
        check: bool = True,
        spec: HyperConnectionSpec = DEEPSEEK_V4,
    ):
        super().__init__()
        base, lm_head = validate_structure(hf_model, spec)
        self.spec = spec
        self.cfg = _config_from(hf_model, base, lm_head, spec)
        spec.check_shapes(base, self.cfg.n_streams, self.cfg.d_model)
        self.hf_model = hf_model  # registered: parameters()/eval()/named_modules() see it, nothing is copied
        self.tokenizer = tokenizer
        self._hf = SimpleNamespace(
            lm_head=lm_head,
            embed=spec.part(base, "embed"),
            bypassed=_bypassed_modules(hf_model, base, spec),
        )
        self.blocks = nn.ModuleList(  # blocks.{i}.attn / .mlp, the layout's kinds
            nn.ModuleDict({kind: HFHyperConnectedSublayer(layer, kind, i, spec) for kind in spec.layout})
            for i, layer in enumerate(spec.part(base, "layers"))
        )
        self.head = HFHead(base, lm_head, spec)
        self.hook_embed = AdapterHookPoint()  # [batch, pos, d_model]
        self.hook_streams_init = AdapterHookPoint()  # [batch, pos, n_streams, d_model]
        self.hook_logits = AdapterHookPoint()  # [batch, pos, d_vocab]
        self.setup()
        self.refresh_devices()
        if check:
            self.check_against_hf()

    # ------------------------------------------------------------------------------ set-up
    def setup(self) -> None:
        """TransformerLens set-up over the adapter's own modules only (the HF tree is not renamed)."""
        self.mod_dict = {n: m for n, m in self.named_modules() if n and n.split(".")[0] != "hf_model"}
        self.hook_dict = {n: m for n, m in self.mod_dict.items() if isinstance(m, HookPoint)}
        for name, module in self.mod_dict.items():
            module.name = name

    def refresh_devices(self) -> None:
        """Re-read where every part runs (call after moving or re-dispatching the HF model)."""
        self._main_device = main = execution_device(self._hf.embed)
        for sub in self.sublayers:
            sub.device = execution_device(sub.hf.hc, fallback=execution_device(sub.hf.branch, main))
        self.head.device = execution_device(
            self.head.hf.head, fallback=execution_device(self.head.hf.norm, main)
        )
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
        return self._hf.embed.weight.dtype

    @property
    def W_U(self) -> Tensor:  # [d_model, d_vocab]
        return self._hf.lm_head.weight.T

    @property
    def is_multi_device(self) -> bool:
        return len(self.devices) > 1

    # -------------------------------------------------------------------------------- forward
    def _context(self, x: Tensor, ids: Optional[Tensor]) -> _Context:
        """The run's context from its state x [b, p, n, d] (on the main device)."""
        like = x[:, :, 0].to(self.device)  # [b, p, d]
        return _Context(self.spec.context(self.hf_model, like), ids, self.device)

    def _resume_ids(self, x: Tensor, start: int, stop: int, tokens: Optional[Tensor]) -> Optional[Tensor]:
        """Token ids [batch, pos] for a run resumed from state x, from `tokens=` (batch B serves a
        state of batch k*B); None when none are given and no token-routed sublayer lies ahead."""
        if tokens is None:
            routed = [s.name for s in self.sublayers[start:stop] if s.needs_input_ids]
            if routed:
                raise ValueError(
                    f"resuming at sublayer {start} runs {routed}, whose branch routes by token id "
                    f"(hash routing): pass the run's token ids, model(state, "
                    f"start_at_sublayer={start}, tokens=ids)"
                )
            return None
        ids = self._check_tokens(tokens)
        if ids.shape[1] != x.shape[1]:
            raise ValueError(f"tokens= has {ids.shape[1]} positions, the state {x.shape[1]}")
        return _repeat_to(ids, x.shape[0], "tokens=", "the resumed run")

    def forward(
        self,
        input: Any,
        return_type: Optional[str] = "logits",
        *,
        start_at_sublayer: Optional[int] = None,
        stop_at_sublayer: Optional[int] = None,
        tokens: Optional[Tensor] = None,
    ) -> Any:
        """Same contract as `HookedMHC.forward`: tokens [batch, pos] (or text), or with
        `start_at_sublayer=k` the stream state entering sublayer k; `stop_at_sublayer=k` returns
        the state entering sublayer k (on `model.device`). return_type "logits" | "loss" | "both" |
        None. `tokens=`: the token ids of a resumed run (needed by token-routed layers ahead, and
        by the loss)."""
        start, stop = self._check_sublayer_span(start_at_sublayer, stop_at_sublayer)
        _refuse_bypassed_hooks(self._hf.bypassed)
        end = self.cfg.n_sublayers if stop is None else stop
        if start_at_sublayer is None:
            tokens = self._check_tokens(input)
            embeds = self.hook_embed(self._hf.embed(tokens))
            x = self.hook_streams_init(
                embeds.unsqueeze(2).expand(-1, -1, self.cfg.n_streams, -1).contiguous()
            )
        else:
            x = self._check_state(input, self.dtype)
            tokens = self._resume_ids(x, start, end, tokens)
        ctx = self._context(x, tokens)
        for sub in self.sublayers[start:end]:
            x = sub(x, ctx)
        if stop is not None:
            return x.to(self.device)
        return self.readout(x, return_type, tokens)

    def unembed_streams(self, x: Tensor, head_weights: Optional[Tensor] = None) -> Tensor:
        """stream state [batch, pos, n, d] -> logits [batch, pos, d_vocab] (on model.device), the
        way the model reads its final state: the head's collapse (weights computed from `x`, the
        frozen ones, or `head_weights` [batch, pos, n]), final norm, lm_head. Use this for a logit lens."""
        normed = self.head(x, head_weights)
        return self.hook_logits(self._hf.lm_head(normed)).to(self.device)

    @torch.no_grad()
    def stream_contributions(
        self, x: Tensor, dtype: torch.dtype = torch.float32, *, head_weights: Optional[Tensor] = None
    ) -> Tensor:
        """Exact per-stream decomposition of the readout: x [batch, pos, n, d] -> c [batch, pos, n,
        d_vocab] with sum_s c_s = unembed_streams(x), for an RMSNorm final norm (gamma, eps):

            w = head weights (as `unembed_streams` takes them),  r = rsqrt(mean_d (sum_s w_s x_s)^2 + eps)
            c_s = W_U^T (gamma * w_s x_s * r)

        The normaliser r is the one of the collapsed state, shared by all streams (not a per-stream
        LayerNorm as in HookedMHC): c_s is stream s's own term of the sum."""
        norm, lm_head = self.head.hf.norm, self._hf.lm_head
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if eps is None or not hasattr(norm, "weight"):
            raise NotImplementedError(
                f"stream_contributions needs an RMSNorm final norm, got {type(norm).__name__}"
            )
        x = x.to(self.head.device)
        terms = (self.head.weights(x, head_weights).unsqueeze(-1) * x).to(dtype)  # [b, p, n, d]
        r = torch.rsqrt(terms.sum(-2).pow(2).mean(-1, keepdim=True) + eps)  # [b, p, 1]
        with onloaded(norm, lm_head):
            gamma = norm.weight.to(terms.device, dtype)
            W_U = lm_head.weight.to(terms.device, dtype)  # [vocab, d]
            bias = getattr(lm_head, "bias", None)
            bias = None if bias is None else bias.to(terms.device, dtype)
        out = (gamma * terms * r.unsqueeze(-2)) @ W_U.T
        if bias is not None:  # shared evenly
            out = out + bias / x.shape[-2]
        return out.to(self.device)

    # ------------------------------------------------------------------------- self-check
    @torch.no_grad()
    def check_against_hf(self, tolerance: Optional[float] = None) -> float:
        """Run decoder layer 0 and the head both ways (HF forward, adapter split) on a small random
        state; raise UnsupportedModelError if they differ. Returns the relative difference."""
        n, d, p = self.cfg.n_streams, self.cfg.d_model, 4
        attn, mlp = self.sublayers[:2]  # decoder layer 0
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, p, n, d, generator=g).to(attn.device, self.dtype)  # [1, pos, n, d]
        ids = torch.randint(0, self.cfg.d_vocab, (1, p), generator=g).to(self.device)
        ctx = self._context(x, ids)
        frozen = [(s, s.frozen) for s in (attn, mlp, self.head)]
        try:
            for s, _ in frozen:
                s.frozen = None
            ours = mlp(attn(x, ctx), ctx)
            head_ours = self.head(x)
        finally:
            for s, f in frozen:
                s.frozen = f
        c = ctx.on(attn.device)
        ref = self.spec.layer_forward(attn.hf.layer, x, c.kwargs, c.ids)
        head_ref = self.head.hf.norm(self.head.hf.head(x.to(self.head.device)))
        err = max(_rel_err(ours, ref), _rel_err(head_ours, head_ref))
        if tolerance is None:
            tolerance = 1e-4 if self.dtype in (torch.float32, torch.float64) else 3e-2
        if not err <= tolerance:
            raise UnsupportedModelError(
                f"{type(attn.hf.layer).__name__} does not compute x' = H_res x + H_post^T F(H_pre x) "
                f"(and its head sum_s w_s x_s) the way the {self.spec.name} spec assumes: relative difference "
                f"{err:.2e} > {tolerance:.0e} between the HF forward and the adapter's split"
            )
        return err

    @contextmanager
    def frozen_mixing(self, source, sublayers=None, head: Optional[bool] = None) -> Iterator["HookedHFMHC"]:
        """Sublayers' H_pre/H_post/H_res from `source` (see `mhc_interp.hooks.freeze`), and -
        when `head` is True, or None with all sublayers frozen and `head.hook_h_pre` cached - the
        head's collapse weights too, so callers need not name the head."""
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
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device_map: Any = None,
        tp_plan: Any = None,
        dtype: Any = None,
        tokenizer: Any = True,
        check: bool = True,
        spec: HyperConnectionSpec = DEEPSEEK_V4,
        **hf_kwargs,
    ) -> "HookedHFMHC":
        """`AutoModelForCausalLM.from_pretrained(name_or_path, device_map=, tp_plan=, dtype=, ...)`
        wrapped. device_map="auto" (accelerate) shards over the visible GPUs (and offloads to cpu /
        disk past them); tp_plan="auto" uses transformers' tensor-parallel plan (run under torchrun,
        one process per GPU). tokenizer=True loads the checkpoint's tokenizer if there is one."""
        from transformers import AutoModelForCausalLM

        given = dict(device_map=device_map, tp_plan=tp_plan, dtype=dtype)
        kwargs = dict(hf_kwargs, **{k: v for k, v in given.items() if v is not None})
        hf = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs).eval()
        tok = None if tokenizer in (None, False, True) else tokenizer
        if tokenizer is True:
            try:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(
                    name_or_path,
                    **{
                        k: v
                        for k, v in hf_kwargs.items()
                        if k in ("revision", "cache_dir", "local_files_only", "token")
                    },
                )
            except Exception:  # a checkpoint without a tokenizer: the model takes token ids
                tok = None
        return cls(hf, tok, check=check, spec=spec)

    def summary(self) -> str:
        c = self.cfg
        n_params = sum(p.numel() for p in self.hf_model.parameters())
        return (
            f"HookedHFMHC({type(self.hf_model).__name__}) {c.model_type} | {c.n_layers} layers x 2 "
            f"sublayers | d_model {c.d_model} | {c.n_streams} streams | vocab {c.d_vocab} | token-routed "
            f"layers {list(c.hash_layers)} | {n_params / 1e6:.2f}M params | {len(self.hook_dict)} hook "
            f"points | {self.dtype} on {', '.join(map(str, self.devices))}"
        )


def _rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.float(), b.to(a.device).float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
