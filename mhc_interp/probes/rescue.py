"""Pairwise stream ablation-and-rescue with frozen mixing ("Ablate and Rescue", eqs. 2-4).

One clean forward caches every stream state and every sublayer's (H_pre, H_post, H_res). For a
sublayer l and a stream pair {i, j}, with the mixing frozen to the clean run:
    D_ij      = E_tokens KL(P_clean || P_{ablate i, j at l})                 (damage, temperature T)
    D_{j|i}   = the same with stream i restored from the clean cache while j stays ablated
    R(a, r)   = (D_ar - D_{a|r}) / D_ar                    rescue of the pair by recovering r
              (rows a: the stream that stays ablated; columns r: the recovered stream - the
              layout of the paper's Table 1).
One-shot (default): the ablation is applied to the state entering sublayer l only; restoring i
at the same site is then exactly "ablate {j} alone", so those runs are shared. Persistent: the
pair is ablated at every sublayer from l on, and the recovered stream restored at each of them.
Pairs whose damage D_ar is below `min_kl` are flagged: a rescue fraction of a tiny damage is
noise (their R is NaN in the matrices, and they are left out of the global average).

Scored positions: the runner's mask - padding and positions [0, exclude_first) are left out,
position 0 (BOS) by default (`ablate_and_rescue(..., exclude_first=0)` scores every position;
the numbers change). The KL is averaged over the masked-in positions of each prompt, then over
prompts. Ablation values: "zero"; "mean", the mean state over the batch's masked tokens (it
depends on the batch size); "corpus_mean", the mean over every masked token of the corpus from a
first streaming pass (`corpus_mean.py`: batch-size independent); or a tensor.
Scores are float64 for a float64 model, float32 otherwise.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..hooks.batched import Edit, run_edits
from .base import ProbeResult, ReportSection, matrix_table, register_probe, register_result, require_streams
from .causal import CausalProbe, PromptStats, clean_run, kl_metric, stats_arrays
from .corpus_mean import corpus_mean_with_count
from .figure_helpers import annotate, heatmap_grid
from .runner import run_probes, split_options
from .sites import evenly_spaced

MODES = ("one_shot", "persistent")
ABLATIONS = ("zero", "mean", "corpus_mean")


def ablation_values(model, states, mask: Tensor, ablation) -> dict:
    """{sublayer: value broadcastable to [B, pos, n, d]}: zeros, the mean over the batch's
    masked tokens ("mean": it depends on the batch), or a tensor ([n, d], [d], or per sublayer
    [n_sublayers, n, d], e.g. `corpus_mean(model, source)`) cast to the model's dtype."""
    n_sub = model.cfg.n_sublayers
    if isinstance(ablation, str):  # "zero" or "mean": the probe's constructor refuses the others
        if ablation == "zero":
            return dict.fromkeys(range(n_sub), torch.zeros((), device=model.device, dtype=model.dtype))
        return {s: states[s][mask].mean(0) for s in range(n_sub)}  # [n, d]
    value = torch.as_tensor(ablation, device=model.device, dtype=model.dtype)
    if value.ndim == 3:
        if value.shape[0] != n_sub:
            raise ValueError(f"per-sublayer ablation values need {n_sub} rows, got {value.shape[0]}")
        return dict(enumerate(value))
    return dict.fromkeys(range(n_sub), value)


@register_probe
class AblateRescue(CausalProbe):
    """Pairwise ablate-and-rescue (module docstring). ablation: "zero", "mean" (the batch's),
    "corpus_mean" (call `fit_corpus_mean(model, source)` before the run; `ablate_and_rescue` does)
    or a tensor. Positions scored: the runner's mask (position 0 and padding excluded by default)."""

    name = "ablate_rescue"
    report = ReportSection(
        "Which streams the model needs (ablation and rescue)",
        order=80,
        min_streams=2,
        captions={
            "rescue_global": "Global rescue % (rows: ablated stream, columns: recovered stream), one-shot zero "
            "ablation with frozen mixing, as in Table 1 of 'Ablate and Rescue'.",
            "rescue_layers": "Rescue % per sublayer (rows: ablated stream, columns: recovered stream; low = the pair's "
            "damage is below min_kl, so no rescue fraction is given).",
            "rescue_difference": "Per-sublayer rescue difference R(i|ij) - R(j|ij) for every pair: far from 0 = one "
            "stream of the pair carries what matters.",
            "kl_ablated": "Damage KL(P_clean || P_ablated) of every pair ablation per sublayer.",
        },
    )

    for_report = None  # not in the shared forward: `report_run`

    @classmethod
    def report_run(cls, model, tokens: Tensor, cfg, timer):
        """One-shot zero ablation on the report's causal budget, in one batch of the corpus windows."""
        return [
            (
                run_probes(
                    model,
                    cls(sublayers=cfg.sampled_sublayers(model)),
                    tokens[: cfg.causal_prompts, : cfg.causal_seq_len],
                    batch_size=cfg.causal_prompts,
                    progress=cfg.progress,
                    timer=timer,
                ),
                cfg.sample_note(model, "sublayers"),
            )
        ]

    def __init__(
        self,
        mode: str = "one_shot",
        ablation: Union[str, Tensor] = "zero",
        temperature: float = 1.0,
        sublayers: Optional[Sequence[int]] = None,
        min_kl: float = 1e-3,
        frozen: bool = True,
        max_rows: Optional[int] = None,
        pairs: Optional[Sequence[Sequence[int]]] = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(ablation, str) and ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {ablation!r}: use one of {ABLATIONS} or a tensor")
        self.uses_corpus_mean = isinstance(ablation, str) and ablation == "corpus_mean"
        self.corpus_means: Optional[Tensor] = None  # [n_sublayers, n, d] for ablation="corpus_mean"
        self.corpus_mean_tokens = 0
        self.mode, self.ablation, self.temperature = mode, ablation, temperature
        self.sublayers, self.min_kl, self.frozen, self.max_rows = sublayers, min_kl, frozen, max_rows
        self.pairs = None if pairs is None else [tuple(p) for p in pairs]
        for pair in self.pairs or []:
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ValueError(f"a stream pair needs two different streams, got {pair}")

    def fit_corpus_mean(self, model, source, **runner_options) -> "AblateRescue":
        """First pass for ablation="corpus_mean": the mean of every sublayer's input streams over
        every masked token of `source` (`corpus_mean`; `runner_options` as `run_probes` takes
        them - use the same exclude_first as the rescue run)."""
        self.corpus_means, self.corpus_mean_tokens = corpus_mean_with_count(model, source, **runner_options)
        return self

    def setup(self, model) -> None:
        require_streams(model, self.name)
        if self.uses_corpus_mean:
            cfg = model.cfg
            if self.corpus_means is None:
                raise ValueError(
                    "ablation='corpus_mean' needs a first pass over the corpus: call "
                    "probe.fit_corpus_mean(model, source) before the run, or use "
                    "ablate_and_rescue(model, source, ablation='corpus_mean'), which does"
                )
            want = (cfg.n_sublayers, cfg.n_streams, cfg.d_model)
            if tuple(self.corpus_means.shape) != want:
                raise ValueError(
                    f"the corpus means have shape {tuple(self.corpus_means.shape)}, this model needs "
                    f"{want}: fit them on this model"
                )
        self.layers = self.sublayer_indices(model, self.sublayers)
        self.n = model.cfg.n_streams
        pairs = self.pairs or list(itertools.combinations(range(self.n), 2))
        bad = [p for p in pairs if not all(0 <= s < self.n for s in p)]
        if bad:
            raise IndexError(f"stream pair {bad} out of range: the model has {self.n} streams")
        self.pair_list = sorted({tuple(sorted(p)) for p in pairs})
        self.names = [model.sublayer_names[s] for s in self.layers]
        self.edits, self.slots = self._plan(model.cfg.n_sublayers)
        self.stats = PromptStats()

    def _plan(self, n_sub: int):
        """The edits to run and, for each, its (kind, layer index, a, r) slot in the result."""
        edits, slots = [], []
        for li, l in enumerate(self.layers):
            span = (l,) if self.mode == "one_shot" else tuple(range(l, n_sub))
            for i, j in self.pair_list:
                edits.append(Edit(span, ablate=(i, j)))
                slots.append(("ablated", li, i, j))
            for a, r in [o for p in self.pair_list for o in (p, p[::-1])]:
                edits.append(  # one-shot: restoring r at the same site == ablating a alone
                    Edit(span, ablate=(a,))
                    if self.mode == "one_shot"
                    else Edit(span, ablate=(a, r), restore=(r,))
                )
                slots.append(("rescued", li, a, r))
        return edits, slots

    def intervene(self, model, tokens: Tensor, mask: Tensor) -> None:
        logits, states, cache = clean_run(model, tokens)
        ablation = self.corpus_means if self.uses_corpus_mean else self.ablation
        kl = run_edits(
            model,
            self.edits,
            states,
            kl_metric(logits, mask, self.temperature),
            source_states=states,
            ablation_values=ablation_values(model, states, mask, ablation),
            frozen=cache if self.frozen else None,
            source_is_base=True,
            tokens=tokens,
            max_rows=self.max_rows,
        )
        per_prompt = torch.full(
            (2, len(self.layers), self.n, self.n, tokens.shape[0]), float("nan"), dtype=kl.dtype
        )  # float64 scores stay float64
        for (kind, li, a, r), values in zip(self.slots, kl.cpu()):
            if kind == "ablated":
                per_prompt[0, li, a, r] = per_prompt[0, li, r, a] = values
            else:
                per_prompt[1, li, a, r] = values
        self.stats.add(per_prompt)

    def result(self) -> "RescueResult":
        arrays = {
            **stats_arrays("kl_ablated", self.stats, 0),
            **stats_arrays("kl_rescued", self.stats, 1),
        }
        damage, rescued = arrays["kl_ablated"], arrays["kl_rescued"]
        low = ~(damage >= self.min_kl)  # NaN diagonal counts as low
        with np.errstate(invalid="ignore", divide="ignore"):
            rescue = np.where(low, np.nan, (damage - rescued) / damage)
        arrays.update(rescue=rescue, low_damage=low, **global_rescue(rescue, damage, rescued, low))
        meta = {
            "mode": self.mode,
            "ablation": self.ablation if isinstance(self.ablation, str) else "user tensor",
            "temperature": self.temperature,
            "frozen_mixing": self.frozen,
            "min_kl": self.min_kl,
            "sublayers": self.names,
            "n_streams": self.n,
            "prompts": self.stats.count,
            "layout": "[sublayer, a (stays ablated), r (recovered)]",
        }
        if self.uses_corpus_mean:
            meta["corpus_mean_tokens"] = self.corpus_mean_tokens
        return RescueResult(self.name, arrays, meta)


def global_rescue(rescue, damage, rescued, low) -> dict:
    """The global matrices [n, n] from the per-sublayer ones [L, n, n] (R, D, D_rescued, low
    damage): "global_rescue" = mean_l R over the sublayers where R is defined, and
    "global_rescue_weighted" = (sum_l D - sum_l D_rescued) / sum_l D over those with enough damage."""
    keep = ~low
    d = np.where(keep, damage, 0).sum(0)
    r = np.where(keep, rescued, 0).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        weighted = np.where(keep.any(0), (d - r) / d, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice": NaN where no sublayer has R
        return {"global_rescue": np.nanmean(rescue, axis=0), "global_rescue_weighted": weighted}


def _rescue_labels(m: np.ndarray, low: str = "n/a", digits: int = 1) -> np.ndarray:
    """Cell labels of a rescue % matrix: "-" on the diagonal (undefined), `low` where NaN (the
    pair's damage is below min_kl), else the value."""
    out = np.empty(m.shape, dtype=object)
    for (a, r), v in np.ndenumerate(m):
        out[a, r] = "-" if a == r else (low if np.isnan(v) else f"{v:.{digits}f}")
    return out


@register_result
class RescueResult(ProbeResult):
    def pair_difference(self, i: int, j: int) -> np.ndarray:
        """Per sublayer R(i|ij) - R(j|ij): recovering i minus recovering j (> 0: i carries more)."""
        n = self.meta["n_streams"]
        if i == j or not (0 <= i < n and 0 <= j < n):
            raise ValueError(f"a stream pair needs two different streams in 0..{n - 1}, got ({i}, {j})")
        return self["rescue"][:, j, i] - self["rescue"][:, i, j]

    def tables(self):
        return [
            matrix_table(
                "global rescue % (rows: ablated, columns: recovered)",
                100 * self["global_rescue"],
                diagonal="-",
            )
        ]

    def table(self, weighted: bool = False) -> str:
        """The global rescue matrix as Markdown (rows: ablated stream, columns: recovered)."""
        m = self["global_rescue_weighted" if weighted else "global_rescue"]
        n = m.shape[0]
        lines = [
            "| ablated \\ recovered | " + " | ".join(str(c) for c in range(n)) + " |",
            "|---" * (n + 1) + "|",
        ]
        lines += [
            f"| {a} | " + " | ".join(cells) + " |"
            for a, cells in enumerate(_rescue_labels(100 * m, digits=2))
        ]
        return "\n".join(lines)

    def findings(self) -> List[Optional[Dict]]:
        """Which stream restoring rescues the most and the least of a pair ablation's damage."""
        g = np.array(self["global_rescue"], dtype=float)  # [ablated, recovered]
        np.fill_diagonal(g, np.nan)
        valid = np.isfinite(g)
        if g.shape[0] < 2 or valid.sum(0).min() == 0:
            return []
        by_stream = np.nansum(g, 0) / valid.sum(0)  # [recovered]: its mean rescue
        top, low = int(by_stream.argmax()), int(by_stream.argmin())
        text = (
            f"Stream {top} is the most needed: restoring it undoes {by_stream[top]:.0%} of a pair "
            f"ablation's damage, stream {low} the least ({by_stream[low]:.0%}) "
            f"({self.meta.get('ablation', 'zero')} ablation, frozen mixing, {self.meta.get('prompts', '?')} "
            f"prompts)."
        )
        return [
            self.finding(
                "needed_rescue",
                text,
                most_needed=top,
                rescue=float(by_stream[top]),
                least_needed=low,
                least_rescue=float(by_stream[low]),
            )
        ]

    def plot(self, max_layers: int = 8):
        """{"rescue_global", "rescue_layers", "rescue_difference", "kl_ablated"} figures."""
        import matplotlib.pyplot as plt

        names, n = self.meta["sublayers"], self.meta["n_streams"]
        figs = {}
        fig, ax = plt.subplots(figsize=(3.6, 3.2))
        m = 100 * self["global_rescue"]
        im = ax.imshow(m, vmin=0, vmax=100, cmap="viridis")
        annotate(ax, im, m, fontsize=9, labels=_rescue_labels(m))
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xlabel("recovered stream")
        ax.set_ylabel("ablated stream")
        ax.set_title(f"global rescue % ({self.meta['mode']})", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8, label="rescue %")
        figs["rescue_global"] = fig

        picks = evenly_spaced(len(names), max_layers)
        fig = heatmap_grid(
            [100 * self["rescue"][k] for k in picks],
            [names[k] for k in picks],
            vmin=0,
            vmax=100,
            xlabel="recovered stream",
            ylabel="ablated stream",
            colorbar="rescue %",
            chars=3,
            labels=lambda m: _rescue_labels(m, low="low", digits=0),
            title="rescue % per sublayer (rows: ablated, columns: recovered; low: damage below min_kl)",
        )
        figs["rescue_layers"] = fig

        fig, ax = plt.subplots(figsize=(7, 3.2))
        pairs = list(itertools.combinations(range(n), 2))
        for i, j in pairs:
            ax.plot(100 * self.pair_difference(i, j), marker=".", label=f"R({i}|{i}{j}) - R({j}|{i}{j})")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("sublayer")
        ax.set_ylabel("rescue difference (%)")
        ax.legend(fontsize=6, ncol=2)
        figs["rescue_difference"] = fig

        fig, ax = plt.subplots(figsize=(7, 3.2))
        kl = np.stack([self["kl_ablated"][:, i, j] for i, j in pairs], axis=1)
        im = ax.imshow(kl.T, aspect="auto", cmap="magma")
        ax.set_yticks(range(len(pairs)), [f"{i},{j}" for i, j in pairs])
        ax.set_xlabel("sublayer")
        ax.set_title("KL(P_clean || P_ablated) per pair", fontsize=9)
        fig.colorbar(im, ax=ax)
        figs["kl_ablated"] = fig
        return figs


def ablate_and_rescue(model, tokens, **options) -> RescueResult:
    """Run `AblateRescue(**options)` over `tokens` (any token source of `run_probes`); the options
    named in `runner.RUNNER_OPTIONS` (batch_size, seq_len, max_tokens, exclude_first, pad_id,
    device, dtype, progress: no bar by default) go to the runner: positions [0, exclude_first) and
    padding are not scored (position 0 by default; 0 scores every position)."""
    runner, probe = split_options(options)
    return run_rescue(AblateRescue(**probe), model, tokens, **runner)


def run_rescue(probe: AblateRescue, model, tokens, **runner) -> RescueResult:
    """`run_probes(model, probe, tokens, **runner)`, first averaging every sublayer's input streams
    over the same source and mask where the probe's ablation is "corpus_mean" (a second pass)."""
    if probe.uses_corpus_mean:
        probe.fit_corpus_mean(model, tokens, **runner)
    return run_probes(model, probe, tokens, **runner)
