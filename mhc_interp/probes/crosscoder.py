"""Which stream each feature of a sparse crosscoder over (layer, stream) sites lives in.

`train_crosscoder` (crosscoder_training.py) fits a `Crosscoder` (crosscoder_model.py) on model
activations; `analyze_crosscoder` / the `CrosscoderEval` probe assign each latent to the stream
holding more than tau of its decoder norm, else "shared" (thresholds relative to an even split,
`thresholds_for`), with explained variance and firing statistics. The maths: docs/crosscoder.md.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Probe, ProbeResult, masked_rows, register_result
from .crosscoder_buffer import InMemoryActivations
from .crosscoder_model import Crosscoder, CrosscoderConfig, as_activation_source
from .crosscoder_training import train_crosscoder
from .figure_helpers import annotate
from .sites import Site, resolve_sites, site_label, site_rows

__all__ = [
    "CrosscoderConfig",
    "Crosscoder",
    "train_crosscoder",
    "analyze_crosscoder",
    "CrosscoderResult",
    "CrosscoderEval",
    "match_decoder_directions",
    "thresholds_for",
    "DEFAULT_RELATIVE_THRESHOLDS",
    "MAIN_RELATIVE_THRESHOLD",
    "SHARED",
    "DEAD",
]

SHARED, DEAD = -1, -2  # assignment codes besides stream indices
# assignment thresholds as rho = (tau - 1/n) / (1 - 1/n): 0 = an even split over the n streams
DEFAULT_RELATIVE_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MAIN_RELATIVE_THRESHOLD = 1 / 3  # tau = 0.5 with 4 streams


def _even_share(n: int) -> float:
    """1/n, the share of a latent spread evenly over n streams (0 for one stream: no constraint)."""
    return 1.0 / n if n > 1 else 0.0


def _relative(tau, n: int):
    """rho = (tau - 1/n) / (1 - 1/n), the inverse of `thresholds_for`."""
    u = _even_share(n)
    return (tau - u) / (1 - u)


def thresholds_for(n_streams: int, relative: Union[float, Sequence[float]]):
    """Absolute share thresholds tau = 1/n + rho (1 - 1/n) for relative ones rho in [0, 1)
    (a float for a float, else a list). One stream (n = 1, every latent is its own): tau = rho."""
    rho = np.asarray(relative, dtype=float)
    if not ((rho >= 0) & (rho < 1)).all():
        raise ValueError(f"relative thresholds must lie in [0, 1), got {rho.tolist()}")
    u = _even_share(int(n_streams))
    return (u + rho * (1 - u)).tolist()


class _EvalStats:
    """Online statistics of a crosscoder over raw activations [T, S, d] (float64 sums):
    per-site squared error and variance (explained variance), firing counts, L0."""

    chunk = 4096  # rows encoded at a time

    def __init__(self, cc: Crosscoder, mode: Optional[str] = None):
        self.cc, self.mode = cc, mode
        zeros = partial(torch.zeros, dtype=torch.float64, device=cc.device)
        self.n = 0
        self.sq_err = zeros(cc.n_sites)  # [S]
        self.sum_x = zeros(cc.n_sites, cc.d_model)  # [S, d]
        self.sum_sq = zeros(cc.n_sites)  # [S]
        self.fires = zeros(cc.dict_size)  # [m]
        self.l0_sum = 0.0

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        cc = self.cc
        for lo in range(0, x.shape[0], self.chunk):
            xn = cc.normalize(x[lo : lo + self.chunk].to(cc.device, torch.float32))  # [T, S, d]
            f = cc.encode(xn, normalized=True, mode=self.mode)  # [T, m]
            err = xn - cc.decode(f)
            xd = xn.double()
            self.sq_err += err.double().pow(2).sum((0, 2))
            self.sum_x += xd.sum(0)
            self.sum_sq += xd.pow(2).sum((0, 2))
            active = f > 0
            self.fires += active.double().sum(0)
            self.l0_sum += float(active.sum())
            self.n += xn.shape[0]

    def summary(self) -> Dict[str, np.ndarray]:
        if self.n == 0:
            raise ValueError("crosscoder analysis saw no tokens")
        var = self.sum_sq - self.sum_x.pow(2).sum(-1) / self.n  # [S]
        ev = 1 - self.sq_err / var.clamp_min(1e-30)
        ev_total = 1 - self.sq_err.sum() / var.sum().clamp_min(1e-30)
        return {
            "explained_variance": ev.cpu().numpy(),
            "explained_variance_total": np.asarray(float(ev_total)),
            "firing_frequency": (self.fires / self.n).cpu().numpy(),
            "l0": np.asarray(self.l0_sum / self.n),
        }


def _structure(sites: Sequence[Site]) -> Tuple[List[str], np.ndarray, np.ndarray, int]:
    layers = list(dict.fromkeys(h for h, _ in sites))
    layer_of = np.array([layers.index(h) for h, _ in sites])
    stream_of = np.array([s for _, s in sites])
    return layers, layer_of, stream_of, int(stream_of.max()) + 1


def _resolve_thresholds(n: int, threshold: Optional[float], thresholds: Optional[Sequence[float]]):
    """(main tau, sorted swept taus) for n streams; defaults relative to 1/n (docs/crosscoder.md)."""
    main = thresholds_for(n, MAIN_RELATIVE_THRESHOLD) if threshold is None else float(threshold)
    swept = (
        thresholds_for(n, DEFAULT_RELATIVE_THRESHOLDS)
        if thresholds is None
        else [float(t) for t in thresholds]
    )
    swept = sorted(set(swept) | {main})
    u = _even_share(n)
    low = [t for t in swept if not u - 1e-12 <= t < 1]
    if low:
        raise ValueError(
            f"assignment thresholds must lie in [1/n, 1) = [{u:.3g}, 1) for {n} streams, got {low}: "
            f"the largest of n stream shares is at least 1/n, so a lower threshold labels no latent "
            f"'shared'; give relative ones with thresholds_for(n_streams, rho)"
        )
    return main, swept


def _result_meta(
    cc: Crosscoder,
    stats: Optional[_EvalStats],
    arrays: Dict[str, np.ndarray],
    layers: List,
    threshold: float,
    counts_at_threshold: np.ndarray,
    space: str,
) -> Dict[str, Any]:
    """The result's meta: sites and layers, the threshold, the group counts at it
    (counts_at_threshold [n + 2]: streams, shared, dead), the alive count (from arrays["dead"]),
    how dead was decided, and the crosscoder's training record."""
    sites, n = cc.sites, len(counts_at_threshold) - 2
    labels = [f"stream {s}" for s in range(n)] + ["shared", "dead"]
    meta = {
        "sites": [list(s) for s in sites],
        "site_labels": [site_label(s) for s in sites],
        "layers": layers,
        "n_streams": n,
        "threshold": threshold,
        "threshold_relative": _relative(threshold, n),
        "even_share": _even_share(n),
        "space": space,
        "count_labels": labels,
        "counts_at_threshold": {lab: int(c) for lab, c in zip(labels, counts_at_threshold)},
        "n_alive": int((~arrays["dead"]).sum()),
        "dict_size": cc.dict_size,
        "tokens_used": stats.n if stats is not None else 0,
        "dead_from": "evaluation tokens (never fired)"
        if stats is not None
        else f"training tracker (no firing in {cc.cfg.dead_after_tokens} tokens)",
        "crosscoder_config": cc.cfg.to_dict(),
        "training_steps": int(cc.steps),
        "training_tokens": int(cc.tokens_seen),
    }
    if stats is not None:
        meta.update({key: float(arrays[key]) for key in ("l0", "explained_variance_total")})
    return meta


def _build_result(
    cc: Crosscoder,
    stats: Optional[_EvalStats],
    threshold: Optional[float],
    thresholds: Optional[Sequence[float]],
    space: str,
    probe: str = "crosscoder",
) -> "CrosscoderResult":
    layers, layer_of, stream_of, n = _structure(cc.sites)
    threshold, thresholds = _resolve_thresholds(n, threshold, thresholds)
    L = len(layers)
    norms = cc.decoder_norms(space).double().cpu().numpy()  # [m, S]
    total = norms.sum(-1, keepdims=True)
    safe = np.where(total > 0, total, 1.0)
    stream_share = norms @ np.eye(n)[stream_of] / safe  # [m, n]: [m, S] @ one-hot [S, n]
    layer_share = norms @ np.eye(L)[layer_of] / safe  # [m, L]
    dead_train = cc.dead_mask().cpu().numpy()
    if stats is not None:
        arrays = stats.summary()
        dead = arrays["firing_frequency"] == 0
    else:
        arrays = {
            "explained_variance": np.full(cc.n_sites, np.nan),
            "explained_variance_total": np.asarray(np.nan),
        }
        dead = dead_train.copy()
    dead |= total[:, 0] == 0
    best = stream_share.argmax(-1)
    top = stream_share.max(-1)
    assignment = np.stack([np.where(dead, DEAD, np.where(top > t, best, SHARED)) for t in thresholds])
    counts = np.array(
        [[(a == code).sum() for code in [*range(n), SHARED, DEAD]] for a in assignment]
    )  # [n_thr, n + 2]
    main = thresholds.index(threshold)
    ev_grid = np.full((L, n), np.nan)
    ev_grid[layer_of, stream_of] = arrays["explained_variance"]
    # mean layer profile of the alive latents of each group (streams..., shared)
    profile = np.full((n + 1, L), np.nan)
    for g, code in enumerate([*range(n), SHARED]):
        sel = assignment[main] == code
        if sel.any():
            profile[g] = layer_share[sel].mean(0)
    arrays.update(
        decoder_norms=norms.astype(np.float32),
        stream_share=stream_share,
        layer_share=layer_share,
        max_share=top,
        assignment=assignment,
        thresholds=np.asarray(thresholds),
        thresholds_relative=_relative(np.asarray(thresholds), n),
        counts=counts,
        dead=dead,
        dead_train=dead_train,
        explained_variance_grid=ev_grid,
        layer_profile=profile,
        norm_factors=cc.norm_factors.detach().cpu().numpy(),
        site_stream=stream_of,
        site_layer=layer_of,
    )
    meta = _result_meta(cc, stats, arrays, layers, threshold, counts[main], space)
    return CrosscoderResult(probe=probe, arrays=arrays, meta=meta)


def analyze_crosscoder(
    crosscoder: Crosscoder,
    data=None,
    *,
    n_tokens: int = 65536,
    batch_size: int = 4096,
    threshold: Optional[float] = None,
    thresholds: Optional[Sequence[float]] = None,
    space: str = "normalized",
    mode: Optional[str] = None,
) -> "CrosscoderResult":
    """Feature-to-stream assignment and quality statistics of a trained crosscoder.

    Per latent i: decoder norms n_{i,s} = ||W_dec[i, s]|| (`space`="normalized", the default,
    compares sites in units of their mean norm sqrt(d); "raw" divides by c_s and so favours
    high-norm streams), stream share share_{i,t} = sum_{s in stream t} n_{i,s} / sum_s n_{i,s}
    [m, n], layer share [m, n_layers] (layers = distinct hooks), assignment = argmax_t share if
    max_t share > tau else SHARED (-1), dead latents DEAD (-2), for every tau in `thresholds`
    (plus `threshold`, the one in `meta["counts_at_threshold"]`). Both are absolute shares in
    [1/n, 1); by default tau = 1/n + rho (1 - 1/n) for rho in DEFAULT_RELATIVE_THRESHOLDS, and
    the main threshold rho = 1/3 (0.5 for 4 streams); see `thresholds_for`.

    data: None (dead = the training tracker; no explained variance), or activations (a tensor
    [N, S, d] / [N, L, n, d], an `ActivationBuffer`, any `ActivationSource`) of which `n_tokens`
    rows are used: then dead = never fired on them, and the explained variance per site
    1 - sum ||x^s - x^_s||^2 / sum ||x^s - mean x^s||^2, firing frequencies and L0 are reported.
    For a model corpus, `run_probes(model, CrosscoderEval(crosscoder), tokens)` does the same
    through the runner. mode: the `encode` mode (default: threshold for BatchTopK, relu for L1).
    """
    cc = crosscoder
    stats = None
    if data is not None:
        src = as_activation_source(data, sites=cc.sites)
        src.check_fits(cc.n_sites, cc.d_model)
        stats = _EvalStats(cc, mode)
        n_tokens = min(int(n_tokens), src.capacity) if isinstance(src, InMemoryActivations) else int(n_tokens)
        while stats.n < n_tokens:
            try:
                stats.update(src.next_batch(min(batch_size, n_tokens - stats.n, src.capacity)))
            except StopIteration:
                break
    return _build_result(cc, stats, threshold, thresholds, space)


class CrosscoderEval(Probe):
    """A probe that evaluates a trained crosscoder over a corpus through `run_probes` (position 0
    and padding masked by the runner) and returns its `CrosscoderResult` (see
    `analyze_crosscoder`). The crosscoder's sites must be hooks of the model."""

    name = "crosscoder"

    def __init__(
        self,
        crosscoder: Crosscoder,
        threshold: Optional[float] = None,
        thresholds: Optional[Sequence[float]] = None,
        space: str = "normalized",
        mode: Optional[str] = None,
    ):
        self.cc = crosscoder
        self.threshold, self.thresholds, self.space, self.mode = threshold, thresholds, space, mode
        self._stats: Optional[_EvalStats] = None

    def setup(self, model) -> None:
        resolve_sites(model, self.cc.sites)  # checks the sites against the model
        if model.cfg.d_model != self.cc.d_model:
            raise ValueError(f"the crosscoder has d_model {self.cc.d_model}, the model {model.cfg.d_model}")
        self._stats = _EvalStats(self.cc, self.mode)

    def hook_names(self, model) -> List[str]:
        return list(dict.fromkeys(h for h, _ in self.cc.sites))

    def update(self, acts: Dict[str, Tensor], mask: Tensor) -> None:
        self._stats.update(site_rows(acts, self.cc.sites, masked_rows(mask)))  # [T, S, d]

    def result(self) -> "CrosscoderResult":
        if self._stats is None:
            raise RuntimeError("CrosscoderEval.result called before setup(model)")
        return _build_result(
            self.cc, self._stats, self.threshold, self.thresholds, self.space, probe=self.name
        )


def match_decoder_directions(
    learned: Tensor, true: Tensor, alive: Optional[Union[Tensor, np.ndarray]] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """Hungarian matching of ground-truth directions true [F, S, d] (or [F, D]) to learned ones
    [m, S, d] by cosine of the flattened vectors. alive: [m] bool, the latents that may be
    matched (pass `~result["dead"]`: a dead latent never fires, so its decoder direction -
    however well aligned, e.g. left over from the initialisation - recovers nothing).
    Returns (index into the m latents of the matched one [F], its cosine [F]); with fewer
    candidates than true directions the unmatched ones get index -1 and cosine NaN.
    Uses scipy.optimize.linear_sum_assignment."""
    from scipy.optimize import linear_sum_assignment

    a, b = (torch.as_tensor(t).detach().double().cpu().flatten(1) for t in (learned, true))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"direction sizes differ: learned {a.shape[1]}, true {b.shape[1]}")
    cand = np.arange(a.shape[0])
    if alive is not None:
        alive = np.asarray(torch.as_tensor(alive).cpu(), dtype=bool)
        if alive.shape != (a.shape[0],):
            raise ValueError(f"alive must be a [{a.shape[0]}] bool mask, got shape {alive.shape}")
        cand = np.flatnonzero(alive)
    idx = np.full(b.shape[0], -1)
    sim = np.full(b.shape[0], np.nan)
    if cand.size == 0:
        return idx, sim
    cos = (F.normalize(b, dim=1) @ F.normalize(a[torch.as_tensor(cand)], dim=1).T).numpy()  # [F, candidates]
    rows, cols = linear_sum_assignment(-cos)
    idx[rows] = cand[cols]
    sim[rows] = cos[rows, cols]
    return idx, sim


# ------------------------------------------------------------------------------------ result
@register_result
class CrosscoderResult(ProbeResult):
    """Arrays: `stream_share` [m, n], `layer_share` [m, L], `max_share` [m], `decoder_norms`
    [m, S], `assignment` [n_thresholds, m] (stream index, -1 shared, -2 dead), `thresholds`,
    `counts` [n_thresholds, n + 2] (streams..., shared, dead), `dead` [m], `dead_train` [m],
    `explained_variance` [S] and `_grid` [L, n] (NaN where no site), `layer_profile` [n + 1, L]
    (mean layer share of the latents assigned to each stream / shared), `norm_factors` [S],
    `site_stream` / `site_layer` [S]; with evaluation data also `firing_frequency` [m], `l0`,
    `explained_variance_total`."""

    @property
    def n_streams(self) -> int:
        return int(self.meta["n_streams"])

    def _thr_index(self, threshold: Optional[float]) -> int:
        t = float(self.meta["threshold"] if threshold is None else threshold)
        thr = self["thresholds"]
        hit = np.flatnonzero(np.isclose(thr, t))
        if not hit.size:
            raise KeyError(f"threshold {t} was not swept; swept: {thr.tolist()}")
        return int(hit[0])

    def assignment_at(self, threshold: Optional[float] = None) -> np.ndarray:
        """[m] stream index, -1 (shared) or -2 (dead) at one swept threshold (default: main)."""
        return self["assignment"][self._thr_index(threshold)]

    def counts_at(self, threshold: Optional[float] = None) -> Dict[str, int]:
        row = self["counts"][self._thr_index(threshold)]
        return {lab: int(c) for lab, c in zip(self.meta["count_labels"], row)}

    def table(self) -> str:
        """Counts per stream / shared / dead for every swept threshold, as text."""
        labs = self.meta["count_labels"]
        n = self.n_streams
        lines = [
            f"{t:4.2f}  {_relative(t, n):4.2f}  " + " ".join(f"{int(c):9d}" for c in row)
            for t, row in zip(self["thresholds"], self["counts"])
        ]
        return "\n".join(
            ["tau   rho   " + " ".join(f"{l:>9s}" for l in labs)]
            + lines
            + [f"(rho = (tau - 1/n) / (1 - 1/n) with n = {n} streams: 0 = an even split, 1 = one stream)"]
        )

    def plot(self, threshold: Optional[float] = None, max_features: int = 2000):
        """{"stream_share": alive latents x streams heatmap sorted by assignment (features
        concentrating in one stream) + histogram of the max share, "assignment_counts": counts per
        stream at tau and against the tau sweep, "layer_profile": mean layer share per group and
        a latents x layers heatmap, "explained_variance": layers x streams, "firing": firing
        frequency histogram (with evaluation data)}."""
        n, a = self.n_streams, self.arrays
        ti = self._thr_index(threshold)
        tau = float(a["thresholds"][ti])
        assign = a["assignment"][ti]
        alive = np.flatnonzero(assign != DEAD)
        # order: by group (stream 0..n-1, then shared), then by decreasing max share
        group = np.where(assign[alive] == SHARED, n, assign[alive])
        order = alive[np.lexsort((-a["max_share"][alive], group))][:max_features]
        layers = [site_label(l) for l in self.meta["layers"]]
        figs = {
            "stream_share": _plot_stream_share(a, n, order, alive, tau),
            "assignment_counts": _plot_counts(a, n, ti, self.meta["count_labels"]),
            "layer_profile": _plot_layer_profile(a, n, order, layers),
            "explained_variance": _plot_explained_variance(a["explained_variance_grid"], layers),
        }
        if "firing_frequency" in a:
            figs["firing"] = _plot_firing(a, self.meta.get("tokens_used", "?"))
        return figs


def _share_heatmap(fig, ax, share: np.ndarray) -> None:
    """share [alive latents, streams or layers] as a heatmap with its colour bar (none without rows)."""
    if len(share):
        im = ax.imshow(share, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax, label="decoder-norm share")


def _plot_stream_share(a: Dict[str, np.ndarray], n: int, order: np.ndarray, alive: np.ndarray, tau: float):
    """Alive latents [n_alive] (rows, in `order`) x streams share heatmap + histogram of the max share."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 1.3]})
    _share_heatmap(fig, axes[0], a["stream_share"][order])
    axes[0].set(
        xticks=range(n),
        xlabel="stream",
        ylabel=f"alive latents ({alive.size}), sorted by assignment",
        title="decoder-norm share per stream",
    )
    if alive.size:
        axes[1].hist(a["max_share"][alive], bins=40, range=(0, 1), color="C0")
    axes[1].axvline(tau, color="k", ls="--", lw=1, label=f"tau = {tau:g}")
    axes[1].axvline(1 / n, color="grey", ls=":", lw=1, label=f"1/n = {1 / n:.2f}")
    axes[1].set(xlabel="max_s stream share", ylabel="latents", title="how concentrated is each feature?")
    axes[1].legend(fontsize=8)
    return fig


def _plot_counts(a: Dict[str, np.ndarray], n: int, ti: int, labels: Sequence[str]):
    """Counts per stream / shared / dead at threshold index `ti`, and against the tau sweep."""
    import matplotlib.pyplot as plt

    u = _even_share(n)
    tau = float(a["thresholds"][ti])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    axes[0].bar(
        range(n + 2),
        a["counts"][ti],
        color=[f"C{s}" for s in range(n)] + ["grey", "lightgrey"],  # CN: the colour cycle's N-th
    )
    axes[0].set_xticks(range(n + 2), labels, rotation=30, fontsize=8)
    axes[0].set(ylabel="latents", title=f"assignment at tau = {tau:.3g} (rho = {_relative(tau, n):.2f})")
    for s in range(n):
        axes[1].plot(a["thresholds"], a["counts"][:, s], marker=".", label=f"stream {s}")
    axes[1].plot(a["thresholds"], a["counts"][:, n], marker=".", color="grey", label="shared")
    axes[1].set(xlabel="threshold tau (share of the top stream)", ylabel="latents")
    top = axes[1].secondary_xaxis("top", functions=(lambda t: _relative(t, n), lambda r: u + r * (1 - u)))
    top.set_xlabel(f"rho = (tau - 1/n) / (1 - 1/n), n = {n}", fontsize=8)
    axes[1].legend(fontsize=7)
    axes[1].set_title("threshold sweep", pad=30)
    return fig


def _plot_layer_profile(a: Dict[str, np.ndarray], n: int, order: np.ndarray, layers: Sequence[str]):
    """Mean layer share per assigned group (streams..., shared) + the latents x layers heatmap."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for g in range(n + 1):
        if np.isfinite(a["layer_profile"][g]).all():
            axes[0].plot(
                range(len(layers)),
                a["layer_profile"][g],
                marker=".",
                color="grey" if g == n else f"C{g}",
                label="shared" if g == n else f"stream {g}",
            )
    axes[0].set(ylabel="mean layer share", title="layer profile per assigned group")
    axes[0].legend(fontsize=7)
    _share_heatmap(fig, axes[1], a["layer_share"][order])
    axes[1].set(ylabel="alive latents (sorted as above)", title="layer share")
    for ax in axes:
        ax.set_xticks(range(len(layers)), layers, rotation=30, fontsize=7)
    return fig


def _plot_explained_variance(grid: np.ndarray, layers: Sequence[str]):
    """Explained variance per site, grid [layers, streams] (NaN where no site)."""
    import matplotlib.pyplot as plt

    n = grid.shape[1]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * n, 1.2 + 0.45 * len(layers)))
    im = ax.imshow(
        grid,
        vmin=min(0.0, float(np.nanmin(grid))) if np.isfinite(grid).any() else 0,
        vmax=1,
        cmap="viridis",
        aspect="auto",
    )
    annotate(ax, im, grid, fontsize=7)
    ax.set(xticks=range(n), xlabel="stream", title="explained variance per site")
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    fig.colorbar(im, ax=ax, label="explained variance")
    return fig


def _plot_firing(a: Dict[str, np.ndarray], tokens_used):
    """Histogram of log10 firing frequency of the latents that fired."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    freq = a["firing_frequency"]
    live = freq[freq > 0]
    if live.size:
        ax.hist(np.log10(live), bins=40, color="C0")
    ax.set(
        xlabel="log10 firing frequency",
        ylabel="latents",
        title=f"{int((freq == 0).sum())} of {freq.size} latents never fired "
        f"({tokens_used} tokens); L0 {float(a['l0']):.1f}",
    )
    return fig
