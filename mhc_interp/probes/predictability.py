"""Cross-stream predictability: per site, how well stream j is predicted from stream i by a linear
map (ridge regression), as held-out R^2 - an [n, n] matrix per site and its trend over depth.

Sample. The probe keeps a bounded sample of tokens (the same tokens at every site):
`sampling="reservoir"` (default) - a uniform random sample of `max_tokens` of all the masked
tokens seen (Vitter's algorithm R, seeded); `"first"` - the first `max_tokens`. Memory is fixed
up front: max_tokens x n_sites x n_streams x d_model x 4 bytes (float32), e.g. 4096 tokens x 13
sites x 4 streams x 768 = 655 MB for a 12-layer GPT-2-small-sized model; `meta["sample_bytes"]`
reports it. Lower `max_tokens` or choose fewer `sites` for big models.

Fit (in `result()`, float64): the sample is split once into train / test tokens (`test_fraction`,
seeded, the same split for every site and pair). For source stream i: features X_i standardised
with the train mean / std; targets every stream Y_j, centred with the train mean; ridge with an
efficient leave-one-out choice of alpha per target dimension (scikit-learn's `RidgeCV`, written out
in torch on one SVD per source so it runs on the model's device) fits all target streams at once. Held-out R^2 of target j from source i, pooled over its d dimensions:

    r2[site, i, j] = 1 - sum_test ||y_j - yhat_j||^2 / sum_test ||y_j - mean_test(y_j)||^2

(scikit-learn's `r2_score(..., multioutput="variance_weighted")`). 1 = a linear function of
stream i; ~0 = nothing linear to learn (slightly negative from estimation noise); the diagonal is
a stream predicting itself (~1 when the training tokens well outnumber d_model, a sanity check;
with fewer tokens than dimensions even the identity cannot be learned and every R^2 drops). A target stream with no variance on the test
tokens gives NaN. `mean_offdiag[site]` = mean over i != j: the trend over depth.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .base import (
    Probe,
    ProbeResult,
    ReportSection,
    masked_rows,
    register_probe,
    register_result,
    require_streams,
)
from .sites import SiteSpec, check_site_spec, evenly_spaced, site_hooks, site_label, site_rows

if TYPE_CHECKING:
    from ..contract import MultiStreamModel

__all__ = ["CrossStreamPredictability", "PredictabilityResult", "ridge_r2_matrix", "predictability_sites"]

DEFAULT_ALPHAS = tuple(np.logspace(-3, 4, 8))
_OFFDIAG = {"mean": np.nanmean, "min": np.nanmin, "max": np.nanmax}  # the summaries over i != j
_LOO_BYTES = 256 * 2**20  # the leave-one-out residuals of this many bytes per batched GEMM


def predictability_sites(model: "MultiStreamModel", sites: SiteSpec = None) -> List[str]:
    """Hook names of a site spec (`sites.py`'s vocabulary; default "layers")."""
    return site_hooks(model, sites, "predictability")


def ridge_r2_matrix(x, train, test, alphas: Sequence[float] = DEFAULT_ALPHAS, device=None) -> np.ndarray:
    """x [tokens, n_streams, d] -> held-out R^2 [source i, target j] (see the module docstring), in
    float64 on `device` (default: x's). The fit is scikit-learn's `RidgeCV(alphas,
    alpha_per_target=True, fit_intercept=False)` written out on one thin SVD per source stream,
    X = U S V^T, so that every alpha and target costs two GEMMs and runs on a GPU:

      leave-one-out residuals  e_alpha = (G^-1 y) / diag(G^-1),   G = X X^T + alpha I,
      G^-1 = U diag(1 / (s^2 + alpha)) U^T + (I - U U^T) / alpha,
      per target the alpha of least sum e^2 (the first of equals), then
      W = V diag(s / (s^2 + alpha_t)) U^T y and yhat_test = X_test W.

    Batched so that a fit is a few large operations, not hundreds of small ones: every source's
    standardisation and SVD at once, every alpha's residuals in one batched GEMM per source
    (alpha G^-1 y = (I - U U^T) y + U (alpha w U^T y), as many alphas at a time as fit in 256 MiB).
    """
    x = torch.as_tensor(x, dtype=torch.float64, device=device)
    tr = torch.as_tensor(np.asarray(train), device=x.device)
    te = torch.as_tensor(np.asarray(test), device=x.device)
    n, d = x.shape[1], x.shape[2]
    Y = x.reshape(len(x), n * d)
    y_mean = Y[tr].mean(0)
    Y_train, Y_test = Y[tr] - y_mean, Y[te] - y_mean  # [m, n d], [t, n d]
    sst = ((Y_test - Y_test.mean(0)) ** 2).reshape(len(te), n, d).sum((0, 2))  # [n]
    # every source stream at once: standardise with the train mean / std, one batched thin SVD
    X = x.transpose(0, 1)  # [n, tokens, d]
    X_tr, X_te = X[:, tr], X[:, te]
    mu, sd = X_tr.mean(1, keepdim=True), X_tr.std(1, unbiased=False, keepdim=True)
    scale = X.abs().amax((1, 2), keepdim=True).clamp_min(1.0)
    sd = sd.masked_fill(~(sd > 1e-12 * scale), float("inf"))
    X_train, X_test = (X_tr - mu) / sd, (X_te - mu) / sd  # constant features -> 0
    U, sv, Vh = torch.linalg.svd(X_train, full_matrices=False)  # [n, m, r], [n, r], [n, r, d]
    UtY = U.transpose(1, 2) @ Y_train  # [n, r, targets]
    u2, s2 = U**2, sv**2
    a = torch.tensor([float(v) for v in alphas], dtype=torch.float64, device=x.device)  # [A]
    w = 1.0 / (s2[:, None, :] + a[None, :, None])  # [n, A, r]
    # diag(G^-1)^-2 for every source and alpha: [n, A, m]
    inv_d2 = (w @ u2.transpose(1, 2) + (1.0 - u2.sum(2))[:, None, :] / a[None, :, None]).pow_(-2)
    m_tr, T = Y_train.shape
    per_chunk = max(1, min(len(a), _LOO_BYTES // max(1, 2 * m_tr * T * 8)))  # alphas per batched GEMM
    out = torch.full((n, n), float("nan"), dtype=torch.float64, device=x.device)
    for i in range(n):
        outside = Y_train - U[i] @ UtY[i]  # (I - U U^T) y  [m, targets]
        err = torch.empty(len(a), T, dtype=torch.float64, device=x.device)
        for lo in range(0, len(a), per_chunk):
            ak = a[lo : lo + per_chunk]
            k = len(ak)
            # alpha G^-1 y = outside + U (alpha w UtY), k alphas in one batched GEMM  [k, m, targets]
            g = torch.baddbmm(
                outside.expand(k, -1, -1),
                U[i].expand(k, -1, -1),
                (ak[:, None] * w[i, lo : lo + k])[:, :, None] * UtY[i],
            )
            # leave-one-out error: sum_m (G^-1 y / diag G^-1)^2  [k, targets]
            err[lo : lo + k] = (
                torch.bmm(inv_d2[i, lo : lo + k, None, :], g.square_())[:, 0] / (ak * ak)[:, None]
            )
        # per target the alpha of least error, the first of equals (argmin's first minimum)
        best_alpha = a[torch.nan_to_num(err, nan=float("inf")).argmin(0)]  # [targets]
        coef = Vh[i].T @ (sv[i, :, None] / (s2[i, :, None] + best_alpha[None, :]) * UtY[i])  # [d, targets]
        sse = ((Y_test - X_test[i] @ coef) ** 2).reshape(len(te), n, d).sum((0, 2))
        out[i] = (1 - sse / sst).masked_fill(~(sst > 0), float("nan"))
    return out.cpu().numpy()


@register_probe
class CrossStreamPredictability(Probe):
    """Cross-stream linear predictability (held-out ridge R^2) per site; see the module docstring.

    sites: a site spec (`sites.py`; default "layers"). max_tokens: sample size (memory bound).
    sampling: "reservoir" | "first". test_fraction: held-out share. alphas: RidgeCV grid.
    seed: reservoir and split randomness. min_tokens: refuse to fit on fewer sampled tokens.
    """

    name = "predictability"
    report = ReportSection(
        "How well one stream predicts another (ridge R²)",
        order=30,
        min_streams=2,
        captions={
            "matrices": "Held-out ridge R^2 of stream j (columns) predicted linearly from stream i (rows), per layer: "
            "a complement to CKA that is sensitive to scale.",
            "trend": "Mean off-diagonal cross-stream R^2 over depth.",
        },
    )

    @classmethod
    def for_report(cls, cfg) -> "CrossStreamPredictability":
        return cls(max_tokens=cfg.predictability_tokens)

    def __init__(
        self,
        sites: SiteSpec = None,
        max_tokens: int = 4096,
        sampling: str = "reservoir",
        test_fraction: float = 0.25,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        seed: int = 0,
        min_tokens: int = 20,
    ):
        if sampling not in ("reservoir", "first"):
            raise ValueError(f"sampling must be 'reservoir' or 'first', got {sampling!r}")
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        if int(max_tokens) < max(int(min_tokens), 4):
            raise ValueError(f"max_tokens={max_tokens} is below min_tokens={min_tokens}")
        if not len(alphas) or min(alphas) <= 0:
            raise ValueError(f"alphas must be a non-empty list of positive numbers, got {alphas}")
        self.sites_spec = check_site_spec(sites, "predictability")
        self.max_tokens = int(max_tokens)
        self.sampling = sampling
        self.test_fraction = float(test_fraction)
        self.alphas = tuple(float(a) for a in alphas)
        self.seed = int(seed)
        self.min_tokens = int(min_tokens)

    def setup(self, model) -> None:
        require_streams(model, self.name)
        self.sites = predictability_sites(model, self.sites_spec)
        self.n_streams, self.d_model = model.cfg.n_streams, model.cfg.d_model
        self.hyper_conn_type = model.cfg.hyper_conn_type
        self.device = model.device  # where the ridge fits run (float64)
        self.sample: Optional[Tensor] = None  # [max_tokens, n_sites, n, d] float32, allocated lazily
        self.filled = 0  # slots in use
        self.seen = 0  # masked tokens seen
        self.gen = torch.Generator().manual_seed(self.seed)

    def hook_names(self, model) -> List[str]:
        return self.sites

    def update(self, acts: Dict[str, Tensor], mask: Tensor) -> None:
        first = acts[self.sites[0]]
        masked = masked_rows(mask, first.device)  # [n_tok]
        n_tok = len(masked)
        if n_tok == 0:
            return
        if self.sample is None:
            self.sample = torch.zeros(
                self.max_tokens, len(self.sites), self.n_streams, self.d_model, dtype=torch.float32
            )
        # decide on the host which of this batch's tokens enter which slot; only those rows are
        # gathered on the device and copied back (not every masked row of every site)
        take = min(n_tok, self.max_tokens - self.filled)  # the free slots first (both schemes)
        local, slots = list(range(take)), []  # batch rows to keep; reservoir slots of those past `take`
        self.filled += take
        if self.sampling == "reservoir" and take < n_tok:
            # algorithm R: token number t (0-based, t >= max_tokens) replaces slot j ~ U{0..t} if j < max_tokens
            t = torch.arange(self.seen + take, self.seen + n_tok, dtype=torch.float64)
            j = (torch.rand(len(t), generator=self.gen, dtype=torch.float64) * (t + 1)).floor().long()
            hit = (j < self.max_tokens).nonzero()[:, 0].numpy()
            # a later token that picks the same slot wins: keep the last occurrence per slot
            _, last = np.unique(j[hit].numpy()[::-1], return_index=True)
            keep = hit[len(hit) - 1 - last]
            local += (take + keep).tolist()
            slots += j[keep].tolist()
        self.seen += n_tok
        if not local:
            return
        chosen = masked[torch.as_tensor(local, device=masked.device)]
        rows = site_rows(acts, self.sites, chosen).float().cpu()  # [k, sites, n, d]
        self.sample[self.filled - take : self.filled] = rows[:take]
        self.sample[torch.as_tensor(slots, dtype=torch.long)] = rows[take:]  # after: a reservoir
        # pick may replace a slot this same batch has just filled

    def result(self) -> "PredictabilityResult":
        if self.filled < self.min_tokens:
            raise ValueError(
                f"predictability: only {self.filled} tokens sampled, need >= {self.min_tokens} "
                f"(min_tokens) to fit and test a ridge map"
            )
        x = self.sample[: self.filled].double().numpy()
        perm = np.random.default_rng(self.seed).permutation(self.filled)
        n_test = max(2, int(round(self.test_fraction * self.filled)))
        test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
        if len(train) < 2:
            raise ValueError(
                "predictability: too few training tokens; raise max_tokens or lower test_fraction"
            )
        r2 = np.stack(
            [
                ridge_r2_matrix(x[:, k], train, test, self.alphas, device=self.device)
                for k in range(len(self.sites))
            ]
        )
        off = ~np.eye(self.n_streams, dtype=bool)
        arrays = {"r2": r2, **{f"{k}_offdiag": f(r2[:, off], axis=1) for k, f in _OFFDIAG.items()}}
        meta = {
            "sites": self.sites,
            "site_labels": [site_label(s) for s in self.sites],
            "n_streams": self.n_streams,
            "hyper_conn_type": self.hyper_conn_type,
            "tokens_sampled": self.filled,
            "tokens_seen_by_probe": self.seen,
            "sampling": self.sampling,
            "n_train": len(train),
            "n_test": len(test),
            "alphas": list(self.alphas),
            "seed": self.seed,
            "sample_bytes": self.sample.nbytes,
            "r2_axes": "[site, source stream i, target stream j]",
        }
        return PredictabilityResult(self.name, arrays, meta)


@register_result
class PredictabilityResult(ProbeResult):
    def plot(self, max_heatmaps: int = 8):
        """{"matrices": R^2 [source, target] heatmaps at up to `max_heatmaps` sites,
        "trend": mean / min / max off-diagonal R^2 over depth}."""
        import matplotlib.pyplot as plt

        labels, r2 = self.meta["site_labels"], self["r2"]
        from .figure_helpers import heatmap_grid

        picks = evenly_spaced(len(labels), max_heatmaps)
        figs = {
            "matrices": heatmap_grid(
                [r2[k] for k in picks],
                [labels[k] for k in picks],
                vmin=0,
                vmax=1,
                xlabel="target stream j",
                ylabel="source stream i",
                colorbar="held-out R^2",
                title="held-out R^2 of stream j from stream i (ridge)",
            )
        }
        fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(labels)), 3.4))
        x = np.arange(len(labels))
        ax.plot(x, self["mean_offdiag"], marker="o", label="mean i != j")
        ax.fill_between(x, self["min_offdiag"], self["max_offdiag"], alpha=0.2, label="min..max")
        ax.set_xticks(x, labels, rotation=60, fontsize=7, ha="right")
        ax.set_ylabel("held-out R^2")
        ax.set_title("cross-stream linear predictability over depth")
        ax.legend(fontsize=7)
        figs["trend"] = fig
        return figs
