"""`HookedMHC`: a GPT-2-style decoder with `n` residual streams, as a TransformerLens
`HookedRootModule` (so `run_with_cache`, `run_with_hooks`, `hooks()` and backward hooks work,
and `nnsight.NNsight(model)` can trace it).

    tokens [batch, pos]
      -> embed + pos_embed                       [batch, pos, d_model]
      -> expand to streams                       [batch, pos, n_streams, d_model]
      -> 2 * n_layers hyper-connected sublayers  x' = H_res x + H_post^T F(H_pre x)
      -> LayerNorm per stream, sum over streams  [batch, pos, d_model]
      -> unembed (tied to the embedding)         [batch, pos, d_vocab]   (every position)
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformer_lens.hook_points import HookPoint

from .. import loading
from ..config import MHCConfig
from ..hooks.root import StreamHookedRoot, TokensLike
from .block import StreamExpand, TransformerBlock


class HookedMHC(StreamHookedRoot):
    def __init__(self, cfg: MHCConfig, tokenizer: Any = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        # uninitialised here, drawn by _init_weights (nn.Embedding's own init would draw them twice)
        self.embed = nn.Embedding.from_pretrained(torch.empty(cfg.d_vocab, cfg.d_model), freeze=False)
        self.pos_embed = nn.Embedding.from_pretrained(torch.empty(cfg.n_ctx, cfg.d_model), freeze=False)
        self.expand = StreamExpand(cfg)
        self.blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.ln_final = nn.LayerNorm(cfg.d_model, cfg.layer_norm_eps, bias=cfg.bias)  # as the sublayers'
        self.unembed = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.d_vocab, bias=False)
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        self.hook_pos_embed = HookPoint()  # [batch, pos, d_model]
        self.hook_streams_init = HookPoint()  # [batch, pos, n_streams, d_model]
        self.hook_ln_final = HookPoint()  # [batch, pos, n_streams, d_model]
        self.hook_stream_sum = HookPoint()  # [batch, pos, d_model]
        self.hook_logits = HookPoint()  # [batch, pos, d_vocab]
        self._init_weights()
        self.setup()

    # ---------------------------------------------------------------------------------- init
    def _init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02) for linears and embeddings, N(0, 0.02/sqrt(2L)) for c_proj. None on
        the meta device (the loader's build, whose weights come from a checkpoint: drawing there
        would cost torch's compiler import, ~1 s, for nothing)."""
        if self.embed.weight.is_meta:
            return
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if name.endswith("c_proj") else 0.02
                nn.init.normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------------------ structure
    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def W_U(self) -> Tensor:  # [d_model, d_vocab]
        return (self.embed.weight if self.unembed is None else self.unembed.weight).T

    # -------------------------------------------------------------------------------- forward
    def embed_streams(self, tokens: Tensor) -> Tensor:
        """tokens [batch, pos] -> initial stream state [batch, pos, n_streams, d_model]."""
        tok = self.hook_embed(self.embed(tokens))
        # looked up per (batch, pos): a real [batch, pos, d_model] tensor (not an expanded view), so
        # an in-place hook edit of one row stays in it, and nnsight sees a batch axis to split
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        pos = self.hook_pos_embed(self.pos_embed(positions))
        return self.hook_streams_init(self.expand(tok + pos))

    def unembed_streams(self, x: Tensor) -> Tensor:
        """final stream state [batch, pos, n_streams, d_model] -> logits [batch, pos, d_vocab]:
        logits = W_U^T sum_s LN_f(x_s)."""
        normed = self.hook_ln_final(self.ln_final(x))
        summed = self.hook_stream_sum(normed.sum(dim=-2))
        return self.hook_logits(summed @ self.W_U.to(summed.dtype))

    def stream_contributions(self, x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """The readout split by stream, c_s = W_U^T LN_f(x_s): final state [batch, pos, n_streams,
        d_model] -> [batch, pos, n_streams, d_vocab] in `dtype`; sum_s c_s = unembed_streams(x) up
        to rounding (the model sums before W_U, this after). No hook fires."""
        ln = self.ln_final
        bias = None if ln.bias is None else ln.bias.to(dtype)
        normed = F.layer_norm(x.to(self.device, dtype), ln.weight.shape, ln.weight.to(dtype), bias, ln.eps)
        return normed @ self.W_U.to(dtype)

    def forward(
        self,
        input: TokensLike,
        return_type: Optional[str] = "logits",
        *,
        start_at_sublayer: Optional[int] = None,
        stop_at_sublayer: Optional[int] = None,
        tokens: Optional[Tensor] = None,
    ) -> Any:
        """Run the model.

        input: tokens [batch, pos] (or text), or - with `start_at_sublayer=k` - the stream state
            [batch, pos, n_streams, d_model] entering sublayer k (0 = blocks.0.attn), so runs can
            resume from a cached clean state instead of recomputing the prefix.
        stop_at_sublayer=k: return the stream state entering sublayer k instead of logits.
        return_type: "logits" [batch, pos, d_vocab] (every position), "loss" (mean next-token
            cross-entropy, needs token ids: `tokens=` when starting mid-way), "both", or None.
        """
        start, stop = self._check_sublayer_span(start_at_sublayer, stop_at_sublayer)
        if start_at_sublayer is None:
            tokens = self._check_tokens(input)
            x = self.embed_streams(tokens)
        else:
            x = self._check_state(input, self.dtype)
            if tokens is not None:
                tokens = self._check_tokens(tokens)
                if tokens.shape != x.shape[:2]:
                    raise ValueError(
                        f"tokens= {tuple(tokens.shape)} do not match the resumed state's "
                        f"[batch, pos] {tuple(x.shape[:2])}"
                    )
        for sub in self.sublayers[start:stop]:
            x = sub(x)
        return x if stop is not None else self.readout(x, return_type, tokens)

    # ------------------------------------------------------------------------------ fast paths
    def compile(self, enable: bool = True) -> "HookedMHC":
        """Hook-safe `torch.compile` (docs/models.md "Compiled fast path"): each sublayer's coefficient maths
        and `apply` run as compiled graphs, one per variant and sublayer type, between the boundary
        hook points; a sublayer whose interior is observed runs eagerly, so no hook is skipped.
        Outputs agree with eager to float rounding; the first forward of a shape or dtype compiles.
        A second shape re-traces with dynamic sizes: for a few fixed shapes keep static graphs with
        `torch._dynamo.config.patch(automatic_dynamic_shapes=False)`. `enable=False`: eager again."""
        for sub in self.sublayers:
            sub.compiled = enable
        return self.compile_mixers(enable)

    def compile_mixers(self, enable: bool = True) -> "HookedMHC":
        """Compile only the coefficient maths (see `compile`); `apply` stays eager."""
        for sub in self.sublayers:
            sub.mixer.compiled = enable
        return self

    # --------------------------------------------------------------------------- loading/saving
    # HookedMHC.from_pretrained(name_or_path, device=None, dtype=None, ...): a nanoGPT-format mHC
    # `.pt`, a folder (our format or the hub layout) or a hub id; model.save_pretrained(path)
    from_pretrained = classmethod(loading.load_pretrained)
    save_pretrained = loading.save_pretrained

    def summary(self) -> str:
        c = self.cfg
        n_params = sum(p.numel() for p in self.parameters())
        return (
            f"HookedMHC {c.hyper_conn_type} | {c.n_layers} layers x 2 sublayers | d_model {c.d_model} | "
            f"{c.n_heads} heads | {c.n_streams} streams | n_ctx {c.n_ctx} | vocab {c.d_vocab} | "
            f"{n_params / 1e6:.2f}M params | {len(self.hook_dict)} hook points | "
            f"{self.dtype} on {self.device}"
        )
