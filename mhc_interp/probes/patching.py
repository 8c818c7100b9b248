"""Activation patching per (sublayer, stream), optionally per position, scored against the clean
distribution.

Two runs of aligned prompts, clean and corrupted. Denoising (default): run the corrupted prompt
and copy stream s of the clean run's state into the state entering sublayer l; noising: run the
clean prompt and copy the corrupted run's stream in. Score: KL(P_clean || P_patched) in float32,
averaged over the unmasked positions (or the logit difference / log-prob of given answers). With
causal attention a position before a prompt's first corrupted token is the same in both runs and
scores 0; score_positions="from_corruption" averages over positions >= that token only, so
prompts corrupted at different depths are scored on equal terms.
Mixing recomputed = the total effect; mixing frozen to the edited (base) run's coefficients =
the content effect (the routing x -> H cannot respond); total - frozen = the routing-mediated
effect. Every (sublayer, stream[, position]) cell is one replica of a batched forward that
resumes from the base run's cached state at that sublayer.

Scored positions: padding and positions [0, exclude_first) are left out - position 0 (BOS) by
default, under `run_probes` and `activation_patching` alike (`exclude_first=0` scores every
position; the numbers change). Scores are float64 for a float64 model, float32 otherwise.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..hooks.batched import Edit, run_edits
from ..token_windows import patching_prompts
from .base import ProbeResult, ReportSection, register_probe, register_result, require_streams
from .causal import (
    CausalProbe,
    PromptStats,
    clean_run,
    kl_metric,
    logit_diff_metric,
    logprob_metric,
    position_mask,
    stats_arrays,
)
from .runner import split_options

DIRECTIONS = ("denoise", "noise")
MIXING = ("recomputed", "frozen", "both")
SCORE_POSITIONS = ("all", "from_corruption")

# Below this KL (nats) between the clean and corrupted runs the patching finding says there is
# nothing to repair (the rescue probe's default min_kl for a pair's damage).
MIN_CORRUPTION_KL = 1e-3


@register_probe
class ActivationPatching(CausalProbe):
    """corrupt: a function clean tokens -> corrupted tokens (e.g. `SymmetricReplacement`), used
    when the runner supplies only clean prompts; `patch(model, clean, corrupted)` takes both.
    positions: None (patch every position at once), "each" (one cell per position), or a list.
    metric: "kl" (default), "logit_diff" (needs answers [B, 2]: correct, wrong), "logprob"
    (needs answers [B]); the answer metrics read the last position.
    score_positions: which positions the KL averages over - "all" unmasked ones (default) or
    "from_corruption" (each prompt's first token that differs between the runs, and after).
    The mask: the runner's (position 0 and padding excluded by default, `exclude_first`); `patch`
    without a mask excludes position 0.
    """

    name = "activation_patching"
    report = ReportSection(
        "Where one clean stream repairs a corrupted run (activation patching)",
        order=90,
        captions={
            "patching_recomputed": "Activation patching (denoising) per sublayer and stream: KL to the clean "
            "distribution after restoring one clean stream into the corrupted run, mixing "
            "recomputed (lower = more repaired). Each cell: mean and 95% interval over the "
            "prompts; hatched cells' intervals include 0 (indistinguishable from the clean run).",
            "patching_frozen": "The same with the mixing frozen to the corrupted run (content effect).",
            "patching_routing": "Recomputed minus frozen: the part of the effect mediated by the mixers; hatched cells "
            "are within 2 s.e.m. of 0 (s.e.m. bounded by the sum of both maps'), i.e. no routing "
            "effect above the noise.",
        },
    )

    for_report = None  # not in the shared forward: `report_run`

    @classmethod
    def report_run(cls, model, tokens: Tensor, cfg, timer):
        """Activation patching on prompts made from the corpus windows (`patching_prompts`), then
        (several streams) the attribution estimates graded against it on the same prompts."""
        multi = model.cfg.n_streams > 1
        clean, corrupted, how = patching_prompts(model, tokens, cfg)
        with timer("activation_patching: interventions"):  # one batch: split calls cost 10-40% more
            patching = patch_aligned(
                cls(mixing="both" if multi else "recomputed", sublayers=cfg.sampled_sublayers(model)),
                model,
                clean,
                corrupted,
                batch_size=len(clean),
                progress=cfg.progress,
            )
        sampled = cfg.sample_note(model, "sublayers").get("note")
        out = [(patching, {"note": f"corruption: {how}" + (f"; {sampled}" if sampled else "")})]
        if multi and "attribution_patching" not in cfg.skip:
            from .attribution.section import report_results

            with timer("attribution_patching: gradients"):
                attributions, attr_table = report_results(model, clean, corrupted, patching)
            out += [
                (r, {"tables": [attr_table]} if r.probe == "attribution_positions" else {})
                for r in attributions
            ]
        return out

    def __init__(
        self,
        corrupt: Optional[Callable[[Tensor], Tensor]] = None,
        direction: str = "denoise",
        mixing: str = "recomputed",
        positions: Union[None, str, Sequence[int]] = None,
        sublayers: Optional[Sequence[int]] = None,
        metric: str = "kl",
        answers: Optional[Tensor] = None,
        temperature: float = 1.0,
        max_rows: Optional[int] = None,
        score_positions: str = "all",
    ):
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if mixing not in MIXING:
            raise ValueError(f"mixing must be one of {MIXING}, got {mixing!r}")
        if metric not in ("kl", "logit_diff", "logprob"):
            raise ValueError(f"metric must be 'kl', 'logit_diff' or 'logprob', got {metric!r}")
        if metric != "kl" and answers is None:
            raise ValueError(f"metric {metric!r} needs answers=")
        if score_positions not in SCORE_POSITIONS:
            raise ValueError(f"score_positions must be one of {SCORE_POSITIONS}, got {score_positions!r}")
        if score_positions != "all" and metric != "kl":
            raise ValueError(
                f"score_positions={score_positions!r} applies to the KL metric; "
                f"metric {metric!r} reads the last position"
            )
        self.score_positions = score_positions
        self.corrupt, self.direction, self.mixing, self.positions = corrupt, direction, mixing, positions
        self.sublayers, self.metric_name, self.answers = sublayers, metric, answers
        self.temperature, self.max_rows = temperature, max_rows

    def setup(self, model) -> None:
        require_streams(model, self.name, minimum=1)
        self.layers = self.sublayer_indices(model, self.sublayers)
        self.n = model.cfg.n_streams
        self.names = [model.sublayer_names[s] for s in self.layers]
        self.stats = {m: PromptStats() for m in self._mixings()}
        self.baselines = PromptStats()
        self.n_pos = None

    def _mixings(self):
        return ("recomputed", "frozen") if self.mixing == "both" else (self.mixing,)

    def intervene(self, model, tokens: Tensor, mask: Tensor) -> None:
        if self.corrupt is None:
            raise ValueError(
                "activation patching over a corpus needs corrupt=...; or call patch(model, clean, corrupted)"
            )
        self.patch(model, tokens, self.corrupt(tokens.cpu()).to(tokens.device), mask)

    def _metric(self, clean_logits: Tensor, mask: Tensor, rows: slice):
        if self.metric_name == "kl":
            return kl_metric(clean_logits, mask, self.temperature)
        answers = self.answers[rows]
        if self.metric_name == "logit_diff":
            return logit_diff_metric(answers)
        return logprob_metric(answers, temperature=self.temperature)

    def patch(
        self,
        model,
        clean: Tensor,
        corrupted: Tensor,
        mask: Optional[Tensor] = None,
        progress: Optional[Callable[[int], None]] = None,
    ) -> None:
        """One batch of aligned clean / corrupted prompts [B, pos]; mask [B, pos] (default: every
        position but 0). progress(k) is called as each k patched runs finish (`n_runs` in all)."""
        mask, rows = self._scored(model, clean, corrupted, mask)
        b, p = clean.shape
        clean_logits, clean_states, clean_cache = clean_run(model, clean)
        corr_logits, corr_states, corr_cache = clean_run(model, corrupted, run="corrupted")
        base_tokens, base_states, base_cache, source = (
            (corrupted, corr_states, corr_cache, clean_states)
            if self.direction == "denoise"
            else (clean, clean_states, clean_cache, corr_states)
        )
        metric = self._metric(clean_logits, mask, rows)
        with torch.no_grad():
            self.baselines.add(metric(torch.stack([clean_logits, corr_logits])))  # [2, B]
        cells = self._cells(p)
        edits = [
            Edit((l,), restore=(s,), positions=pos)
            for l in self.layers
            for s in range(self.n)
            for pos in cells
        ]
        for mixing in self._mixings():
            values = run_edits(
                model,
                edits,
                base_states,
                metric,
                source_states=source,
                frozen=base_cache if mixing == "frozen" else None,
                tokens=base_tokens,
                max_rows=self.max_rows,
                progress=progress,
            )
            self.stats[mixing].add(values.view(len(self.layers), self.n, len(cells), b))

    def _scored(
        self, model, clean: Tensor, corrupted: Tensor, mask: Optional[Tensor]
    ) -> Tuple[Tensor, slice]:
        """Check a batch of aligned prompts [B, pos] -> (the positions scored [B, pos]: `mask`, by
        default every position but 0, from the first corrupted token on where asked; the batch's
        prompt numbers, a slice of `answers`)."""
        check_aligned(clean, corrupted)
        b, p = clean.shape
        if self.n_pos is None:
            self.n_pos = p
        elif self.positions == "each" and p != self.n_pos:
            raise ValueError(f"per-position {self.name} needs one prompt length, got {p} after {self.n_pos}")
        if mask is None:
            mask = position_mask(torch.ones(b, p, dtype=torch.bool, device=model.device))
        if self.score_positions == "from_corruption":
            mask = mask & from_first_difference(clean, corrupted, self.baselines.count).to(mask.device)
        return mask, slice(self.baselines.count, self.baselines.count + b)

    def n_runs(self, n_pos: int) -> int:
        """Patched runs (one per sublayer, stream, position cell and mixing) that `patch` makes for
        prompts of n_pos tokens (after `setup`): the total of its progress calls."""
        return len(self.layers) * self.n * len(self._cells(n_pos)) * len(self._mixings())

    def _cells(self, p: int):
        if self.positions is None:
            return [None]
        if self.positions == "each":
            return [(q,) for q in range(p)]
        bad = [q for q in self.positions if not 0 <= q < p]
        if bad:
            raise IndexError(f"positions {bad} out of range for prompts of length {p}")
        return [(q,) for q in self.positions]

    def result(self) -> "PatchingResult":
        metric = self.metric_name
        arrays = {
            k: v
            for mixing, stats in self.stats.items()
            for k, v in stats_arrays(f"{metric}_{mixing}", stats).items()
        }
        if self.mixing == "both":
            arrays[f"{metric}_routing"] = arrays[f"{metric}_recomputed"] - arrays[f"{metric}_frozen"]
        arrays["baseline_clean"], arrays["baseline_corrupted"] = self.baselines.mean_sem()[0]  # mean [2]
        if self.positions is None:
            arrays = {k: v[..., 0] if v.ndim == 3 else v for k, v in arrays.items()}
        meta = {
            "direction": self.direction,
            "mixing": list(self.stats),
            "metric": metric,
            "sublayers": self.names,
            "n_streams": self.n,
            "prompts": self.baselines.count,
            "positions": self.positions if self.positions in (None, "each") else list(self.positions),
            "temperature": self.temperature,
            "score_positions": self.score_positions,
            "layout": "[sublayer, stream]" + ("" if self.positions is None else "[, position]"),
            "frozen_to": "the edited (base) run's mixing",
        }
        return PatchingResult(self.name, arrays, meta)


def check_aligned(clean: Tensor, corrupted: Tensor) -> None:
    """Refuse clean and corrupted prompts [B, pos] that are not aligned (the same shape)."""
    if clean.shape != corrupted.shape:
        raise ValueError(
            f"clean prompts {tuple(clean.shape)} and corrupted prompts {tuple(corrupted.shape)} "
            f"differ in shape: align them (same length, position by position) first"
        )


def from_first_difference(clean: Tensor, corrupted: Tensor, first_prompt: int = 0) -> Tensor:
    """[B, pos] bool: True at and after each prompt's first position where clean != corrupted."""
    differs = clean != corrupted  # [B, pos]
    same = (~differs.any(-1)).nonzero().flatten().tolist()
    if same:
        raise ValueError(
            f"prompts {[first_prompt + i for i in same]}: clean and corrupted are identical, "
            f"nothing to score from the corruption on"
        )
    return differs.cumsum(-1) > 0


@register_result
class PatchingResult(ProbeResult):
    def _sem(self, metric: str, mixing: str):
        """The s.e.m. map of one mixing, or for "routing" (recomputed - frozen, whose per-prompt
        values are not kept) the bound sem_recomputed + sem_frozen; None if not saved."""
        if mixing == "routing":
            parts = [self.arrays.get(f"{metric}_{m}_sem") for m in ("recomputed", "frozen")]
            return None if any(p is None for p in parts) else parts[0] + parts[1]
        return self.arrays.get(f"{metric}_{mixing}_sem")

    def findings(self) -> List[Optional[Dict]]:
        """Which stream patched back in repairs the most and the least of the corruption (KL)."""
        metric = self.meta.get("metric")
        m = np.asarray(self[f"{metric}_{self.meta['mixing'][0]}"], dtype=float)  # recomputed, if run
        if metric != "kl" or m.ndim != 2 or m.shape[1] < 2 or not np.isfinite(m).all():
            return []
        clean, corrupted = float(self["baseline_clean"]), float(self["baseline_corrupted"])
        effect = corrupted - clean
        prompts = self.meta.get("prompts", "?")
        if not effect >= MIN_CORRUPTION_KL:
            return [
                self.finding(
                    "needed_patching",
                    f"The corruption hardly changes the output (KL to clean "
                    f"{corrupted:.2g} < {MIN_CORRUPTION_KL:g} over {prompts} "
                    f"prompts): activation patching has nothing to repair.",
                    corrupted_kl=corrupted,
                )
            ]
        repaired = ((corrupted - m) / effect).mean(0)  # [stream], mean over sublayers
        top, low = int(repaired.argmax()), int(repaired.argmin())
        text = (
            f"Patching stream {top} back in repairs the most: {repaired[top]:.0%} of the corruption's "
            f"KL on average, stream {low} the least ({repaired[low]:.0%})"
        )
        values = dict(
            best_stream=top,
            repaired=float(repaired[top]),
            worst_stream=low,
            worst_repaired=float(repaired[low]),
            corrupted_kl=corrupted,
        )
        routing, bound = self.arrays.get(f"{metric}_routing"), self._sem(metric, "routing")
        if routing is not None and bound is not None:
            within = int((np.abs(routing) < 2 * bound).sum())
            text += f"; routing within 2 s.e.m. of 0 in {within}/{routing.size} cells"
            values.update(routing_within_noise=within, cells=int(routing.size))
        return [self.finding("needed_patching", text + f" ({prompts} prompts).", **values)]

    def plot(self):
        """{f"patching_{mixing}": sublayer x stream heatmap, each cell annotated with its mean and
        (smaller, below) its 95% CI half-width; cells whose 95% interval includes 0 are hatched (the
        routing map, which has no interval: cells within 2 s.e.m. of 0, s.e.m. bounded by the sum
        of both maps')}."""
        import matplotlib.pyplot as plt

        figs = {}
        metric = self.meta["metric"]
        prompts = self.meta.get("prompts", "?")
        for mixing in self.meta["mixing"] + (["routing"] if len(self.meta["mixing"]) == 2 else []):
            m = self[f"{metric}_{mixing}"]
            sem = self._sem(metric, mixing)
            high = self.arrays.get(f"{metric}_{mixing}_ci_high")  # 95% Student-t interval
            low = self.arrays.get(f"{metric}_{mixing}_ci_low")
            if m.ndim == 3:  # per position: averaged for the map
                m = m.mean(-1)
                sem = high = low = None
            annotated = m.shape[0] <= 24
            fig, ax = plt.subplots(
                figsize=(1.8 + 1.0 * m.shape[1], 1.2 + (0.42 if annotated else 0.22) * m.shape[0])
            )
            if metric != "kl" or mixing == "routing":  # diverging
                lim = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 1.0
                im = ax.imshow(m, aspect="auto", cmap="RdBu_r", vmin=-lim or -1, vmax=lim or 1)
            else:
                im = ax.imshow(m, aspect="auto", cmap="magma")
            ax.set_yticks(range(m.shape[0]), self.meta["sublayers"], fontsize=8)
            ax.set_xticks(range(m.shape[1]), [f"stream {s}" for s in range(m.shape[1])], fontsize=8)
            if high is not None and np.isfinite([high, low]).all():  # the interval shown includes 0
                noise, test = (low <= 0) & (high >= 0), "with a 95% interval including 0"
            else:
                noise, test = (None, "") if sem is None else (np.abs(m) < 2 * sem, "within 2 s.e.m. of 0")
            if annotated:
                _annotate_cells(ax, im, m, high)
            if noise is not None and noise.any():
                _hatch_cells(ax, noise)
            title = {"routing": "recomputed - frozen (routing)"}.get(mixing, f"mixing {mixing}")
            ax.set_title(f"{self.meta['direction']} patching, {metric}, {title}", fontsize=9)
            if noise is None:
                note = f"{prompts} prompts"
            else:
                within = int(noise.sum())
                bound = " (s.e.m. bound: the sum of both maps')" if mixing == "routing" else ""
                ci = "; \u00b1 95% interval" if high is not None else ""
                note = (
                    f"{prompts} prompts{ci}; {within} of {noise.size} cells {test}{bound}"
                    + (" (hatched)" if within else "")
                    + (": none clearly differs from 0" if within == noise.size else "")
                )
            base = self.arrays.get("baseline_corrupted")
            if mixing != "routing" and base is not None and np.ndim(base) == 0:
                note = f"unpatched corrupted run: {float(base):.2g}; " + note
            ax.set_xlabel(note, fontsize=7)
            fig.colorbar(im, ax=ax, label=f"{metric} difference" if mixing == "routing" else metric)
            figs[f"patching_{mixing}"] = fig
        return figs


def _annotate_cells(ax, im, m: np.ndarray, high) -> None:
    """Write each finite cell's value of m [sublayer, stream] on it, and below it (smaller) the
    95% interval's half-width high - m when `high` [sublayer, stream] has one there."""
    from .figure_helpers import text_color

    for (i, j), v in np.ndenumerate(m):
        if not np.isfinite(v):
            continue
        style = dict(ha="center", va="center", color=text_color(im.cmap(im.norm(v))))
        below = high is not None and np.isfinite(high[i, j])
        ax.text(j, i - (0.12 if below else 0), f"{v:.2g}", fontsize=8, **style)
        if below:
            ax.text(j, i + 0.22, f"\u00b1{high[i, j] - v:.2g}", fontsize=6, **style)


def _hatch_cells(ax, noise: np.ndarray) -> None:
    """Hatch the cells where noise [sublayer, stream] is True."""
    from matplotlib.patches import Rectangle

    for i, j in zip(*np.nonzero(noise)):
        ax.add_patch(
            Rectangle(
                (j - 0.5, i - 0.5),
                1,
                1,
                fill=False,
                hatch="///",
                linewidth=0,
                edgecolor=(0.5, 0.5, 0.5, 0.6),
            )
        )


ALIGNED_OPTIONS = ("batch_size", "exclude_first", "device", "dtype", "progress")


def activation_patching(model, clean: Tensor, corrupted: Tensor, **options) -> PatchingResult:
    """Patch over aligned clean / corrupted prompt tensors [N, pos] (`patch_aligned`): the options
    in `ALIGNED_OPTIONS` are the runner's that apply to aligned prompts (batch_size=8; positions
    [0, exclude_first) not scored, position 0 by default, 0 scores every position; device / dtype
    move the model first; progress shows a bar), the others go to `ActivationPatching`."""
    return patch_with(ActivationPatching, model, clean, corrupted, options)


def patch_with(cls, model, clean: Tensor, corrupted: Tensor, options: Dict) -> ProbeResult:
    """`patch_aligned(cls(**probe options), ...)` with the `ALIGNED_OPTIONS` among `options`; the
    runner's options that cut a corpus (seq_len, max_tokens, pad_id) are refused (TypeError)."""
    runner, probe = split_options(options, ALIGNED_OPTIONS)
    return patch_aligned(cls(**probe), model, clean, corrupted, **runner)


def patch_aligned(
    probe: ActivationPatching,
    model,
    clean: Tensor,
    corrupted: Tensor,
    *,
    batch_size: int = 8,
    exclude_first: int = 1,
    device=None,
    dtype=None,
    progress: bool = False,
) -> ProbeResult:
    """`probe.patch` (an `ActivationPatching` or a subclass) over aligned prompt tensors [N, pos] in
    batches of `batch_size` (each batch repeats the clean and corrupted runs), positions
    [0, exclude_first) not scored, the model moved to device / dtype first, under a bar counting the
    patched runs -> `probe.result()`."""
    from tqdm.auto import tqdm

    check_aligned(clean, corrupted)
    mask = position_mask(torch.ones(clean.shape, dtype=torch.bool), exclude_first)  # [N, pos]
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    probe.setup(model)
    starts = range(0, len(clean), batch_size)
    with tqdm(
        total=len(starts) * probe.n_runs(clean.shape[1]),
        desc=f"{probe.name} ({len(clean)} prompts)",
        unit="run",
        disable=not progress,
    ) as bar:
        for i in starts:
            rows = slice(i, i + batch_size)
            probe.patch(
                model,
                clean[rows].to(model.device),
                corrupted[rows].to(model.device),
                mask[rows].to(model.device),
                progress=bar.update,
            )
    return probe.result()
