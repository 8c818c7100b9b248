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
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from ..config import MHCConfig
from ..hooks.names import check_hook_names, unknown_hook_error
from .block import StreamExpand, TransformerBlock
from .components import LayerNorm
from .sublayer import HyperConnectedSublayer

TokensLike = Union[Tensor, str, Sequence[str], Sequence[int]]


class HookedMHC(HookedRootModule):
    def __init__(self, cfg: MHCConfig, tokenizer: Any = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.embed = nn.Embedding(cfg.d_vocab, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.expand = StreamExpand(cfg)
        self.blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.ln_final = LayerNorm(cfg.d_model, cfg.bias, cfg.layer_norm_eps)
        self.unembed = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.d_vocab, bias=False)
        self.hook_embed = HookPoint()         # [batch, pos, d_model]
        self.hook_pos_embed = HookPoint()     # [batch, pos, d_model]
        self.hook_streams_init = HookPoint()  # [batch, pos, n_streams, d_model]
        self.hook_ln_final = HookPoint()      # [batch, pos, n_streams, d_model]
        self.hook_stream_sum = HookPoint()    # [batch, pos, d_model]
        self.hook_logits = HookPoint()        # [batch, pos, d_vocab]
        self._init_weights()
        self.setup()

    # ---------------------------------------------------------------------------------- init
    def _init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02) for linears and embeddings, N(0, 0.02/sqrt(2L)) for c_proj."""
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
    def sublayers(self) -> List[HyperConnectedSublayer]:
        """The 2 * n_layers hyper-connected sublayers in forward order (attn, mlp, attn, ...)."""
        return [s for block in self.blocks for s in (block.attn, block.mlp)]

    @property
    def sublayer_names(self) -> List[str]:
        return [s.name for s in self.sublayers]

    @property
    def W_U(self) -> Tensor:  # [d_model, d_vocab]
        return (self.embed.weight if self.unembed is None else self.unembed.weight).T

    # ---------------------------------------------------------------------------------- input
    def to_tokens(self, text: Union[str, Sequence[str]]) -> Tensor:
        """Tokenize text with the model's tokenizer -> [batch, pos] long tensor."""
        if self.tokenizer is None:
            raise ValueError(
                "this model has no tokenizer (none was found with the checkpoint, and the GPT-2 "
                "tokenizer is not available offline); pass token ids instead of text"
            )
        texts = [text] if isinstance(text, str) else list(text)
        ids = [self.tokenizer.encode(t) for t in texts]
        if len({len(i) for i in ids}) != 1:
            raise ValueError("texts tokenize to different lengths; tokenize and pad them yourself")
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def _check_tokens(self, tokens: TokensLike) -> Tensor:
        if isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], str)):
            tokens = self.to_tokens(tokens)
        if not isinstance(tokens, Tensor):
            tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
        if tokens.ndim == 1:
            tokens = tokens.unsqueeze(0)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.cfg.n_ctx:
            raise ValueError(
                f"sequence length {tokens.shape[1]} is longer than the model's context "
                f"n_ctx={self.cfg.n_ctx}"
            )
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.d_vocab):
            raise ValueError(
                f"token ids must lie in [0, {self.cfg.d_vocab}), got range "
                f"[{int(tokens.min())}, {int(tokens.max())}]"
            )
        return tokens.to(self.device, torch.long)

    def _check_sublayer_index(self, index: Optional[int], what: str) -> Optional[int]:
        if index is None:
            return None
        n = self.cfg.n_sublayers
        if not 0 <= index <= n:
            raise ValueError(f"{what}={index} is out of range: the model has {n} sublayers (0..{n})")
        return index

    # -------------------------------------------------------------------------------- forward
    def embed_streams(self, tokens: Tensor) -> Tensor:
        """tokens [batch, pos] -> initial stream state [batch, pos, n_streams, d_model]."""
        b, p = tokens.shape
        tok = self.hook_embed(self.embed(tokens))
        pos = self.hook_pos_embed(self.pos_embed(torch.arange(p, device=tokens.device)).expand(b, p, -1))
        return self.hook_streams_init(self.expand(tok + pos))

    def unembed_streams(self, x: Tensor) -> Tensor:
        """final stream state [batch, pos, n_streams, d_model] -> logits [batch, pos, d_vocab]:
        logits = W_U^T sum_s LN_f(x_s)."""
        normed = self.hook_ln_final(self.ln_final(x))
        summed = self.hook_stream_sum(normed.sum(dim=-2))
        return self.hook_logits(summed @ self.W_U.to(summed.dtype))

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
        start = self._check_sublayer_index(start_at_sublayer, "start_at_sublayer") or 0
        stop = self._check_sublayer_index(stop_at_sublayer, "stop_at_sublayer")
        if start_at_sublayer is None:
            tokens = self._check_tokens(input)
            x = self.embed_streams(tokens)
        else:
            x = input
            expected = (self.cfg.n_streams, self.cfg.d_model)
            if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[2:]) != expected:
                raise ValueError(
                    f"with start_at_sublayer the input must be a stream state [batch, pos, "
                    f"{expected[0]}, {expected[1]}], got {getattr(x, 'shape', type(x))}"
                )
            if x.shape[1] > self.cfg.n_ctx:
                raise ValueError(f"sequence length {x.shape[1]} is longer than n_ctx={self.cfg.n_ctx}")
        sublayers = self.sublayers
        for sub in sublayers[start: stop if stop is not None else len(sublayers)]:
            x = sub(x)
        if stop is not None:
            return x
        if return_type is None:
            self.unembed_streams(x)
            return None
        logits = self.unembed_streams(x)
        if return_type == "logits":
            return logits
        if tokens is None:
            raise ValueError("return_type 'loss' needs the token ids (pass tokens=...)")
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten().to(logits.device))
        if return_type == "loss":
            return loss
        if return_type == "both":
            return logits, loss
        raise ValueError(f"unknown return_type {return_type!r}; use 'logits', 'loss', 'both' or None")

    # ------------------------------------------------------------------- hook-name validation
    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False) -> None:
        if isinstance(name, str):
            check_hook_names([name], self.hook_dict)
        super().add_hook(name, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def _enable_hook_with_name(self, name: str, hook: Callable, dir) -> None:
        check_hook_names([name], self.hook_dict)
        super()._enable_hook_with_name(name, hook, dir)

    def get_caching_hooks(self, names_filter=None, *args, **kwargs):
        if isinstance(names_filter, str):
            check_hook_names([names_filter], self.hook_dict)
        elif isinstance(names_filter, (list, tuple)):
            check_hook_names(names_filter, self.hook_dict)
            names_filter = list(names_filter)
        return super().get_caching_hooks(names_filter, *args, **kwargs)

    def run_with_cache(self, *args, **kwargs):
        """TransformerLens `run_with_cache`, returning an `MHCCache` (a dict with per-stream
        addressing: `cache.stream(name, s)`); unknown names in `names_filter` raise."""
        from ..hooks.cache import MHCCache

        if kwargs.get("pos_slice") is not None:
            raise ValueError(
                "pos_slice is not supported: TransformerLens slices axis -2, which is the stream "
                "axis of [batch, pos, n_streams, d_model] hooks; slice positions yourself"
            )
        out, cache = super().run_with_cache(*args, **kwargs)
        return out, MHCCache(cache, self)

    def hook_point(self, name: str) -> HookPoint:
        try:
            return self.hook_dict[name]
        except KeyError:
            raise unknown_hook_error(name, self.hook_dict) from None

    # ---------------------------------------------------------------- stream-level conveniences
    def stream_hook(self, name: str, stream: Union[int, Sequence[int]], value: Any):
        """(name, hook) that replaces stream(s) `stream` of a stream-valued hook; see
        `mhc_interp.hooks.streams.stream_hook`."""
        from ..hooks.streams import stream_hook

        return stream_hook(self, name, stream, value)

    @contextmanager
    def frozen_mixing(self, source, sublayers=None) -> Iterator["HookedMHC"]:
        """Run with H_pre/H_post/H_res taken from `source` (a cache) instead of computed; see
        `mhc_interp.hooks.freeze.frozen_mixing`."""
        from ..hooks.freeze import frozen_mixing

        with frozen_mixing(self, source, sublayers):
            yield self

    # --------------------------------------------------------------------------- loading/saving
    @classmethod
    def from_pretrained(cls, name_or_path: str, device: Union[str, torch.device, None] = None,
                        dtype: Optional[torch.dtype] = None, **kwargs) -> "HookedMHC":
        """Load a nanoGPT-format mHC `.pt`, a folder (our format or the hub layout), or a hub id."""
        from ..loading import load_pretrained

        return load_pretrained(cls, name_or_path, device=device, dtype=dtype, **kwargs)

    def save_pretrained(self, path) -> None:
        from ..loading import save_pretrained

        save_pretrained(self, path)

    def summary(self) -> str:
        c = self.cfg
        n_params = sum(p.numel() for p in self.parameters())
        return (
            f"HookedMHC {c.hyper_conn_type} | {c.n_layers} layers x 2 sublayers | d_model {c.d_model} | "
            f"{c.n_heads} heads | {c.n_streams} streams | n_ctx {c.n_ctx} | vocab {c.d_vocab} | "
            f"{n_params / 1e6:.2f}M params | {len(self.hook_dict)} hook points | "
            f"{self.dtype} on {self.device}"
        )
