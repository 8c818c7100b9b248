"""What probes, hooks and tools may rely on in a multi-stream model: `MultiStreamModel`, implemented
by `HookedMHC` and the HF adapter alike, and `MixingCoefficients`, the (H_pre, H_post, H_res) a
hyper-connected sublayer computes or is frozen to.

    x' = H_res x + H_post^T F(H_pre x)     x [batch, pos, n_streams, d_model], per sublayer

At run time nothing here imports torch or the models: `hooks/` and `model/` both build on this module, and
`isinstance(model, MultiStreamModel)` checks that every member is present (not their signatures).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    ContextManager,
    Dict,
    List,
    Literal,
    Mapping,
    NamedTuple,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Union,
    overload,
    runtime_checkable,
)

if TYPE_CHECKING:
    import torch
    from torch import Tensor
    from transformer_lens.hook_points import HookPoint

    from .hooks.cache import MHCCache
    from .hooks.root import TokensLike


class MixingCoefficients(NamedTuple):
    """A sublayer's coefficients, in the papers' convention. A NamedTuple (not a dataclass) so that
    tools which walk containers - nnsight's per-invoke batching, torch.compile, pytree - see the
    three tensors inside."""

    h_pre: Tensor  # [batch, pos, n_streams]                             read = sum_s h_pre[s] x[s]
    h_post: Tensor  # [batch, pos, n_streams]                             x'[t] += h_post[t] F(read)
    h_res: Tensor  # [batch, pos, n_streams(target), n_streams(source)]  x'[t] += sum_s h_res[t, s] x[s]

    def fit(self, x: Tensor, name: str) -> MixingCoefficients:
        """These (frozen) coefficients for a run on state x [batch, pos, ...]: cached on batch B,
        they serve a run of batch k*B (k replicas stacked along the batch axis, replica-major)."""
        fb, fp = self.h_pre.shape[:2]
        b, p = x.shape[:2]
        if fp != p or b % fb:
            raise ValueError(
                f"frozen mixing for {name!r} was cached on batch {fb} x pos {fp}, but the run "
                f"has batch {b} x pos {p}; the positions must match and the batch be a multiple"
            )
        return MixingCoefficients(*(repeat_batch(t.to(x.device), b) for t in self))


def repeat_batch(t: Tensor, batch: int) -> Tensor:
    """t [B, ...] for a run of batch k*B = `batch` (k replicas stacked along the batch axis,
    replica-major), always a new tensor: hooks may edit it in place, and it must not reach a cache."""
    k = batch // t.shape[0]
    return t.repeat(k, *([1] * (t.ndim - 1))) if k > 1 else t.clone()


class ModelConfig(Protocol):
    """The config fields probes read (`MHCConfig`, the HF adapter's `HFMHCConfig`). A dataclass
    that subclasses it explicitly inherits `n_sublayers` and `to_dict`."""

    n_layers: int
    n_heads: int
    n_streams: int
    d_model: int
    d_vocab: int
    n_ctx: int  # the longest sequence a forward takes
    hyper_conn_type: str  # the mixer variant ("mhc", "hc", ...), a registry key

    @property
    def n_sublayers(self) -> int:
        return 2 * self.n_layers  # attention, MLP, attention, ...

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class Forward(Protocol):
    """`model(...)` / `model.forward(...)`: input tokens [batch, pos] (or text), or with
    `start_at_sublayer=k` the stream state [batch, pos, n_streams, d_model] entering sublayer k
    (`tokens=` [batch, pos]: its ids, for "loss" and token-routed layers). Returns logits
    [batch, pos, d_vocab] ("logits"), the mean next-token cross-entropy ("loss"), both, None, or -
    with `stop_at_sublayer=k` - the state [batch, pos, n_streams, d_model] entering sublayer k
    (k = n_sublayers: the final state)."""

    @overload
    def __call__(
        self,
        input: TokensLike,
        return_type: Literal["logits", "loss"] = ...,
        *,
        start_at_sublayer: Optional[int] = ...,
        stop_at_sublayer: None = ...,
        tokens: Optional[Tensor] = ...,
    ) -> Tensor: ...

    @overload
    def __call__(
        self,
        input: TokensLike,
        return_type: Literal["both"],
        *,
        start_at_sublayer: Optional[int] = ...,
        stop_at_sublayer: None = ...,
        tokens: Optional[Tensor] = ...,
    ) -> Tuple[Tensor, Tensor]: ...

    @overload
    def __call__(
        self,
        input: TokensLike,
        return_type: None,
        *,
        start_at_sublayer: Optional[int] = ...,
        stop_at_sublayer: None = ...,
        tokens: Optional[Tensor] = ...,
    ) -> None: ...

    @overload
    def __call__(
        self,
        input: TokensLike,
        return_type: Optional[str] = ...,
        *,
        start_at_sublayer: Optional[int] = ...,
        stop_at_sublayer: int,
        tokens: Optional[Tensor] = ...,
    ) -> Tensor: ...


HookList = List[Tuple[Union[str, Callable[..., Any]], Callable[..., Any]]]  # (name or predicate, fn)


@runtime_checkable
class MultiStreamModel(Protocol):
    """A hooked model with `cfg.n_streams` residual streams and `cfg.n_sublayers` hyper-connected
    sublayers, named `sublayer_names[k]` ("blocks.{l}.attn" / "blocks.{l}.mlp"), each with the hook
    points of the hook table in docs/hooks.md (`{name}.hook_streams_in`, `.hook_h_pre`, ...)."""

    tokenizer: Any  # encode(str) -> List[int], or None
    hook_dict: Dict[str, HookPoint]  # every hook point by name
    __call__: Forward

    @property
    def forward(self) -> Forward: ...

    @property
    def cfg(self) -> ModelConfig: ...

    @property
    def device(self) -> torch.device: ...  # where tokens go and logits come back

    @property
    def dtype(self) -> torch.dtype: ...  # of the stream state

    @property
    def sublayer_names(self) -> List[str]: ...

    @property
    def W_U(self) -> Tensor: ...  # [d_model, d_vocab] unembedding

    def to_tokens(self, text: Union[str, Sequence[str]]) -> Tensor: ...  # -> [batch, pos] on `device`

    def unembed_streams(self, state: Tensor) -> Tensor:
        """The model's readout of a final state: [batch, pos, n_streams, d_model] -> logits
        [batch, pos, d_vocab] (the hooks of the readout fire)."""

    def stream_contributions(self, state: Tensor, dtype: torch.dtype = ...) -> Tensor:
        """The readout split by stream: [batch, pos, n_streams, d_model] -> c [batch, pos, n_streams,
        d_vocab] in `dtype` (float32 by default) with sum_s c_s = unembed_streams(state), c_s the
        term of stream s. No hook fires."""

    def run_with_cache(self, *args: Any, **kwargs: Any) -> Tuple[Any, MHCCache]:
        """`forward(*args, **kwargs)` and an `MHCCache` {hook name: activation} of the hooks
        `names_filter=` selects (a name, a list or a predicate; all by default)."""

    def hooks(
        self,
        fwd_hooks: HookList = ...,
        bwd_hooks: HookList = ...,
        reset_hooks_end: bool = ...,
        clear_contexts: bool = ...,
    ) -> ContextManager[Any]:
        """Run with the hooks: fn(activation, hook) returns the new activation or None."""

    def frozen_mixing(
        self, source: Mapping[str, Tensor], sublayers: Optional[Sequence[Union[int, str]]] = ...
    ) -> ContextManager[Any]:
        """Inside: every sublayer's (or the chosen ones') H_pre/H_post/H_res - and a learned readout's
        weights, if the model has one and `source` holds them - come from `source` (a cache of the
        hooks `hooks.is_mixing_hook` selects), not from the (possibly edited) state. A cache of
        batch B serves a run of batch k*B."""

    def to(self, *args: Any, **kwargs: Any) -> Any: ...  # `nn.Module.to`

    def summary(self) -> str: ...  # one line: architecture, size, dtype, device
