"""`HyperConnectionSpec`: what the generic HF adapter (`hf_mhc.HookedHFMHC`) must know about one
family of hyper-connection models - where the parts are, how the mixing coefficients and the
readout weights are computed, and how a branch is called - and the structure checks built on it.
A new family is one spec (see `deepseek_v4.DEEPSEEK_V4`, and the toy spec in
tests/test_hf_adapter_spec.py); docs/adapters.md describes the contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from torch import Tensor, nn

__all__ = ["HyperConnectionSpec", "UnsupportedModelError", "find_hyper_connections", "validate_structure"]

# (hc module, x [b, p, n, d]) -> (H_pre [b, p, n], H_post [b, p, n], H_res [b, p, n(target), n(source)]), float32
Coefficients = Callable[[nn.Module, Tensor], Tuple[Tensor, Tensor, Tensor]]


class UnsupportedModelError(ValueError):
    """The HF model has no hyper-connections, or a structure / config the adapter does not support."""


@dataclass(frozen=True)
class HyperConnectionSpec:
    """One model family. A decoder layer holds, per sublayer kind, a hyper-connection module, a
    norm and a branch; the base model holds the embedding, the layers, a final norm and a
    readout ("head") module that collapses the n streams with weights w [b, p, n]:

        sublayer:  x' = H_res x + H_post^T F(norm(H_pre x)),     x [b, p, n, d]
        readout:   logits = lm_head(final_norm(sum_s w_s x_s))

    Fields that are functions:
    coefficients(hc, x)        (H_pre, H_post, H_res [target, source]) of the state x
    head_weights(head, x)      w [b, p, n] of the final state x
    branch(kind, module, h, context, ids)   the branch's output [b, p, d] for its normed read h
    layer_forward(layer, x, context, ids)   the HF decoder layer's own forward (parity check)
    context(hf_model, like)    keyword tensors the branches need (positions, masks), from the
                               first stream of the state `like` [b, p, d]; built once per run
    routes_by_token(branch)    the branch routes by token id (resuming needs `tokens=`)
    check_shapes(base, n, d)   raise UnsupportedModelError if the weights do not fit the maths
    describe(hf_model, base)   `HFMHCConfig` fields the adapter cannot read generically
    The HF head module's own forward must return the collapse sum_s w_s x_s (parity check).
    """

    name: str
    description: str  # for error messages: what models this spec is for
    layout: Mapping[str, Tuple[str, str, str]]  # kind -> (hyper-connection, norm, branch) of a layer
    hc_attrs: Tuple[str, ...]  # every hyper-connection module has these
    head_attrs: Tuple[str, ...]
    coefficients: Coefficients
    head_weights: Callable[[nn.Module, Tensor], Tensor]
    branch: Callable[[str, nn.Module, Tensor, Dict[str, Any], Optional[Tensor]], Tensor]
    layer_forward: Callable[[nn.Module, Tensor, Dict[str, Any], Optional[Tensor]], Tensor]
    context: Callable[[nn.Module, Tensor], Dict[str, Any]] = lambda hf_model, like: {}
    routes_by_token: Callable[[nn.Module], bool] = lambda branch: False
    check_shapes: Callable[[nn.Module, int, int], None] = lambda base, n, d: None
    describe: Callable[[nn.Module, nn.Module], Dict[str, Any]] = lambda hf_model, base: {}
    streams_attr: str = "hc_mult"  # stream count, an attribute of each hc module
    parts: Dict[str, str] = field(
        default_factory=lambda: dict(embed="embed_tokens", layers="layers", final_norm="norm", head="hc_head")
    )  # base-model attributes

    def __post_init__(self):
        if tuple(self.layout) != ("attn", "mlp"):
            raise ValueError(
                f"a spec's layout names the sublayers ('attn', 'mlp') in forward order, got {tuple(self.layout)}"
            )

    def part(self, base: nn.Module, what: str) -> nn.Module:
        return getattr(base, self.parts[what])


def find_hyper_connections(model: nn.Module, spec: Optional[HyperConnectionSpec] = None) -> List[str]:
    """Names of the modules that look like `spec`'s hyper-connections (default: DeepSeek-V4's)."""
    if spec is None:
        from .deepseek_v4 import DEEPSEEK_V4 as spec
    return [name for name, m in model.named_modules() if not _lacking(m, spec.hc_attrs)]


def _lacking(obj: Any, attrs) -> List[str]:
    """The attributes of `attrs` that `obj` does not have."""
    return [a for a in attrs if not hasattr(obj, a)]


def _base_model(hf_model: nn.Module, layers: str) -> nn.Module:
    for candidate in (getattr(hf_model, "model", None), hf_model):
        if candidate is not None and hasattr(candidate, layers):
            return candidate
    return hf_model


def validate_structure(hf_model: Any, spec: HyperConnectionSpec) -> Tuple[nn.Module, nn.Module]:
    """(base model, lm_head), or UnsupportedModelError saying what was looked for."""
    kind = type(hf_model).__name__
    if not isinstance(hf_model, nn.Module):
        raise UnsupportedModelError(f"expected a transformers model (torch.nn.Module), got {kind}")
    config = getattr(hf_model, "config", None)
    hc_names = " / .".join(v[0] for v in spec.layout.values())
    if not find_hyper_connections(hf_model, spec):
        raise UnsupportedModelError(
            f"{kind} has no hyper-connections: looked for modules with attributes {', '.join(spec.hc_attrs)} at "
            f"model.{spec.parts['layers']}[i].{hc_names} ({spec.description}) and found none "
            f"(config.model_type={getattr(config, 'model_type', None)!r}). A plain residual model has one "
            f"stream - use HookedMHC or TransformerLens for it."
        )
    base = _base_model(hf_model, spec.parts["layers"])
    missing = _lacking(base, spec.parts.values())
    if missing:
        raise UnsupportedModelError(
            f"{kind} has hyper-connection modules but not the {spec.name} layout: its base "
            f"model lacks {missing} (expected {list(spec.parts.values())})"
        )
    lm_head = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
    if lm_head is None:
        raise UnsupportedModelError(
            f"{kind} has no language-model head (get_output_embeddings() is None): load "
            f"the causal LM (e.g. AutoModelForCausalLM), not the bare base model"
        )
    layers = spec.part(base, "layers")
    if len(layers) == 0:
        raise UnsupportedModelError("the model has no decoder layers")
    for i, layer in enumerate(layers):
        for attrs in spec.layout.values():
            absent = _lacking(layer, attrs)
            if absent:
                raise UnsupportedModelError(
                    f"decoder layer {i} ({type(layer).__name__}) lacks {absent}: the adapter "
                    f"needs {[a for v in spec.layout.values() for a in v]} ({spec.name})"
                )
            absent = _lacking(getattr(layer, attrs[0]), spec.hc_attrs)
            if absent:
                raise UnsupportedModelError(f"layer {i} {attrs[0]} lacks {absent}")
    head = spec.part(base, "head")
    absent = _lacking(head, spec.head_attrs)
    if absent:
        raise UnsupportedModelError(f"{spec.parts['head']} ({type(head).__name__}) lacks {absent}")
    return base, lm_head


def stream_count(base: nn.Module, spec: HyperConnectionSpec) -> int:
    """The one stream count n >= 1 of every hyper-connection module."""
    counts = {
        (i, hc): int(getattr(getattr(layer, hc), spec.streams_attr))
        for i, layer in enumerate(spec.part(base, "layers"))
        for hc, _, _ in spec.layout.values()
    }
    n = next(iter(counts.values()))
    for (i, hc), value in counts.items():
        if value != n or value < 1:
            raise UnsupportedModelError(
                f"layer {i} {hc} has {spec.streams_attr}={value}, the model {n} (need >= 1)"
            )
    return n
