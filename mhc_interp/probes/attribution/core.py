"""Gradient machinery of attribution patching: the metric's gradient with respect to the stream
state entering every sublayer (and every sublayer's mixing coefficients), from one forward and
one backward, optionally along an integrated-gradients path.

Notation: M(.) the patching metric of one prompt, x_l [pos, n, d] the state entering sublayer l
in the base run (the run being edited), x*_l the same state in the source run. Exact patching of
stream s at sublayer l (positions Q) reports M(x_l <- x*_l on stream s, Q). Estimates:

    AtP:  M_base + sum_{q in Q, d} (x*_l - x_l)[q, s, d] * dM/dx_l[q, s, d]        at the base run
    IG:   M_base + sum_{q in Q, d} (x*_l - x_l)[q, s, d] * mean_a dM/dx_l(a)[q, s, d]

where for IG the whole run follows the straight path between the two runs' initial stream states,
x_0(a) = x_0 + a (x*_0 - x_0), at the midpoints a = (i + 1/2) / steps (EAP-IG style); every a is
one replica stacked in the batch axis (replica-major), so `steps` points cost `steps` forwards and
backwards worth of rows, chunked to bound memory.

Mixing "frozen" (the content effect) differentiates the function whose H_pre/H_post/H_res are the
base run's: for AtP the coefficients are detached where they enter their hook points (no second
forward); for IG the run is made inside `model.frozen_mixing(base cache)`. Either way the metric's
gradient with respect to the coefficients themselves is captured at `hook_h_pre|h_post|h_res`,
which mixer attribution multiplies by the coefficient change (H* - H).

Memory: only the captured states' and coefficients' gradients are kept ([B, pos, n, d] per
sublayer, like a state cache); nothing else is cached beyond what autograd itself saves.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ...hooks.freeze import is_mixing_hook
from ...hooks.names import MIXING_SUFFIXES
from ..causal import check_finite


@dataclass
class Gradients:
    """What one gradient pass (or an IG path) returns, all detached, on the model's device.

    values [B]: the metric of the base run per prompt (AtP: from this pass itself).
    logits [B, pos, vocab] of the base run (AtP only; None for IG).
    states {l: x_l [B, pos, n, d]} of the base run (AtP only).
    state_grads {l: dM/dx_l [B, pos, n, d]} (IG: averaged over the path).
    mixing_grads {hook name: dM/dH [B, pos, ...]} (IG: averaged over the path).
    mixing {hook name: H [B, pos, ...]} of the base run (AtP only).
    passes: forward (= backward) passes in units of one batch of prompts.
    """

    values: Tensor
    logits: Optional[Tensor]
    states: Dict[int, Tensor]
    state_grads: Dict[int, Tensor]
    mixing_grads: Dict[str, Tensor] = field(default_factory=dict)
    mixing: Dict[str, Tensor] = field(default_factory=dict)
    passes: float = 1.0


def mixing_hook_names(model, sublayers: Sequence[int], frozen: bool) -> List[str]:
    """The coefficient hooks of `sublayers`; frozen: every mixing hook of the model (every
    sublayer's, and a learned readout's if it has one), which must all be constant."""
    if frozen:
        return [name for name in model.hook_dict if is_mixing_hook(name)]
    return [f"{model.sublayer_names[l]}.{h}" for l in sublayers for h in MIXING_SUFFIXES]


def _capture_hooks(
    model,
    sublayers: Sequence[int],
    capture_mixing: bool,
    detach_mixing: bool,
    states: Dict[int, Tensor],
    mixing: Dict[str, Tensor],
):
    """Forward hooks that record the tensors to differentiate with respect to: the state entering
    each chosen sublayer, and (optionally) the coefficients; `detach_mixing` cuts the graph at every
    coefficient hook so that gradients do not flow through the mixers (frozen mixing)."""

    def state_hook(l):
        def hook(x: Tensor, hook) -> Tensor:  # [rows, pos, n, d]
            if not x.requires_grad:  # e.g. parameters with requires_grad=False
                x = x.detach().requires_grad_(True)
            states[l] = x
            return x

        return hook

    wanted = set(mixing_hook_names(model, sublayers, False)) if capture_mixing else set()
    cut = set(mixing_hook_names(model, sublayers, True)) if detach_mixing else set()

    def mixing_hook(name):
        def hook(h: Tensor, hook) -> Tensor:
            if name in cut or not h.requires_grad:
                h = h.detach().requires_grad_(name in wanted)
            if name in wanted:
                mixing[name] = h
            return h

        return hook

    return [(f"{model.sublayer_names[l]}.hook_streams_in", state_hook(l)) for l in sublayers] + [
        (name, mixing_hook(name)) for name in sorted(wanted | cut)
    ]


def _backward(
    model,
    run: Callable[[], Tensor],
    metric,
    k: int,
    sublayers: Sequence[int],
    capture_mixing: bool,
    detach_mixing: bool,
):
    """One forward (k replicas stacked replica-major) and one backward: `Gradients` with values
    [k, B] and logits [k*B, pos, vocab], every grad summed over replicas."""
    states: Dict[int, Tensor] = {}
    mixing: Dict[str, Tensor] = {}
    hooks = _capture_hooks(model, sublayers, capture_mixing, detach_mixing, states, mixing)
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        logits = run()  # [k*B, pos, vocab]
        check_finite(logits, "gradient")
        values = metric(logits.view(k, -1, *logits.shape[1:]))  # [k, B]
        missing = [l for l in sublayers if l not in states]
        if missing:
            raise RuntimeError(f"hook_streams_in of sublayers {missing} did not fire")
        names = list(mixing)
        inputs = [states[l] for l in sublayers] + [mixing[n] for n in names]
        # per-prompt gradients from one backward: prompts are independent rows of the batch (a
        # NaN value - nothing to score - only reaches its own prompt's rows)
        grads = torch.autograd.grad(values.sum(), inputs, materialize_grads=True)  # unused: zeros

    def fold(t: Tensor) -> Tensor:  # [k*B, ...] -> [B, ...], summed over replicas
        return t.view(k, -1, *t.shape[1:]).sum(0).detach()

    return Gradients(
        values.detach(),
        logits.detach(),
        {l: states[l].detach() for l in sublayers},
        {l: fold(g) for l, g in zip(sublayers, grads)},
        {n: fold(g) for n, g in zip(names, grads[len(sublayers) :])},
        {n: mixing[n].detach() for n in names},
    )


def atp_gradients(
    model, tokens: Tensor, metric, sublayers: Sequence[int], *, frozen: bool, capture_mixing: bool = True
) -> Gradients:
    """AtP: one forward of the base prompts `tokens` [B, pos] and one backward."""
    g = _backward(model, lambda: model(tokens), metric, 1, sublayers, capture_mixing, detach_mixing=frozen)
    g.values = g.values[0]
    return g


def ig_alphas(steps: int) -> Tensor:
    """Midpoints (i + 1/2) / steps, i = 0..steps-1, of the path [0, 1]."""
    return (torch.arange(steps, dtype=torch.float64) + 0.5) / steps


def mixing_context(model, frozen_cache=None):
    """`model.frozen_mixing(frozen_cache)`, or a context that changes nothing when it is None."""
    return contextlib.nullcontext() if frozen_cache is None else model.frozen_mixing(frozen_cache)


def ig_path(model, x: Tensor, delta: Tensor, tokens: Optional[Tensor], steps: int, max_rows: Optional[int]):
    """The points x + a delta (x, delta [B, pos, n, d]) at the midpoints a of `ig_alphas(steps)`,
    in chunks of k replicas stacked replica-major (k*B rows within `rows_per_forward`): yields
    (k, points [k*B, pos, n, d] in x's dtype, token ids [k*B, pos] or None)."""
    from ...hooks.batched import rows_per_forward

    b = x.shape[0]
    per_chunk = max(1, rows_per_forward(model, b, x.shape[1], max_rows) // b)
    alphas = ig_alphas(steps).to(x.device)
    for c in range(0, steps, per_chunk):
        a = alphas[c : c + per_chunk]
        k = len(a)
        points = x.double()[None] + a.view(k, 1, 1, 1, 1) * delta.double()[None]  # [k, B, pos, n, d]
        yield k, points.to(x.dtype).flatten(0, 1), None if tokens is None else tokens.repeat(k, 1)


def ig_gradients(
    model,
    base_init: Tensor,
    source_init: Tensor,
    tokens: Tensor,
    metric,
    sublayers: Sequence[int],
    *,
    steps: int,
    frozen_cache=None,
    capture_mixing: bool = True,
    max_rows: Optional[int] = None,
) -> Gradients:
    """Integrated gradients along x_0(a) = x_0 + a (x*_0 - x_0): `steps` points, stacked as
    replicas in the batch axis (`ig_path`). base_init, source_init [B, pos, n, d] are the states
    entering sublayer 0; `tokens` the base prompts (hash-routed adapters route by them).
    frozen_cache: freeze every coefficient to this (base) cache."""
    totals = ({}, {})  # over the path: state grads {l}, mixing grads {name}
    delta = (source_init - base_init).double()  # [B, pos, n, d]
    with mixing_context(model, frozen_cache):
        for k, x0, ids in ig_path(model, base_init, delta, tokens, steps, max_rows):
            grads = _backward(
                model,
                lambda: model(x0, start_at_sublayer=0, tokens=ids),
                metric,
                k,
                sublayers,
                capture_mixing,
                detach_mixing=False,
            )
            for total, new in zip(totals, (grads.state_grads, grads.mixing_grads)):
                for key, g in new.items():
                    total[key] = total[key] + g if key in total else g
    return Gradients(
        torch.full((base_init.shape[0],), float("nan")),
        None,
        {},
        *({key: g / steps for key, g in total.items()} for total in totals),
        {},
        passes=float(steps),
    )


def site_effects(delta: Tensor, grad: Tensor, cells: Optional[Sequence[int]]) -> Tensor:
    """First-order effects of patching each stream (at all positions, or at each cell position):
    delta, grad [B, pos, n, d] -> [n, cells, B] float64 (cells = 1 when `cells` is None)."""
    prod = (delta.double() * grad.double()).sum(-1)  # [B, pos, n]
    if cells is None:
        return prod.sum(1).T[:, None, :]  # [n, 1, B]
    return prod[:, list(cells)].permute(2, 1, 0)  # [n, cells, B]


def mixing_effects(source_cache, base_cache, grads: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Per hook name: sum over positions of (H* - H) * dM/dH, float64:
    h_pre / h_post [B, n], h_res [B, n(target), n(source)]."""
    out = {}
    for name, g in grads.items():
        d = (source_cache[name].double() - base_cache[name].double()).to(g.device)
        out[name] = (d * g.double()).sum(1)
    return out
