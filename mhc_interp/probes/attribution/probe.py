"""Attribution patching: gradient estimates of exactly what `activation_patching` reports, for
every (sublayer, stream[, position]) cell at once, plus the mixer attribution.

The probe subclasses `ActivationPatching` for its options, checks, metrics and masks (one
definition: the two can never drift apart), and replaces the batched sweep by gradients (see
`core.py` for the maths):

    atp   2 forwards + 1 backward per prompt batch (source run; base run with its backward)
    ig    2 forwards + `steps` forwards and backwards (batched along the path)

Degenerate combinations. KL(P_clean || P) is minimal (0, zero gradient) at the clean run, so
with direction="noise" (base = the clean run) and metric="kl" every first-order estimate equals
the baseline 0: method "atp" refuses it (use "ig", whose path leaves the minimum). With
direction="denoise" (base = the corrupted run) the KL gradient is non-zero and AtP is fine; the
answer metrics (logit_diff, logprob) are first-order informative in both directions.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from ..base import ProbeResult, ReportSection, register_probe, register_result, require_streams
from ..causal import PromptStats, clean_run, stats_arrays
from ..patching import ActivationPatching, patch_with
from .core import atp_gradients, ig_gradients, mixing_effects, site_effects
from .mixers import PARTS

METHODS = ("atp", "ig")


def check_method(method: str, steps: int, direction: str, metric: str) -> None:
    if method == "atp*":
        raise ValueError(
            "method='atp*' is not provided: its corrections were measured on mHC models and not kept - the "
            "exact local step (the patched sublayer's mixer, attention softmax, LayerNorm and MLP run exactly, "
            "which covers AtP*'s QK fix and the mixer fix) gains ~0.01 Spearman over 'atp' for n extra "
            "forwards, the mixer fix alone nothing, while method='ig' with steps=2 gains ~0.03 for 2 passes "
            "(docs/attribution.md). Use method='ig', steps=2"
        )
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 (integrated-gradient points), got {steps!r}")
    if method == "atp" and direction == "noise" and metric == "kl":
        raise ValueError(
            "method='atp' with direction='noise' and metric='kl' is first-order degenerate: the base run "
            "is the clean run, where KL(P_clean || P) is at its minimum (value 0, gradient 0), so every "
            "estimate would be 0. Use method='ig' (integrated gradients leave the minimum), "
            "direction='denoise', or an answer metric (logit_diff / logprob)"
        )


@register_probe
class AttributionPatching(ActivationPatching):
    """Gradient estimate of `ActivationPatching` with the same arguments (see its docstring), plus
    method: "atp" (first order at the base run) or "ig" (integrated gradients, `steps` points);
    mixers: also attribute each sublayer's H_pre / H_post / H_res (the change patching that
    coefficient tensor from the source run would make, to first order); default: with "atp" only.
    Result keys: "attribution" (the estimated patched metric, like `kl_recomputed`, with _sem /
    _ci_low / _ci_high), "attribution_<mixing>", "effect_<mixing>" (estimate minus the base run's
    metric), "baseline_clean", "baseline_corrupted" and, with mixers, "mixer_<mixing>"
    [sublayer, 3] (estimated metric with h_pre / h_post / h_res patched) and per-entry effects.
    max_rows: with IG, the batch rows (path points x prompts) of one gradient pass; memory grows
    with the points per pass (max_rows=B: one point per pass, about a plain forward + backward).
    Clean and corrupted prompts must differ in every prompt (an identical pair has nothing to
    attribute and raises).
    """

    name = "attribution_patching"
    report = (
        ReportSection(
            "Which positions and mixers matter, estimated from gradients (attribution patching)",
            order=100,
            min_streams=2,
            result="attribution_positions",
            captions={
                "attribution_recomputed": "The position-resolved estimate summed over positions: estimated KL to the "
                "clean distribution after restoring one clean stream (compare the activation "
                "patching map; the table below grades it).",
                "attribution_frozen": "The same with the mixing frozen to the corrupted run.",
                "attribution_positions_recomputed": "Position-resolved AtP estimate (rows: sublayer x stream, columns: "
                "patched position) of the KL change when one clean stream is "
                "restored at one position; 2 forwards + 1 backward for all cells.",
                "attribution_positions_frozen": "The same with the mixing frozen to the corrupted run.",
                "mixer_attribution_recomputed": "First-order change of the KL if one sublayer's H_pre, H_post or H_res "
                "were taken from the clean run.",
                "mixer_attribution_frozen": "The same with the rest of the mixing frozen to the corrupted run.",
            },
        ),
        ReportSection(
            "Which writer reaches which reader through which stream (stream edges)",
            order=110,
            min_streams=2,
            result="stream_edges",
            captions={
                "stream_edges": "Estimated KL change when writer u's write reaches reader v through one stream as in "
                "the clean run (path patching, mixing frozen to the corrupted run)."
            },
        ),
    )

    def __init__(self, *args, method: str = "atp", steps: int = 4, mixers: Optional[bool] = None, **kwargs):
        super().__init__(*args, **kwargs)
        check_method(method, steps, self.direction, self.metric_name)
        # mixer attribution by default with AtP only: along IG's input path (coefficients frozen to
        # the base run, or recomputed on the path) it tracks exact mixer patching poorly (docs/attribution.md)
        self.method, self.steps, self.mixers = (
            method,
            steps,
            (method == "atp") if mixers is None else bool(mixers),
        )

    def setup(self, model) -> None:
        require_streams(model, self.name, minimum=2)
        super().setup(model)
        self.effects = {m: PromptStats() for m in self._mixings()}
        self.mixer_stats = {m: {p: PromptStats() for p in ("tensor",) + PARTS} for m in self._mixings()}
        self.passes = {"forward": 0.0, "backward": 0.0}

    def patch(
        self,
        model,
        clean: Tensor,
        corrupted: Tensor,
        mask: Optional[Tensor] = None,
        progress: Optional[Callable[[int], None]] = None,
    ) -> None:
        """One batch of aligned clean / corrupted prompts [B, pos]; mask [B, pos] (default: every
        position but 0). progress(1) is called after each mixing's gradient pass (`n_runs`)."""
        mask, rows = self._scored(model, clean, corrupted, mask)
        same = (clean == corrupted).all(-1).nonzero().flatten().tolist()
        if same:
            raise ValueError(
                f"prompts {[self.baselines.count + i for i in same]}: clean and corrupted are "
                f"identical; there is no patch effect to attribute"
            )
        cells = self._cells(clean.shape[1])
        cells = None if cells == [None] else [c[0] for c in cells]
        base_tokens, source_tokens = (corrupted, clean) if self.direction == "denoise" else (clean, corrupted)
        # the source run (no grad): the states patched in, and its coefficients for mixer attribution
        source_logits, source_states, source_cache = clean_run(model, source_tokens)
        base_logits = base_states = base_cache = None
        if self.method == "ig":  # IG needs the base run's states, its metric and (frozen) its coefficients
            base_logits, base_states, base_cache = clean_run(model, base_tokens)
        # noising with AtP: the clean run is the gradient pass itself (KL is refused there, and
        # the answer metrics need no reference distribution)
        clean_logits = source_logits if self.direction == "denoise" else base_logits
        metric = self._metric(clean_logits, mask, rows)
        self.passes["forward"] += 1.0 + (self.method == "ig")
        for mixing in self._mixings():
            frozen = mixing == "frozen"
            if self.method == "atp":
                g = atp_gradients(
                    model, base_tokens, metric, self.layers, frozen=frozen, capture_mixing=self.mixers
                )
                base_values, base_logits, states, mixing_base = g.values, g.logits, g.states, g.mixing
            else:
                g = ig_gradients(
                    model,
                    base_states[0],
                    source_states[0],
                    base_tokens,
                    metric,
                    self.layers,
                    steps=self.steps,
                    frozen_cache=base_cache if frozen else None,
                    capture_mixing=self.mixers,
                    max_rows=self.max_rows,
                )
                with torch.no_grad():
                    base_values = metric(base_logits[None])[0]
                states, mixing_base = base_states, base_cache
            self.passes["forward"] += g.passes
            self.passes["backward"] += g.passes
            effect = torch.stack(
                [
                    site_effects(source_states[l].to(states[l].device) - states[l], g.state_grads[l], cells)
                    for l in self.layers
                ]
            )  # [L, n, cells, B]
            base64 = base_values.double().to(effect.device)
            self.effects[mixing].add(effect)
            self.stats[mixing].add(base64 + effect)
            if self.mixers:
                self._add_mixers(model, mixing, source_cache, mixing_base, g.mixing_grads, base64)
            if progress is not None:
                progress(1)
        clean_and_corrupted = (source_logits, base_logits)  # base_logits: the gradient pass's under AtP
        if self.direction == "noise":
            clean_and_corrupted = clean_and_corrupted[::-1]
        with torch.no_grad():
            self.baselines.add(torch.stack([metric(z[None])[0] for z in clean_and_corrupted]))

    def n_runs(self, n_pos: int) -> int:
        """Gradient passes (one per mixing) that `patch` makes, whatever n_pos: the total of its
        progress calls."""
        return len(self._mixings())

    def _add_mixers(self, model, mixing: str, source_cache, base_mixing, grads, base64: Tensor) -> None:
        eff = mixing_effects(source_cache, base_mixing, grads)  # {name: [B, ...]}
        stats = self.mixer_stats[mixing]
        per_part = {  # [L, B, n] or [L, B, n, n]
            part: torch.stack([eff[f"{model.sublayer_names[l]}.hook_{part}"] for l in self.layers])
            for part in PARTS
        }
        for part, effect in per_part.items():
            stats[part].add(effect.movedim(1, -1))  # prompts last
        tensor = torch.stack([e.flatten(2).sum(-1) for e in per_part.values()], dim=1)  # [L, 3, B]
        stats["tensor"].add(base64.to(tensor.device) + tensor)

    def result(self) -> "AttributionResult":
        """`ActivationPatching.result` of the estimates, its "<metric>_<mixing>" maps named
        "attribution_<mixing>", plus the effects, the mixer attribution and the passes."""
        patched = super().result()
        prefix = f"{self.metric_name}_"
        arrays = {
            ("attribution_" + k[len(prefix) :] if k.startswith(prefix) else k): v
            for k, v in patched.arrays.items()
        }
        for mixing in self._mixings():
            effects = stats_arrays(f"effect_{mixing}", self.effects[mixing])  # [L, n, cells]
            arrays.update({k: v[..., 0] if self.positions is None else v for k, v in effects.items()})
            if self.mixers:
                arrays.update(stats_arrays(f"mixer_{mixing}", self.mixer_stats[mixing]["tensor"]))
                for part in PARTS:
                    key = f"mixer_{part}_effect_{mixing}"
                    arrays[key], arrays[f"{key}_sem"] = self.mixer_stats[mixing][part].mean_sem()
        if self.mixing != "both":
            for suffix in ("", "_sem", "_ci_low", "_ci_high"):
                arrays[f"attribution{suffix}"] = arrays[f"attribution_{self.mixing}{suffix}"]
        meta = dict(
            patched.meta,
            method=self.method,
            steps=self.steps if self.method == "ig" else None,
            mixer_layout="[sublayer, (h_pre, h_post, h_res)]",
            estimates="activation_patching",
            forward_passes=self.passes["forward"],
            backward_passes=self.passes["backward"],
        )
        return AttributionResult(self.name, arrays, meta)


@register_result
class AttributionResult(ProbeResult):
    def plot(self):
        """{f"attribution_{mixing}": sublayer x stream heatmap of the estimate (position-mean when
        resolved by position), and with mixers the sublayer x (h_pre, h_post, h_res) effects}."""
        figs = {}
        meta, names = self.meta, self.meta["sublayers"]
        base = self["baseline_corrupted" if meta["direction"] == "denoise" else "baseline_clean"]  # unpatched
        for mixing in meta["mixing"]:
            full = self[f"attribution_{mixing}"]
            m = full.mean(-1) if full.ndim == 3 else full
            figs[f"attribution_{mixing}"] = _heatmap(
                m,
                (1.2 + 0.9 * m.shape[1], 0.8 + 0.28 * m.shape[0]),
                f"{meta['method']} estimate of {meta['direction']} patching, {meta['metric']}, mixing {mixing}",
                (range(m.shape[0]), names),
                (range(m.shape[1]), [f"stream {s}" for s in range(m.shape[1])]),
                cmap="magma" if meta["metric"] == "kl" else "RdBu",
            )
            if full.ndim == 3:  # position-resolved: rows (sublayer, stream), columns positions
                e, n = (full - base).reshape(-1, full.shape[-1]), full.shape[1]
                fig = figs[f"attribution_positions_{mixing}"] = _heatmap(
                    e,
                    (min(12, 2 + 0.12 * e.shape[1]), 1 + 0.06 * e.shape[0]),
                    f"{meta['method']} per position (rows: sublayer x {n} streams), mixing {mixing}: "
                    f"estimated effect",
                    (range(0, e.shape[0], n), [s.replace("blocks.", "") for s in names]),
                    diverging=True,
                    interpolation="nearest",
                )
                fig.axes[0].set_xlabel("patched position")
            if f"mixer_{mixing}" in self.arrays:
                e = self[f"mixer_{mixing}"] - base
                figs[f"mixer_attribution_{mixing}"] = _heatmap(
                    e,
                    (4, 0.8 + 0.28 * e.shape[0]),
                    f"mixer attribution (effect of patching each coefficient tensor), {mixing}",
                    (range(e.shape[0]), names),
                    (range(3), ["H_pre", "H_post", "H_res"]),
                    diverging=True,
                )
        return figs


def _heatmap(m: np.ndarray, figsize, title: str, yticks, xticks=None, diverging: bool = False, **imshow):
    """One figure: m as a heatmap (diverging: RdBu_r, symmetric about 0) with its y / x ticks
    ((positions, labels)), title and colour bar."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    if diverging:
        lim = np.nanmax(np.abs(m)) or 1.0
        imshow.update(cmap="RdBu_r", vmin=-lim, vmax=lim)
    im = ax.imshow(m, aspect="auto", **imshow)
    ax.set_yticks(*yticks, fontsize=6)
    if xticks is not None:
        ax.set_xticks(*xticks, fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax)
    return fig


def attribution_patching(model, clean: Tensor, corrupted: Tensor, **options) -> AttributionResult:
    """Attribute over aligned clean / corrupted prompt tensors [N, pos], in batches, with the
    options of `activation_patching` (positions [0, exclude_first) are not scored; device / dtype
    move the model first) plus method= ("atp" | "ig"), steps= and mixers= (`AttributionPatching`)."""
    return patch_with(AttributionPatching, model, clean, corrupted, options)
