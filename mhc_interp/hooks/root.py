"""`StreamHookedRoot`: what every multi-stream hooked model shares on top of TransformerLens'
`HookedRootModule` - hook-name validation with suggestions, a stream-aware `run_with_cache`,
per-stream addressing, frozen mixing, and the checks on token / stream-state input.

A subclass implements the rest of `contract.MultiStreamModel` (`cfg`, `device`, `dtype`,
`tokenizer`, `W_U`, `forward`, `unembed_streams`, `stream_contributions`, `summary`), has `blocks`
(each with `attn` and `mlp` sublayers that have a `name` and a `frozen` slot) and calls `setup()`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.nn import functional as F
from transformer_lens.HookedRootModule import (
    HookedRootModule,  # not via transformer_lens/__init__ (see deferred_init)
)

from .cache import MHCCache
from .freeze import frozen_mixing
from .names import CheckedHookNames
from .streams import stream_hook

TokensLike = Union[Tensor, str, Sequence[str], Sequence[int]]


class StreamHookedRoot(CheckedHookNames, HookedRootModule):
    # ------------------------------------------------------------------------------ structure
    @property
    def sublayers(self) -> list:
        """The 2 * n_layers hyper-connected sublayers in forward order (attn, mlp, attn, ...),
        from `self.blocks` (each with `.attn` and `.mlp`)."""
        return [s for block in self.blocks for s in (block.attn, block.mlp)]

    @property
    def sublayer_names(self) -> List[str]:
        return [s.name for s in self.sublayers]

    # ----------------------------------------------------------------------------- input checks
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
        if isinstance(tokens, str) or (
            isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], str)
        ):
            tokens = self.to_tokens(tokens)
        if not isinstance(tokens, Tensor):
            tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
        if tokens.ndim == 1:
            tokens = tokens.unsqueeze(0)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] == 0:
            raise ValueError(f"tokens {tuple(tokens.shape)} have no positions")
        if tokens.shape[1] > self.cfg.n_ctx:
            raise ValueError(
                f"sequence length {tokens.shape[1]} is longer than the model's context n_ctx={self.cfg.n_ctx}"
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
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"{what} must be an int sublayer index, got {index!r}")
        n = self.cfg.n_sublayers
        if not 0 <= index <= n:
            raise ValueError(f"{what}={index} is out of range: the model has {n} sublayers (0..{n})")
        return index

    def _check_sublayer_span(
        self, start_at: Optional[int], stop_at: Optional[int]
    ) -> Tuple[int, Optional[int]]:
        """(first sublayer to run, sublayer to stop before or None) of a forward; start <= stop."""
        start = self._check_sublayer_index(start_at, "start_at_sublayer") or 0
        stop = self._check_sublayer_index(stop_at, "stop_at_sublayer")
        if stop is not None and stop < start:
            raise ValueError(
                f"stop_at_sublayer={stop} comes before start_at_sublayer={start}: "
                f"the run would return its input state unchanged"
            )
        return start, stop

    def _check_state(self, x: Any, dtype: torch.dtype) -> Tensor:
        """A stream state [batch, pos, n_streams, d_model] to resume from, as a copy in `dtype`
        (the dtype a run from tokens has there): hooks may edit it in place, and the caller's
        tensor (often a cached clean state) must not change."""
        expected = (self.cfg.n_streams, self.cfg.d_model)
        if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[2:]) != expected:
            raise ValueError(
                f"with start_at_sublayer the input must be a stream state [batch, pos, "
                f"{expected[0]}, {expected[1]}], got {getattr(x, 'shape', type(x))}"
            )
        if not x.is_floating_point():
            raise TypeError(f"a stream state must be a floating-point tensor, got dtype {x.dtype}")
        if x.shape[1] > self.cfg.n_ctx:
            raise ValueError(f"sequence length {x.shape[1]} is longer than n_ctx={self.cfg.n_ctx}")
        return x.to(dtype=dtype, copy=True)

    # ---------------------------------------------------------------------------------- output
    def readout(self, x: Tensor, return_type: Optional[str], tokens: Optional[Tensor]) -> Any:
        """The final stream state [batch, pos, n, d] through `unembed_streams`, as `return_type`:
        "logits" [batch, pos, d_vocab], "loss" (mean next-token cross-entropy in float32, needs
        `tokens`), "both", or None (the readout runs, for its hooks, and nothing is returned)."""
        if return_type not in ("logits", "loss", "both", None):
            raise ValueError(f"unknown return_type {return_type!r}; use 'logits', 'loss', 'both' or None")
        logits = self.unembed_streams(x)
        if return_type is None:
            return None
        if return_type == "logits":
            return logits
        if tokens is None:
            raise ValueError("return_type 'loss' needs the token ids (pass tokens=...)")
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten().to(logits.device)
        )
        return loss if return_type == "loss" else (logits, loss)

    def run_with_cache(self, *args, **kwargs):
        """TransformerLens `run_with_cache` (names checked, `CheckedHookNames`), returning an
        `MHCCache` (a dict with per-stream addressing: `cache.stream(name, s)`)."""
        if kwargs.get("remove_batch_dim"):
            raise ValueError(
                "remove_batch_dim is not supported: the per-stream addressing of the cache "
                "(cache.stream) indexes axis 2 of [batch, pos, n_streams, d_model]; index [0] yourself"
            )
        out, cache = super().run_with_cache(*args, **kwargs)
        return out, MHCCache(cache, self)

    # ---------------------------------------------------------------- stream-level conveniences
    def stream_hook(self, name: str, stream: Union[int, Sequence[int]], value: Any):
        """(name, hook) that replaces stream(s) `stream` of a stream-valued hook; see
        `mhc_interp.hooks.streams.stream_hook`."""
        return stream_hook(self, name, stream, value)

    @contextmanager
    def frozen_mixing(self, source, sublayers=None) -> Iterator["StreamHookedRoot"]:
        """Run with H_pre/H_post/H_res taken from `source` (a cache) instead of computed; see
        `mhc_interp.hooks.freeze.frozen_mixing`."""
        with frozen_mixing(self, source, sublayers):
            yield self
