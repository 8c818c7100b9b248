"""The one configuration object of a hyper-connected GPT (`MHCConfig`).

Field names follow TransformerLens (`n_layers`, `d_model`, `n_ctx`, `d_vocab`); the public mHC
training code (a nanoGPT fork) calls the same things `n_layer`, `n_embd`, `block_size`,
`vocab_size`, `hyper_conn_n`. `from_nanogpt_args` / `to_nanogpt_args` translate between the two.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import Any, Optional

from .contract import ModelConfig

PUBLIC_SINKHORN_ITERS = 20  # the public code's Sinkhorn iterations (not in its model_args)
# the public code's model_args names of the shapes (all required) -> ours
NANOGPT_SIZES = {
    "n_layer": "n_layers",
    "n_head": "n_heads",
    "n_embd": "d_model",
    "block_size": "n_ctx",
    "vocab_size": "d_vocab",
}
# model_args keys understood besides the required shapes: the public code's GPTConfig fields, and
# sinkhorn_iters (forks that vary it; written only when it differs from PUBLIC_SINKHORN_ITERS)
NANOGPT_OPTIONAL_ARGS = (
    "hyper_conn_type",
    "hyper_conn_n",
    "bias",
    "dropout",
    "expand_lss_init",
    "sinkhorn_iters",
)
MAX_SINKHORN_ITERS = 1000  # every forward runs them per sublayer: 10**9 would hang, not fail
MAX_STREAMS = 16  # for every variant; a mixer class may set a lower `max_streams`


class ConfigError(ValueError):
    """A configuration that cannot describe a model (unknown variant, inconsistent shapes)."""


@dataclass
class MHCConfig(ModelConfig):
    n_layers: int = 12
    n_heads: int = 12
    d_model: int = 768
    n_ctx: int = 1024
    d_vocab: int = 50304
    n_streams: int = 4
    hyper_conn_type: str = "mhc"
    bias: bool = True
    lss_init: Optional[float] = None  # learned-stream-scaling init; None = copies (or the mixer's default)
    sinkhorn_iters: int = PUBLIC_SINKHORN_ITERS
    layer_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    attn_impl: str = "auto"  # "auto": fused SDPA unless a pattern/score hook is attached; "eager"
    tokenizer_name: Optional[str] = None  # e.g. "gpt2"

    def __post_init__(self) -> None:
        """Check every field's type and range, so a hostile or careless config fails here with
        the field's name - not in the allocator, in a division, or by hanging in Sinkhorn."""
        for name in ("n_layers", "n_heads", "d_model", "n_ctx", "d_vocab", "n_streams", "sinkhorn_iters"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _check_float("layer_norm_eps", self.layer_norm_eps, positive=True)
        if self.lss_init is not None:
            _check_float("lss_init", self.lss_init)
        if self.tokenizer_name is not None and not isinstance(self.tokenizer_name, str):
            raise ConfigError(f"tokenizer_name must be a string, got {self.tokenizer_name!r}")
        mixer = mixer_class(self.hyper_conn_type)  # per-variant facts live on the mixer class
        variant = f"hyper_conn_type {self.hyper_conn_type!r} ({mixer.__module__}.{mixer.__qualname__})"
        if self.lss_init is None:
            self.lss_init = mixer.default_lss_init
        if mixer.n_streams_required is not None and self.n_streams != mixer.n_streams_required:
            raise ConfigError(f"{variant} needs n_streams={mixer.n_streams_required}, got {self.n_streams}")
        if self.n_streams > MAX_STREAMS:
            raise ConfigError(f"n_streams={self.n_streams} is more than {MAX_STREAMS} streams")
        if mixer.max_streams is not None and self.n_streams > mixer.max_streams:
            raise ConfigError(f"{variant} takes at most n_streams={mixer.max_streams}, got {self.n_streams}")
        if self.sinkhorn_iters > MAX_SINKHORN_ITERS:
            raise ConfigError(
                f"sinkhorn_iters={self.sinkhorn_iters} is more than {MAX_SINKHORN_ITERS} "
                f"(the public code uses {PUBLIC_SINKHORN_ITERS})"
            )
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.attn_impl not in ("auto", "eager"):
            raise ConfigError(f"attn_impl must be 'auto' or 'eager', got {self.attn_impl!r}")

    # derived sizes (n_sublayers: ModelConfig's) ---------------------------------------------
    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_mlp(self) -> int:
        return 4 * self.d_model

    # (de)serialisation (to_dict: ModelConfig's) ------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MHCConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object of fields, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown MHCConfig fields: {unknown}")
        return cls(**d)

    @classmethod
    def from_nanogpt_args(cls, args: dict[str, Any]) -> "MHCConfig":
        """Build from the `model_args` dict of the public mHC code (nanoGPT `GPTConfig`)."""
        if not isinstance(args, dict):
            raise ConfigError(f"model_args must be a dict, got {type(args).__name__}")
        missing = [k for k in NANOGPT_SIZES if k not in args]
        if missing:
            raise ConfigError(f"model_args lacks {missing}; got keys {sorted(args)}")
        unknown = sorted(set(args) - set(NANOGPT_SIZES) - set(NANOGPT_OPTIONAL_ARGS))
        if unknown:
            warnings.warn(
                f"model_args keys {unknown} are not part of the public mHC code's GPTConfig and are "
                f"ignored: if they change the model's maths (a fork), its outputs will differ",
                stacklevel=2,
            )
        hc_type = args.get("hyper_conn_type", "none")
        mixer = mixer_class(hc_type)
        n_streams = _check_int("hyper_conn_n", args.get("hyper_conn_n", 1), minimum=1)
        return cls(
            **{ours: _check_int(theirs, args[theirs], minimum=1) for theirs, ours in NANOGPT_SIZES.items()},
            # the public code builds 'none' as a plain residual whatever hyper_conn_n says
            n_streams=mixer.n_streams_required or n_streams,
            hyper_conn_type=hc_type,
            bias=args.get("bias", True),
            # the public code reads expand_lss_init only for a variant that is stream scaling
            lss_init=None if mixer.default_lss_init is None else args.get("expand_lss_init"),
            sinkhorn_iters=_check_int(
                "sinkhorn_iters", args.get("sinkhorn_iters", PUBLIC_SINKHORN_ITERS), minimum=1
            ),
        )

    def to_nanogpt_args(self) -> dict[str, Any]:
        return dict(
            {theirs: getattr(self, ours) for theirs, ours in NANOGPT_SIZES.items()},
            bias=self.bias,
            dropout=0.0,
            hyper_conn_type=self.hyper_conn_type,
            hyper_conn_n=self.n_streams,
            expand_lss_init=self.lss_init,
            **(
                {}
                if self.sinkhorn_iters == PUBLIC_SINKHORN_ITERS
                else {"sinkhorn_iters": self.sinkhorn_iters}
            ),
        )


def mixer_class(hyper_conn_type: Any) -> type:
    """The mixer class registered under `hyper_conn_type` (`mhc_interp.model.mixers.MIXERS`, the one
    list of variants, so a mixer added with `register_mixer` is a valid type); a ConfigError naming
    the registered types otherwise."""
    # imported here, not at the top: the mixers import this module (MHCConfig), and the registry
    # needs torch, which `import mhc_interp.config` does not
    from .model.mixers import MIXERS

    if isinstance(hyper_conn_type, str) and hyper_conn_type in MIXERS:
        return MIXERS[hyper_conn_type]
    raise ConfigError(
        f"unknown hyper_conn_type {hyper_conn_type!r}; known types: {', '.join(sorted(MIXERS))}"
    )


def _check_int(name: str, value: Any, minimum: int) -> int:
    """`value` if it is an integer >= minimum (a bool or a string is not: JSON's "12" or true are
    mistakes, not sizes); a ConfigError naming the field otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_float(name: str, value: Any, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")
    return value
