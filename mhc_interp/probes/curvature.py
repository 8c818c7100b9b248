"""Token-trajectory curvature per residual stream (and for the stream sum), per site.

Hosseini & Fedorenko 2023 (NeurIPS; after Hénaff, Goris & Simoncelli 2019). For one sequence
and one representation x_t ∈ R^d, t over the valid (unmasked) positions:

    v_t     = x_{t+1} - x_t                       (t and t+1 both valid)
    c_t     = angle(v_t, v_{t+1}) in degrees      (|v_t|, |v_{t+1}| > eps; as 2 atan2(|û - ŵ|, |û + ŵ|))
    κ(seq)  = mean_t c_t
    mean[l, k] = (1/N) Σ_i κ_i,   sem[l, k] = sqrt( (Σ_i κ_i² - N mean²) / (N - 1) ) / sqrt(N)

per site l and column k (stream s = 0..n-1, then the stream sum), from running float64 sums, and
`change_from_first = mean - mean[0]`. Lower = straighter (a line gives 0°). Controls in every
result: i.i.d. points 120°, a random walk 90° (exact), and the same windows with shuffled tokens
(`shuffled_*`, on the first `control_fraction` of each batch).

Details (masking, zero-length steps, the baselines' derivations, the control's cost):
docs/probes.md#curvature-curvaturepy
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .base import Probe, ProbeResult, ReportSection, register_probe, register_result
from .sites import SiteSpec, check_site_names, check_site_spec, forward_sites, site_hooks, site_label

__all__ = [
    "Curvature",
    "CurvatureResult",
    "sequence_curvatures",
    "step_angles",
    "shuffle_valid_positions",
    "IID_POINTS_DEG",
    "RANDOM_WALK_DEG",
]

IID_POINTS_DEG = 120.0  # mean turning angle of i.i.d. points (exact, see the module docstring)
RANDOM_WALK_DEG = 90.0  # mean turning angle of a random walk with symmetric increments (exact)
_BASELINES = {"iid_points": IID_POINTS_DEG, "random_walk": RANDOM_WALK_DEG}


# ------------------------------------------------------------------------------- the maths
def step_angles(x: Tensor, mask: Optional[Tensor] = None, eps: float = 1e-12) -> Tuple[Tensor, Tensor]:
    """Turning angles of the trajectories x[b, :, ...] (over the position axis 1), in degrees.

    x: [batch, pos, ..., d] (any extra axes between pos and d are independent trajectories);
    mask: [batch, pos] bool, True = valid position (default: all valid).
    Returns (angles, valid), both [batch, pos - 2, ...]: angles[:, t] = c_t, the angle between
    v_t = x_{t+1} - x_t and v_{t+1} = x_{t+2} - x_{t+1} (float64, 0 where not valid); valid[:, t]
    is True iff positions t, t+1, t+2 are all valid and |v_t|, |v_{t+1}| > eps.
    Raises FloatingPointError if a valid position holds NaN/inf.
    """
    if x.ndim < 3:
        raise ValueError(f"x must be [batch, pos, ..., d], got shape {tuple(x.shape)}")
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    elif mask.shape != x.shape[:2]:
        raise ValueError(f"mask must be [batch, pos] = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
    mask = mask.to(device=x.device, dtype=torch.bool)
    if x.device.type == "mps":  # no float64 there
        x, mask = x.cpu(), mask.cpu()
    x = x.to(torch.float64)
    m = mask.view(mask.shape + (1,) * (x.ndim - 2))
    x = x.masked_fill(~m, 0)  # masked values unused
    if not torch.isfinite(x).all():
        raise FloatingPointError("curvature: non-finite values (NaN/inf) at valid positions of the input")
    v = x[:, 1:] - x[:, :-1]  # [batch, pos-1, ..., d]
    norm = torch.linalg.vector_norm(v, dim=-1)  # [batch, pos-1, ...]
    step_ok = (mask[:, 1:] & mask[:, :-1]).view(mask.shape[0], -1, *(1,) * (norm.ndim - 2))
    step_ok = step_ok & (norm > eps)
    valid = step_ok[:, :-1] & step_ok[:, 1:]  # [batch, pos-2, ...]
    # arccos(clamp(cos)) loses accuracy near 0 and 180 degrees (an exactly straight line comes out
    # at ~1e-6 degrees); the equivalent 2 atan2(|u - w|, |u + w|) on unit vectors u, w (Kahan) is
    # accurate everywhere. Zero-length steps get a dummy norm of 1; their angles are discarded.
    u = v / norm.masked_fill(~step_ok, 1).unsqueeze(-1)
    a, b = u[:, :-1], u[:, 1:]
    theta = 2.0 * torch.atan2(
        torch.linalg.vector_norm(a - b, dim=-1), torch.linalg.vector_norm(a + b, dim=-1)
    )
    return torch.rad2deg(theta).masked_fill_(~valid, 0), valid


def sequence_curvatures(
    x: Tensor, mask: Optional[Tensor] = None, eps: float = 1e-12, return_counts: bool = False
):
    """Per-sequence curvature κ = mean over valid t of the turning angle c_t (degrees, float64).

    x: [batch, pos, ..., d]; mask: [batch, pos] bool (True = valid; default all valid).
    Returns κ [batch, ...] with NaN where a trajectory has no valid angle (see `step_angles` for
    which angles are valid); with return_counts=True also the number of angles averaged
    [batch, ...] (int64).
    """
    angles, valid = step_angles(x, mask, eps)
    count = valid.sum(1)
    kappa = angles.sum(1) / count  # 0 / 0 = NaN where no angle is valid
    return (kappa, count) if return_counts else kappa


def shuffle_valid_positions(tokens: Tensor, mask: Tensor, generator: torch.Generator) -> Tensor:
    """tokens [batch, pos] with, in each row, the tokens at the mask's True positions permuted
    among those positions (a fresh permutation per row from `generator`); the other positions keep
    their tokens. Returns a new tensor."""
    out = tokens.clone()
    valid = mask.to(torch.bool).cpu()
    for b in range(tokens.shape[0]):
        idx = valid[b].nonzero().squeeze(1)
        perm = idx[torch.randperm(len(idx), generator=generator)]
        out[b, idx.to(out.device)] = tokens[b, perm.to(tokens.device)]
    return out


# ------------------------------------------------------------------------------- the probe
class _Moments:
    """Running float64 Σκ, Σκ², N, skipped-sequence and angle counts, each [n_sites, n_cols]."""

    def __init__(self, shape):
        self.sum = np.zeros(shape)  # float64
        self.sumsq = np.zeros(shape)
        self.count = np.zeros(shape, np.int64)
        self.skipped = np.zeros(shape, np.int64)
        self.angles = np.zeros(shape, np.int64)

    def add(self, kappa: np.ndarray, n_ang: np.ndarray) -> None:
        """kappa, n_ang [n_sites, batch, n_cols] (kappa NaN = no valid angle)."""
        ok = ~np.isnan(kappa)
        k0 = np.where(ok, kappa, 0.0)
        self.sum += k0.sum(1)
        self.sumsq += (k0 * k0).sum(1)
        self.count += ok.sum(1)
        self.skipped += (~ok).sum(1)
        self.angles += n_ang.sum(1)

    def mean_sem(self):
        n = self.count.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, self.sum / np.maximum(n, 1), np.nan)
            var = np.where(n > 1, (self.sumsq - n * mean * mean) / np.maximum(n - 1, 1), np.nan)
            sem = np.sqrt(np.maximum(var, 0.0)) / np.sqrt(n)
        return mean, np.where(n > 1, sem, np.nan)


@register_probe
class Curvature(Probe):
    """Token-trajectory curvature (degrees) per (site, stream) and for the stream sum, with its
    controls (see the module docstring).

    Curvature(sites=None (a `sites.py` spec, default "layers"), eps=1e-12, shuffled_control=True,
    control_fraction=0.25, seed=0). Through `run_probes` it reads its sites from the shared forward
    (`update`) and, with `shuffled_control`, runs one forward of its own per batch (`own_runs`):
    its first ceil(control_fraction x batch) windows with each window's valid tokens permuted
    (seeded). `update` alone gives no control. State: per accumulator (real, shuffled) three
    float64 arrays (Σκ, Σκ², N) plus skipped-sequence and angle counts, each
    [n_sites, n_streams + 1]; it does not grow with the corpus. Without `setup(model)`, explicit
    hook names are required and n_streams is read from the first batch (handy for feeding
    synthetic activations to `update`).
    """

    name = "curvature"
    report = ReportSection(
        "How straight the token trajectories are",
        order=40,
        captions={
            "curvature": "Token-trajectory curvature per stream and for the stream sum (degrees; lower = straighter), "
            "with its controls: the same windows with their tokens shuffled (dotted), i.i.d. points "
            "(120°, exact) and a random walk (90°, exact)."
        },
    )

    def __init__(
        self,
        sites: SiteSpec = None,
        eps: float = 1e-12,
        shuffled_control: bool = True,
        control_fraction: float = 0.25,
        seed: int = 0,
    ):
        self.sites = check_site_spec(sites, "curvature")
        self.site_names: Optional[List[str]] = (
            check_site_names(self.sites, "curvature") if isinstance(self.sites, list) else None
        )
        if not eps >= 0:
            raise ValueError(f"curvature: eps must be >= 0, got {eps}")
        self.eps = float(eps)
        if not 0 < control_fraction <= 1:
            raise ValueError(f"curvature: control_fraction must be in (0, 1], got {control_fraction}")
        self.shuffled_control = bool(shuffled_control)
        self.control_fraction = float(control_fraction)
        self.seed = int(seed)
        self.n_streams: Optional[int] = None
        self._main: Optional[_Moments] = None
        self._shuffled: Optional[_Moments] = None
        self._max_valid: Optional[Tensor] = None  # [] most valid positions in one sequence (no sync)
        self._gen = torch.Generator().manual_seed(self.seed)

    # --- set-up
    def setup(self, model) -> None:
        self.site_names = site_hooks(model, self.sites, "curvature")
        self._gen = torch.Generator().manual_seed(self.seed)
        self._max_valid = None
        self._init_state(model.cfg.n_streams)

    def hook_names(self, model) -> List[str]:
        if self.site_names is None:
            self.setup(model)
        return list(self.site_names)

    def _init_state(self, n_streams: int) -> None:
        self.n_streams = int(n_streams)
        shape = (len(self.site_names), self.n_streams + 1)
        self._main = _Moments(shape)
        self._shuffled = _Moments(shape) if self.shuffled_control else None

    def state_nbytes(self) -> int:
        """Bytes held by the running state (constant over batches)."""
        return sum(
            a.nbytes for acc in (self._main, self._shuffled) if acc is not None for a in vars(acc).values()
        )

    # --- streaming
    def own_runs(self, model, tokens: Tensor, mask: Tensor) -> None:
        """With `shuffled_control`: the curvature of the batch's first ceil(control_fraction x batch)
        windows with their valid tokens permuted (tokens, mask [batch, pos]; after `update` has
        taken the batch as given)."""
        if not self.shuffled_control:
            return
        if self.site_names is None or self._main is None:
            self.setup(model)
        k = math.ceil(self.control_fraction * len(tokens))
        tokens, mask = tokens[:k], mask[:k]
        shuffled = shuffle_valid_positions(tokens, mask, self._gen)
        self._shuffled.add(*self._batch_curvatures(forward_sites(model, shuffled, self.site_names), mask))

    def update(self, acts: Dict[str, Tensor], mask: Tensor) -> None:
        """Accumulate the curvature of activations {site: [batch, pos, n_streams, d]} (no control)."""
        if self.site_names is None:
            raise RuntimeError("curvature: call setup(model) first, or construct with explicit hook names")
        moments = self._batch_curvatures(acts, mask)  # sets up the state on a first batch without setup()
        self._main.add(*moments)
        if mask.numel():
            most = mask.sum(1).max()
            self._max_valid = most if self._max_valid is None else torch.maximum(self._max_valid, most)

    def _batch_curvatures(self, acts: Dict[str, Tensor], mask: Tensor):
        """Per-sequence κ and angle counts, each [n_sites, batch, n_streams + 1] (numpy)."""
        missing = [n for n in self.site_names if n not in acts]
        if missing:
            raise KeyError(f"curvature: activations missing for sites {missing}")
        per_site = []  # (κ, angle counts) [batch, n + 1] per site, kept on the device: read back once per batch
        for name in self.site_names:
            x = acts[name]
            if x.ndim != 4:
                raise ValueError(
                    f"curvature: {name!r} must be [batch, pos, n_streams, d_model], got {tuple(x.shape)}"
                )
            if self._main is None:
                self._init_state(x.shape[2])
            if x.shape[2] != self.n_streams:
                raise ValueError(f"curvature: {name!r} has {x.shape[2]} streams, expected {self.n_streams}")
            mask_x = mask.to(device=x.device, dtype=torch.bool)
            cols, stream_sum = [], 0  # one column at a time (bounds float64 memory)
            for s in range(self.n_streams):
                xs = x[:, :, s].to(torch.float64)
                stream_sum = stream_sum + xs
                cols.append(sequence_curvatures(xs, mask_x, self.eps, return_counts=True))
            cols.append(sequence_curvatures(stream_sum, mask_x, self.eps, return_counts=True))
            per_site.append([torch.stack(col, 1) for col in zip(*cols)])
        here = per_site[0][0].device  # (a NaN / inf at a valid position raises in `step_angles`)
        return tuple(torch.stack([p[i].to(here) for p in per_site]).cpu().numpy() for i in (0, 1))

    def result(self) -> "CurvatureResult":
        if self._main is None:
            raise RuntimeError("curvature: no batch was seen")
        if not self._main.count.any():
            raise ValueError(
                f"curvature: no sequence has a turning angle. Curvature needs >= 3 consecutive valid "
                f"positions per sequence (two steps) after the excluded first position(s) and padding; "
                f"the longest sequence had {int(self._max_valid or 0)} valid position(s). Use longer windows "
                f"(or a smaller exclude_first)."
            )
        mean, sem = self._main.mean_sem()
        columns = [f"stream {s}" for s in range(self.n_streams)] + ["sum"]
        labels = [site_label(s) for s in self.site_names]
        empty = [f"{labels[i]}/{columns[k]}" for i, k in zip(*np.nonzero(self._main.count == 0))]
        if empty:
            warnings.warn(
                f"curvature: no valid angle (every step of zero length?) at {empty}; their curvature is NaN"
            )
        acc = self._main
        arrays = dict(
            mean=mean,
            sem=sem,
            n_sequences=acc.count.copy(),
            n_skipped=acc.skipped.copy(),
            n_angles=acc.angles.copy(),
            change_from_first=mean - mean[:1],
        )
        if self._shuffled is not None and self._shuffled.count.any():
            s_mean, s_sem = self._shuffled.mean_sem()
            arrays.update(
                shuffled_mean=s_mean, shuffled_sem=s_sem, shuffled_n_sequences=self._shuffled.count.copy()
            )
        return CurvatureResult(
            probe=self.name,
            arrays=arrays,
            meta=dict(
                site_names=list(self.site_names),
                site_labels=labels,
                columns=columns,
                n_streams=self.n_streams,
                eps=self.eps,
                units="degrees",
                sites=self.sites if isinstance(self.sites, (str, int)) else "explicit",
                baselines=dict(_BASELINES),
                shuffled_control="shuffled_mean" in arrays,
                control_fraction=self.control_fraction,
                shuffle_seed=self.seed,
            ),
        )


@register_result
class CurvatureResult(ProbeResult):
    """arrays: `mean`, `sem` (degrees), `n_sequences`, `n_skipped` (sequences without a valid
    angle), `n_angles`, `change_from_first` (= mean - mean[0]); with the shuffled-token control
    `shuffled_mean`, `shuffled_sem`, `shuffled_n_sequences`; all [n_sites, n_streams + 1],
    columns = streams 0..n-1 then the stream sum. meta: `site_names`, `site_labels`, `columns`,
    `baselines` ({"iid_points": 120.0, "random_walk": 90.0}, degrees)."""

    def plot(self, ax=None, change: bool = False, baseline: bool = True, **kwargs):
        """Curvature (degrees) vs site, one line per stream plus the stream sum, error bars = SEM.
        change=True plots `change_from_first` instead. baseline: draw the controls - the i.i.d.
        points (120°) and random-walk (90°) lines and, if computed, the shuffled-token control of
        every column (dotted, same colour; with change=True its own change from the first site)."""
        import matplotlib.pyplot as plt

        ax = plt.subplots(figsize=kwargs.pop("figsize", (7, 4)))[1] if ax is None else ax
        y = self["change_from_first" if change else "mean"]
        xs = np.arange(y.shape[0])
        columns = self.meta.get("columns") or [f"col {k}" for k in range(y.shape[1])]
        shuffled = self.arrays.get("shuffled_mean") if baseline else None
        for k, label in enumerate(columns):
            is_sum = k == y.shape[1] - 1
            line = ax.errorbar(
                xs,
                y[:, k],
                yerr=self["sem"][:, k],
                label=label,
                capsize=3,
                marker="o",
                ms=3,
                color="black" if is_sum else None,
                linestyle="--" if is_sum else "-",
            )
            if shuffled is not None:
                ys = shuffled[:, k] - (shuffled[0, k] if change else 0.0)
                ax.plot(
                    xs,
                    ys,
                    linestyle=":",
                    linewidth=1.2,
                    color=line.lines[0].get_color(),
                    label="shuffled-token control (dotted)" if k == 0 else None,
                )
        if baseline and not change:
            base = self.meta.get("baselines") or _BASELINES
            for key, style, what in (
                ("iid_points", (0, (1, 3)), "i.i.d. points"),
                ("random_walk", "-.", "random walk"),
            ):
                ax.axhline(
                    base[key], color="grey", linestyle=style, linewidth=1, label=f"{what} ({base[key]:g}°)"
                )
        labels = self.meta.get("site_labels") or self.meta.get("site_names") or [str(i) for i in xs]
        ax.set_xticks(
            xs, labels, rotation=45 if len(labels) > 6 else 0, ha="right" if len(labels) > 6 else "center"
        )
        ax.set(
            xlabel="site",
            ylabel="curvature change vs first site (degrees)" if change else "curvature (degrees)",
            title="token-trajectory curvature (mean ± SEM over sequences)",
        )
        ax.legend(fontsize="small")
        ax.figure.tight_layout()
        return ax.figure
