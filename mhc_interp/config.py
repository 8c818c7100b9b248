"""The one configuration object of a hyper-connected GPT (`MHCConfig`).

Field names follow TransformerLens (`n_layers`, `d_model`, `n_ctx`, `d_vocab`); the public mHC
training code (a nanoGPT fork) calls the same things `n_layer`, `n_embd`, `block_size`,
`vocab_size`, `hyper_conn_n`. `from_nanogpt_args` / `to_nanogpt_args` translate between the two.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

HYPER_CONN_TYPES = ("none", "hc", "mhc", "mhc_lite", "mhc_lite_lss")
DEFAULT_LSS_INIT = 0.6   # the public code's expand_lss_init for mhc_lite_lss
PUBLIC_SINKHORN_ITERS = 20   # the public code's Sinkhorn iterations (not in its model_args)
# model_args keys understood besides the required shapes: the public code's GPTConfig fields, and
# sinkhorn_iters (forks that vary it; written only when it differs from PUBLIC_SINKHORN_ITERS)
NANOGPT_OPTIONAL_ARGS = ("hyper_conn_type", "hyper_conn_n", "bias", "dropout", "expand_lss_init", "sinkhorn_iters")


class ConfigError(ValueError):
    """A configuration that cannot describe a model (unknown variant, inconsistent shapes)."""


@dataclass
class MHCConfig:
    n_layers: int = 12
    n_heads: int = 12
    d_model: int = 768
    n_ctx: int = 1024
    d_vocab: int = 50304
    n_streams: int = 4
    hyper_conn_type: str = "mhc"
    bias: bool = True
    lss_init: Optional[float] = None  # learned-stream-scaling init; None = copies (mhc_lite_lss: 0.6)
    sinkhorn_iters: int = PUBLIC_SINKHORN_ITERS
    layer_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    attn_impl: str = "auto"  # "auto": fused SDPA unless a pattern/score hook is attached; "eager"
    tokenizer_name: Optional[str] = None  # e.g. "gpt2"

    def __post_init__(self) -> None:
        if self.hyper_conn_type not in HYPER_CONN_TYPES:
            raise ConfigError(
                f"unknown hyper_conn_type {self.hyper_conn_type!r}; "
                f"known types: {', '.join(HYPER_CONN_TYPES)}"
            )
        if self.hyper_conn_type == "mhc_lite_lss" and self.lss_init is None:
            self.lss_init = DEFAULT_LSS_INIT     # as from_nanogpt_args: the variant *is* the scaling
        if self.hyper_conn_type == "none" and self.n_streams != 1:
            raise ConfigError(
                f"hyper_conn_type 'none' is a plain residual and needs n_streams=1, got {self.n_streams}"
            )
        if self.n_streams < 1:
            raise ConfigError(f"n_streams must be >= 1, got {self.n_streams}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.attn_impl not in ("auto", "eager"):
            raise ConfigError(f"attn_impl must be 'auto' or 'eager', got {self.attn_impl!r}")

    # derived sizes --------------------------------------------------------------------------
    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_mlp(self) -> int:
        return 4 * self.d_model

    @property
    def n_sublayers(self) -> int:
        return 2 * self.n_layers

    # (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MHCConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown MHCConfig fields: {unknown}")
        return cls(**d)

    @classmethod
    def from_nanogpt_args(cls, args: dict[str, Any]) -> "MHCConfig":
        """Build from the `model_args` dict of the public mHC code (nanoGPT `GPTConfig`)."""
        required = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
        missing = [k for k in required if k not in args]
        if missing:
            raise ConfigError(f"model_args lacks {missing}; got keys {sorted(args)}")
        unknown = sorted(set(args) - set(required) - set(NANOGPT_OPTIONAL_ARGS))
        if unknown:
            warnings.warn(f"model_args keys {unknown} are not part of the public mHC code's GPTConfig and are "
                          f"ignored: if they change the model's maths (a fork), its outputs will differ",
                          stacklevel=2)
        hc_type = args.get("hyper_conn_type", "none")
        lss_init = args.get("expand_lss_init")
        if hc_type == "mhc_lite_lss" and lss_init is None:
            lss_init = DEFAULT_LSS_INIT
        return cls(
            n_layers=int(args["n_layer"]),
            n_heads=int(args["n_head"]),
            d_model=int(args["n_embd"]),
            n_ctx=int(args["block_size"]),
            d_vocab=int(args["vocab_size"]),
            # the public code builds 'none' as a plain residual whatever hyper_conn_n says
            n_streams=1 if hc_type == "none" else int(args.get("hyper_conn_n", 1)),
            hyper_conn_type=hc_type,
            bias=bool(args.get("bias", True)),
            lss_init=lss_init if hc_type == "mhc_lite_lss" else None,
            sinkhorn_iters=int(args.get("sinkhorn_iters", PUBLIC_SINKHORN_ITERS)),
        )

    def to_nanogpt_args(self) -> dict[str, Any]:
        return dict(
            n_layer=self.n_layers, n_head=self.n_heads, n_embd=self.d_model, block_size=self.n_ctx,
            bias=self.bias, vocab_size=self.d_vocab, dropout=0.0,
            hyper_conn_type=self.hyper_conn_type, hyper_conn_n=self.n_streams,
            expand_lss_init=self.lss_init,
            **({} if self.sinkhorn_iters == PUBLIC_SINKHORN_ITERS else {"sinkhorn_iters": self.sinkhorn_iters}),
        )
