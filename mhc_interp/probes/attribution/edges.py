"""Stream-edge attribution: which earlier sublayer's write, carried by which stream, matters to
which later sublayer's read - EAP-style, for every edge from one forward and one backward.

With the mixing frozen to the base run, the state is linear in the writes between sublayers:
sublayer u's write w_u [pos, d] enters the state after u as h_post_u[t] w_u on stream t, and
reaches the input of sublayer v > u as q_{u->v}[s] w_u on stream s, with

    q_{u->v} = H_res[v-1] ... H_res[u+1] h_post_u          (per token, [n]; base run's coefficients)

so v reads it as  read_v += sum_s H_pre_v[s] q_{u->v}[s] w_u.  The edge (u -> v, stream s) is
that one term. Its path patch replaces w_u by the source run's write along this route only:
read_v += H_pre_v[s] q_{u->v}[s] (w*_u - w_u), everything else as in the base run (mixing
frozen; sublayers after v see the change through v only). The estimate is first order:

    M_base + sum_{pos} H_pre_v[s] q_{u->v}[s] ((w*_u - w_u) . dM/d read_v)

with dM/d read_v taken once, at the base run with frozen mixing. `exact_edge_patching` runs the
path patch of chosen edges (one resumed forward each) to grade it.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..base import ProbeResult, register_result, require_streams
from ..causal import PromptStats, clean_run, stats_arrays
from ..patching import ActivationPatching


def _recorder(store: Dict[int, Tensor], k: int):
    """A hook that keeps its activation as store[k] and leaves it unchanged."""
    return lambda act, hook: store.__setitem__(k, act)


def _writes(model, tokens: Tensor) -> Dict[int, Tensor]:
    """Every sublayer's write [B, pos, d] (no grad)."""
    out: Dict[int, Tensor] = {}
    hooks = [(f"{s}.hook_write", _recorder(out, k)) for k, s in enumerate(model.sublayer_names)]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        model(tokens)
    return out


def routes(cache, names: Sequence[str]) -> Dict[Tuple[int, int], Tensor]:
    """{(u, v): H_pre_v * q_{u->v}  [B, pos, n]} for every u < v, from a cache of the (frozen)
    coefficients: the weight with which v reads u's write through each stream."""
    out = {}
    for u in range(len(names)):
        q = cache[f"{names[u]}.hook_h_post"].double()  # [B, pos, n]
        for v in range(u + 1, len(names)):
            out[(u, v)] = cache[f"{names[v]}.hook_h_pre"].double() * q
            q = (cache[f"{names[v]}.hook_h_res"].double() @ q.unsqueeze(-1)).squeeze(-1)
    return out


def _prepare(model, clean, corrupted, direction, metric, answers, temperature, mask):
    """(base tokens, base states, base cache, the metric, source writes, base writes)
    for aligned prompts [B, pos], the metric and its checks `ActivationPatching`'s (mixing frozen)."""
    spec = ActivationPatching(
        direction=direction, mixing="frozen", metric=metric, answers=answers, temperature=temperature
    )
    spec.setup(model)
    clean, corrupted = clean.to(model.device), corrupted.to(model.device)
    mask, rows = spec._scored(model, clean, corrupted, mask)
    if bool((clean == corrupted).all(-1).any()):
        raise ValueError(
            "some clean and corrupted prompts are identical: there is no edge effect to attribute"
        )
    base_tokens, source_tokens = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    clean_logits, _, _ = clean_run(model, clean)
    _, base_states, base_cache = clean_run(model, base_tokens)
    metric = spec._metric(clean_logits, mask, rows)
    src_w, base_w = _writes(model, source_tokens), _writes(model, base_tokens)
    return base_tokens, base_states, base_cache, metric, src_w, base_w


def edge_attribution(
    model,
    clean: Tensor,
    corrupted: Tensor,
    *,
    direction: str = "denoise",
    metric: str = "kl",
    answers: Optional[Tensor] = None,
    temperature: float = 1.0,
    mask: Optional[Tensor] = None,
) -> "EdgeResult":
    """Edge scores for one batch of aligned prompts [B, pos]: "edge" [u, v, stream] = estimated
    metric after patching u's write into v's read through that stream (NaN where u >= v),
    "edge_effect" = that minus the base run's metric, with _sem over prompts; mixing frozen to the
    base run (the route is defined by its coefficients). Cost: 3 forwards + 1 forward and backward."""
    require_streams(model, "stream edges", minimum=2)
    if direction == "noise" and metric == "kl":
        raise ValueError(
            "direction='noise' with metric='kl' is first-order degenerate (the KL from the clean "
            "run has zero gradient there): use direction='denoise' or an answer metric"
        )
    base_tokens, _, base_cache, score, src_w, base_w = _prepare(
        model, clean, corrupted, direction, metric, answers, temperature, mask
    )
    names = model.sublayer_names
    reads: Dict[int, Tensor] = {}
    with (
        torch.enable_grad(),
        model.frozen_mixing(base_cache),
        model.hooks(fwd_hooks=[(f"{s}.hook_read", _recorder(reads, k)) for k, s in enumerate(names)]),
    ):
        values = score(model(base_tokens)[None])[0]  # [B]
        g_read = torch.autograd.grad(
            values.sum(), [reads[k] for k in range(len(names))], materialize_grads=True
        )
    n_sub, n, b = len(names), model.cfg.n_streams, clean.shape[0]
    effect = torch.full((n_sub, n_sub, n, b), float("nan"), dtype=torch.float64)
    for (u, v), rho in routes(base_cache, names).items():
        a = ((src_w[u] - base_w[u]).double() * g_read[v].double()).sum(-1)  # [B, pos]
        effect[u, v] = (rho * a.unsqueeze(-1)).sum(1).T.cpu()  # [n, B]
    base = values.detach().double().cpu()
    stats, eff = PromptStats(), PromptStats()
    stats.add(effect + base)
    eff.add(effect)
    arrays = {**stats_arrays("edge", stats), **stats_arrays("edge_effect", eff)}
    meta = {
        "direction": direction,
        "metric": metric,
        "sublayers": names,
        "n_streams": n,
        "prompts": b,
        "layout": "[upstream sublayer u, downstream sublayer v, stream entering v]",
        "mixing": "frozen",
        "forward_passes": 4,
        "backward_passes": 1,
    }
    return EdgeResult("stream_edges", arrays, meta)


def exact_edge_patching(
    model,
    clean: Tensor,
    corrupted: Tensor,
    edges: Sequence[Tuple[int, int, int]],
    *,
    direction: str = "denoise",
    metric: str = "kl",
    answers: Optional[Tensor] = None,
    temperature: float = 1.0,
    mask: Optional[Tensor] = None,
) -> np.ndarray:
    """Path patching of each edge (u, v, s): the base run (mixing frozen to it) with v's read
    increased by H_pre_v[s] q_{u->v}[s] (w*_u - w_u); per-prompt metric [edges, B] (float64)."""
    base_tokens, base_states, base_cache, score, src_w, base_w = _prepare(
        model, clean, corrupted, direction, metric, answers, temperature, mask
    )
    names = model.sublayer_names
    rho = routes(base_cache, names)
    out = []
    with torch.no_grad(), model.frozen_mixing(base_cache):
        for u, v, s in edges:
            if not 0 <= u < v < len(names) or not 0 <= s < model.cfg.n_streams:
                raise IndexError(
                    f"edge {(u, v, s)}: need 0 <= u < v < {len(names)} and 0 <= s < {model.cfg.n_streams}"
                )
            add = rho[(u, v)][..., s, None] * (src_w[u] - base_w[u]).double()  # [B, pos, d]

            def hook(r, hook, add=add):
                return r + add.to(r.dtype)

            with model.hooks(fwd_hooks=[(f"{names[v]}.hook_read", hook)]):
                logits = model(base_states[v], start_at_sublayer=v, tokens=base_tokens)
            out.append(score(logits[None])[0].double().cpu())
    return torch.stack(out).numpy()


@register_result
class EdgeResult(ProbeResult):
    def top_edges(self, k: int = 10):
        """The k edges with the largest |effect|: [(u name, v name, stream, effect)]."""
        e = self["edge_effect"]
        flat = np.where(np.isfinite(e), np.abs(e), -1).ravel()
        idx = np.argsort(-flat)[:k]
        names = self.meta["sublayers"]
        return [
            (names[u], names[v], int(s), float(e[u, v, s]))
            for u, v, s in zip(*np.unravel_index(idx, e.shape))
        ]

    def plot(self):
        """{"stream_edges": one u x v heat-map of the edge effect per stream}."""
        import matplotlib.pyplot as plt

        e, names = self["edge_effect"], [s.replace("blocks.", "") for s in self.meta["sublayers"]]
        n = e.shape[-1]
        lim = np.nanmax(np.abs(e)) or 1.0
        fig, axes = plt.subplots(1, n, figsize=(2.6 * n + 1, 2.8), squeeze=False)
        for s, ax in enumerate(axes[0]):
            im = ax.imshow(e[:, :, s], cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_title(f"via stream {s}", fontsize=8)
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=5)
            ax.set_yticks(range(len(names)), names, fontsize=5)
            ax.set_xlabel("reader v", fontsize=7)
        axes[0][0].set_ylabel("writer u", fontsize=7)
        fig.colorbar(im, ax=axes, shrink=0.8, label="edge effect on the metric")
        return {"stream_edges": fig}
