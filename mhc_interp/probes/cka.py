"""Centred kernel alignment (CKA) between residual streams, within and across sublayers.

X [N, p], Y [N, q]: two representations of the same N tokens; K = k(X), L = k(Y) their [N, N]
Grams, H = I - 11^T / N:

    HSIC_0(K, L) = tr(K H L H) / (N - 1)^2                          (biased, Gretton et al. 2005)
    HSIC_1(K, L) = <U(K), U(L)>_F / (N(N - 3))                      (unbiased, Song et al. 2012; N >= 4)
    CKA(K, L)    = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))         (Kornblith et al. 2019)
    CKA_mb       = mean_i HSIC_1(K_i, L_i) / sqrt(mean_i HSIC_1(K_i, K_i) mean_i HSIC_1(L_i, L_i))

with U the Szekely-Rizzo U-centring. The probe reports the minibatch CKA (Nguyen, Raghu &
Kornblith 2021; the biased one for comparison), minibatches drawn from a bounded token shuffle
(`crosscoder_buffer.ShuffleBuffer`, `shuffle_tokens` rows) so consecutive tokens of one text do
not share a minibatch. Kernels: linear (features centred over the tokens) or RBF with the median
heuristic. All HSIC values of R representations are one GEMM G G^T of the stacked, flattened
centred Grams G [R, N^2], in float64. CKA is invariant to orthogonal transforms and isotropic
scaling, not to anisotropic scaling (`standardize=True` z-scores features), and ignores scale.

Details (U-centring, the shuffle, measurements, memory): docs/probes.md#cka-ckapy
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .base import (
    Probe,
    ProbeResult,
    ReportSection,
    index_of,
    masked_rows,
    matrix_table,
    register_probe,
    register_result,
    require_streams,
)
from .crosscoder_buffer import ShuffleBuffer
from .figure_helpers import heatmap_grid
from .sites import SiteSpec, check_site_spec, evenly_spaced, site_hooks, site_label, site_rows

if TYPE_CHECKING:
    from ..contract import MultiStreamModel

__all__ = ["gram_linear", "gram_rbf", "center_gram", "hsic_matrix", "cka_from_hsic", "CKA", "CKAResult"]

SHUFFLE_BYTES = 2**30  # the default shuffle buffer's cap: 1 GiB (never under 2 minibatches)
_CHUNK_BYTES = 64 * 2**20  # float64 features converted at a time (a few representations)


# ---------------------------------------------------------------------------------- functions
def _f64(x) -> Tensor:
    return torch.as_tensor(x).to(torch.float64)


def _centred_f64(X) -> Tensor:
    """A float64 copy of X [..., N, p] with the per-feature mean over tokens (axis -2) subtracted."""
    Xc = torch.as_tensor(X).to(torch.float64, copy=True)
    Xc -= Xc.mean(dim=-2, keepdim=True)
    return Xc


def gram_linear(X: Tensor) -> Tensor:
    """Linear Gram K = X_c X_c^T of the token-centred features, float64.

    X: [..., N, p] (rows = tokens) -> [..., N, N]. Centring the features first changes nothing
    after (U-)centring the Gram but keeps the products well conditioned.
    """
    Xc = _centred_f64(X)
    return Xc @ Xc.transpose(-1, -2)


def _median_last(flat: Tensor) -> Tensor:
    """numpy-style median over the last axis (mean of the two middle values if even)."""
    m = flat.shape[-1]
    hi = torch.kthvalue(flat, m // 2 + 1, dim=-1).values
    if m % 2:
        return hi
    lo = torch.kthvalue(flat, m // 2, dim=-1).values
    return (lo + hi) / 2


def gram_rbf(X: Tensor, threshold: float = 1.0) -> Tensor:
    """RBF Gram exp(-|x_i - x_j|^2 / (2 sigma^2)), float64, with Kornblith's median heuristic
    sigma^2 = threshold^2 * median_{i,j} |x_i - x_j|^2 (all N^2 entries, diagonal included).

    X: [..., N, p] -> [..., N, N]. If the median squared distance is 0 (most tokens identical)
    the mean squared distance is used; if all tokens are identical the Gram is all ones.
    """
    if threshold <= 0:
        raise ValueError(f"rbf threshold must be > 0, got {threshold}")
    dots = gram_linear(X)
    sq = torch.diagonal(dots, dim1=-2, dim2=-1)
    d2 = (sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2 * dots).clamp_min_(0)
    torch.diagonal(d2, dim1=-2, dim2=-1).zero_()
    flat = d2.flatten(-2)
    med = _median_last(flat)
    scale = torch.where(med > 0, med, flat.mean(-1))
    scale = scale.masked_fill(scale <= 0, 1.0)
    sigma2 = threshold**2 * scale
    return torch.exp(-d2 / (2 * sigma2[..., None, None]))


def center_gram(K: Tensor, unbiased: bool = False) -> Tensor:
    """Centre a symmetric Gram matrix K [..., N, N] (float64 copy; K is not modified).

    biased:   H K H with H = I - 11^T / N.
    unbiased: Szekely-Rizzo U-centring (Kornblith's `center_gram(unbiased=True)`): zero the
              diagonal, m = column sums / (N - 2), m -= sum(m) / (2 (N - 1)),
              K_ij - m_i - m_j off the diagonal, 0 on it. Needs N >= 4.
    """
    K = _f64(K).clone()
    n = K.shape[-1]
    if unbiased:
        if n < 4:
            raise ValueError(f"debiased CKA needs at least 4 tokens, got {n}")
        torch.diagonal(K, dim1=-2, dim2=-1).zero_()
        means = K.sum(dim=-2) / (n - 2)
        means -= means.sum(dim=-1, keepdim=True) / (2 * (n - 1))
    else:
        if n < 2:
            raise ValueError(f"CKA needs at least 2 tokens, got {n}")
        means = K.mean(dim=-2)
        means -= means.mean(dim=-1, keepdim=True) / 2
    K -= means.unsqueeze(-1)
    K -= means.unsqueeze(-2)
    if unbiased:
        torch.diagonal(K, dim1=-2, dim2=-1).zero_()
    return K


def hsic_matrix(grams: Tensor, unbiased: bool = True) -> Tensor:
    """All-pairs HSIC of R representations from their Grams [R, N, N] -> [R, R] float64.

    One GEMM over the stacked, flattened centred Grams G [R, N^2]: M = G G^T, divided by
    N (N - 3) for the U-centred Grams (= unbiased HSIC_1 of Song et al. 2012) or by (N - 1)^2
    for the H K H-centred ones (biased HSIC_0). Raises ValueError if N < 4 when unbiased.
    """
    grams = _f64(grams)
    if grams.ndim != 3 or grams.shape[-1] != grams.shape[-2]:
        raise ValueError(f"grams must be [R, N, N], got {tuple(grams.shape)}")
    n = grams.shape[-1]
    G = center_gram(grams, unbiased).flatten(1)  # [R, N^2]
    M = G @ G.T
    M = (M + M.T) / 2  # exact symmetry
    return M / (n * (n - 3)) if unbiased else M / (n - 1) ** 2


def _hsic_both(grams: Tensor) -> tuple:
    """(unbiased, biased) all-pairs HSIC of Grams [R, N, N] (float64) from ONE GEMM, no centred
    copies; consumes `grams` (its diagonal is zeroed in place). Per representation, with
    K~ = K with a zero diagonal, d = diag K, r = K~ 1 and s = 1^T K~ 1:

      unbiased (Song et al. 2012, eq. 5) = [tr(K~ L~) + s_K s_L / ((N-1)(N-2))
                                            - 2/(N-2) r_K . r_L] / (N (N-3))
      biased = tr(H K H L) / (N-1)^2 = [tr(K L) - 2/N (K 1).(L 1) + (1^T K 1)(1^T L 1) / N^2] / (N-1)^2,
               tr(K L) = tr(K~ L~) + d_K . d_L,  K 1 = r + d.

    Equal to centring both ways and taking two GEMMs (`hsic_matrix`), at half the GEMM work and
    without the two [R, N, N] copies."""
    R, n, _ = grams.shape  # n >= 4: CKA's minibatches are (its constructor and _flush_sizes see to it)
    diag = torch.diagonal(grams, dim1=-2, dim2=-1)
    d = diag.clone()  # [R, N]
    diag.zero_()
    r = grams.sum(dim=-1)  # [R, N]
    s = r.sum(dim=-1)  # [R]
    flat = grams.reshape(R, n * n)
    tr = flat @ flat.T
    tr = (tr + tr.T) / 2  # exact symmetry
    unbiased = (tr + torch.outer(s, s) / ((n - 1) * (n - 2)) - 2 / (n - 2) * (r @ r.T)) / (n * (n - 3))
    rows, total = r + d, s + d.sum(dim=-1)
    biased = (tr + d @ d.T - 2 / n * (rows @ rows.T) + torch.outer(total, total) / n**2) / (n - 1) ** 2
    return unbiased, biased


def cka_from_hsic(M: Tensor) -> Tensor:
    """CKA_ij = M_ij / sqrt(M_ii M_jj) from an HSIC matrix M [R, R] (NaN where M_ii = 0)."""
    M = _f64(M)
    d = torch.diagonal(M).clamp_min(0).sqrt()
    return M / (d[:, None] * d[None, :])


# ---------------------------------------------------------------------------------- the probe
@register_probe
class CKA(Probe):
    """Minibatch CKA between every (site, stream) pair (Nguyen, Raghu & Kornblith 2021), its
    minibatches drawn from a seeded token shuffle (module docstring). Representations are ordered
    site-major (r = site * n + stream); the unbiased and biased HSIC matrices [R, R] are summed
    over minibatches. `result()` takes the buffer's rest as the last minibatches without changing
    the state (repeatable), so every token is used. Memory does not grow with the corpus (module
    docstring): features are copied to float64 a few representations at a time.

    sites: a site spec (`sites.py`; default "layers"). kernel: "linear" or "rbf" (median
    heuristic x `rbf_threshold`). debiased: which estimator is the main `cka` array (both are
    stored). standardize: z-score every feature within each minibatch. shuffle_tokens: rows of
    the shuffle buffer (>= 2 minibatches; default 8, capped at SHUFFLE_BYTES). seed: the shuffle's.
    """

    name = "cka"
    report = ReportSection(
        "How alike the streams' representations are (CKA)",
        order=20,
        min_streams=2,
        captions={
            "cka_intra": "Debiased linear CKA between the streams of one sublayer: 1 = same representation up to "
            "rotation and scale, 0 = unrelated.",
            "cka_inter": "Debiased CKA between every (sublayer, stream) representation.",
        },
    )

    @classmethod
    def for_report(cls, cfg) -> "CKA":
        return cls(minibatch_tokens=cfg.cka_minibatch)

    def __init__(
        self,
        sites: SiteSpec = None,
        minibatch_tokens: int = 512,
        kernel: str = "linear",
        rbf_threshold: float = 1.0,
        debiased: bool = True,
        standardize: bool = False,
        shuffle_tokens: Optional[int] = None,
        seed: int = 0,
    ):
        if kernel not in ("linear", "rbf"):
            raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")
        self.minibatch_tokens = int(minibatch_tokens)
        if self.minibatch_tokens < 4:
            raise ValueError(
                f"minibatch_tokens must be >= 4 (debiased CKA needs at least 4 "
                f"tokens), got {minibatch_tokens}"
            )
        if shuffle_tokens is not None and int(shuffle_tokens) < 2 * self.minibatch_tokens:
            raise ValueError(
                f"shuffle_tokens must be >= 2 * minibatch_tokens = {2 * self.minibatch_tokens} "
                f"(half the buffer stays to be mixed with later tokens), got {shuffle_tokens}"
            )
        if rbf_threshold <= 0:
            raise ValueError(f"rbf_threshold must be > 0, got {rbf_threshold}")
        self.sites = check_site_spec(sites, "CKA")
        self.shuffle_tokens = None if shuffle_tokens is None else int(shuffle_tokens)
        self.seed = int(seed)
        self.kernel = kernel
        self.rbf_threshold = float(rbf_threshold)
        self.debiased = bool(debiased)
        self.standardize = bool(standardize)
        self._site_names: Optional[List[str]] = None
        self._n_streams: Optional[int] = None
        self._reset_state()

    def _reset_state(self) -> None:
        self._buffer: Optional[ShuffleBuffer] = None  # rows [R, d], made by the first update
        self._hsic: Optional[Tuple[Tensor, Tensor]] = None  # (unbiased, biased) [R, R] sums over minibatches
        self._n_minibatches = 0  # each of minibatch_tokens tokens (until the flush in `result`)

    # ---------------------------------------------------------------------------- contract
    def setup(self, model: "MultiStreamModel") -> None:
        require_streams(model, self.name)
        self._site_names = site_hooks(model, self.sites, "CKA")
        self._n_streams = int(model.cfg.n_streams)
        self._reset_state()

    def hook_names(self, model: "MultiStreamModel") -> List[str]:
        if self._site_names is None:
            self.setup(model)
        return list(self._site_names)

    def update(self, acts: Dict[str, Tensor], mask: Tensor) -> None:
        if self._site_names is None:
            raise RuntimeError("CKA.update called before setup(model)")
        first = acts[self._site_names[0]]
        if first.shape[2] != self._n_streams:
            raise ValueError(f"CKA: activations have {first.shape[2]} streams, the model {self._n_streams}")
        rows = masked_rows(mask, first.device)  # found once (one device sync), not once per site
        m, R, d = self.minibatch_tokens, len(self._site_names) * self._n_streams, first.shape[-1]
        row_bytes = R * d * first.element_size()
        if self._buffer is None:
            rows_max = max(2 * m, min(8 * m, SHUFFLE_BYTES // row_bytes))
            self._buffer = ShuffleBuffer(self.shuffle_tokens or rows_max, seed=self.seed)
        buf = self._buffer
        per_fill = max(1, buf.capacity // (2 * m))  # minibatches taken per full buffer
        for chunk in torch.split(rows, max(1, _CHUNK_BYTES // row_bytes)):
            # rows in arrival order, at most 64 MiB of them stacked at a time
            start = 0
            while start < len(chunk):
                x = site_rows(acts, self._site_names, chunk[start:]).reshape(-1, R, d)  # [T, R, d]
                start += buf.put(x)
                if buf.unread == buf.capacity:
                    buf.shuffle()
                    for _ in range(per_fill):
                        self._hsic = self._summed(self._hsic, buf.take_slots(m))
                    self._n_minibatches += per_fill

    def _summed(self, sums: Optional[Tuple[Tensor, Tensor]], slots: Tensor) -> Tuple[Tensor, Tensor]:
        """HSIC sums (unbiased, biased [R, R], None before the first) plus the minibatch at `slots`."""
        u, b = self._minibatch_hsic(slots)
        return (u, b) if sums is None else (sums[0] + u, sums[1] + b)

    def _minibatch_hsic(self, slots: Tensor) -> tuple:
        """The buffer rows at `slots` [N] -> (unbiased HSIC [R, R], biased HSIC [R, R]) of this
        minibatch (float64); its Grams [R, N, N] are formed a few representations at a time."""
        storage = self._buffer.storage  # [capacity, R, d]
        N, R, d = len(slots), storage.shape[1], storage.shape[2]
        slots = slots.to(storage.device)
        grams = torch.empty(R, N, N, dtype=torch.float64, device=storage.device)
        step = max(1, _CHUNK_BYTES // (N * d * 8))
        for lo in range(0, R, step):
            X = storage[slots, lo : lo + step].transpose(0, 1)  # [r, N, d], a copy
            if self.standardize:  # z-score every feature (centred in place on a float64 copy)
                X = _centred_f64(X)
                X /= X.pow(2).mean(dim=-2, keepdim=True).sqrt_().clamp_min_(torch.finfo(X.dtype).tiny)
            grams[lo : lo + step] = (
                gram_linear(X) if self.kernel == "linear" else gram_rbf(X, self.rbf_threshold)
            )
        return _hsic_both(grams)

    def _flush_sizes(self, left: int) -> List[int]:
        """Sizes of the last minibatches for the `left` tokens still in the buffer: ceil(left / m)
        of near-equal size (fewer if that would leave one under 4 tokens); [] if left < 4."""
        if left < 4:
            return []
        g = min(-(-left // self.minibatch_tokens), left // 4)
        return [left // g + (1 if i < left % g else 0) for i in range(g)]

    def _flushed_hsic(self):
        """(HSIC sums, minibatches, tokens used, tokens left over) with the buffer's rest taken
        as the last minibatches, shuffled with a generator of its own: the state is untouched."""
        hsic, k = self._hsic, self._n_minibatches
        used = k * self.minibatch_tokens
        left = 0 if self._buffer is None else self._buffer.unread
        sizes = self._flush_sizes(left)
        if sizes:
            rest = self._buffer.order[
                torch.randperm(left, generator=torch.Generator().manual_seed(self.seed + 1))
            ]
            for chunk in torch.split(rest, sizes):
                hsic = self._summed(hsic, chunk)
            k, used = k + len(sizes), used + left
        return hsic, k, used, left - sum(sizes)

    def result(self) -> "CKAResult":
        if self._site_names is None:
            raise RuntimeError("CKA.result called before setup(model)")
        hsic, k, used, dropped = self._flushed_hsic()
        if k == 0:
            raise ValueError(
                f"CKA needs at least 4 tokens (a minibatch; debiased CKA needs at "
                f"least 4 tokens), but only {dropped} token(s) were seen after masking"
            )
        hu, hb = hsic[0] / k, hsic[1] / k
        cka_u, cka_b = cka_from_hsic(hu), cka_from_hsic(hb)
        main = cka_u if self.debiased else cka_b
        n, S = self._n_streams, len(self._site_names)
        intra = torch.stack([main[i * n : (i + 1) * n, i * n : (i + 1) * n] for i in range(S)])
        arrays = {
            k_: v.detach().cpu().numpy()
            for k_, v in dict(
                cka=main, cka_debiased=cka_u, cka_biased=cka_b, intra=intra, hsic_debiased=hu, hsic_biased=hb
            ).items()
        }
        meta = dict(
            site_names=list(self._site_names),
            n_streams=n,
            labels=[site_label((s, j)) for s in self._site_names for j in range(n)],
            n_minibatches=k,
            tokens_used=used,
            tokens_dropped=dropped,
            minibatch_tokens=self.minibatch_tokens,
            shuffle_tokens=None if self._buffer is None else self._buffer.capacity,
            seed=self.seed,
            kernel=self.kernel,
            rbf_threshold=self.rbf_threshold if self.kernel == "rbf" else None,
            debiased=self.debiased,
            standardize=self.standardize,
            estimator=(
                "minibatch debiased (unbiased HSIC_1)" if self.debiased else "minibatch biased (HSIC_0)"
            )
            + ", minibatches from a token shuffle",
        )
        return CKAResult(probe=self.name, arrays=arrays, meta=meta)


# ---------------------------------------------------------------------------------- the result
@register_result
class CKAResult(ProbeResult):
    """Arrays: `cka` (the chosen estimator), `cka_debiased`, `cka_biased` [R, R] with
    R = n_sites * n_streams ordered site-major (labels in `meta["labels"]`), `intra`
    [n_sites, n, n] (diagonal blocks of `cka`), `hsic_debiased` / `hsic_biased` (mean HSIC)."""

    @property
    def site_names(self) -> List[str]:
        return list(self.meta["site_names"])

    @property
    def n_streams(self) -> int:
        return int(self.meta["n_streams"])

    def _site_index(self, site: Union[int, str]) -> int:
        return index_of(site, self.site_names, "site", [site_label(s) for s in self.site_names])

    def intra(self, site: Union[int, str]) -> np.ndarray:
        """[n, n] stream-by-stream CKA at one site (index, hook name or 'blocks.3.mlp')."""
        return self["intra"][self._site_index(site)]

    def tables(self):
        return [matrix_table("CKA between streams, last sublayer", self.intra(-1))]

    def intra_all(self) -> np.ndarray:
        """[n_sites, n, n] stream-by-stream CKA at every site."""
        return self["intra"]

    def findings(self) -> List[Optional[Dict]]:
        """How alike the streams are at the last site (mean, least and most alike pair)."""
        m = np.asarray(self.intra(-1), dtype=float)
        n = m.shape[0]
        pairs = [(i, j, m[i, j]) for i in range(n) for j in range(i + 1, n) if np.isfinite(m[i, j])]
        if not pairs:
            return []
        values = np.array([v for _, _, v in pairs])
        mean = float(values.mean())
        lo, hi = pairs[int(values.argmin())], pairs[int(values.argmax())]
        site = str(self.meta["site_names"][-1]).replace(".hook_streams_out", "")
        verdict = "nearly the same" if mean >= 0.8 else "partly shared" if mean >= 0.4 else "largely distinct"
        text = (
            f"At the last sublayer ({site}) the streams' representations are {verdict}: CKA {mean:.2f} on "
            f"average, from {lo[2]:.2f} (streams {lo[0]}, {lo[1]}) to {hi[2]:.2f} (streams {hi[0]}, {hi[1]})."
        )
        return [
            self.finding(
                "cka_last",
                text,
                site=site,
                mean=mean,
                min=float(lo[2]),
                min_pair=list(lo[:2]),
                max=float(hi[2]),
                max_pair=list(hi[:2]),
            )
        ]

    def plot(self, max_sites: int = 8, annotate: bool = True):
        """{"cka_intra": n x n heatmaps at up to `max_sites` evenly spaced sites,
        "cka_inter": the full (site, stream) x (site, stream) heatmap}."""
        import matplotlib.pyplot as plt

        M, n, names = self["cka"], self.n_streams, self.site_names
        S = len(names)
        which = "debiased" if self.meta.get("debiased", True) else "biased"
        vmin = min(0.0, float(np.nanmin(M))) if np.isfinite(M).any() else 0.0
        idx = evenly_spaced(S, max_sites)
        intra = heatmap_grid(
            [self.intra(i) for i in idx],
            [site_label(names[i]) for i in idx],
            vmin=vmin,
            vmax=1.0,
            xlabel="stream",
            ylabel="stream",
            colorbar=f"CKA ({which})",
            labels=None if annotate else (lambda m: np.full(m.shape, "")),
            title=f"intra-site stream CKA ({which}, {self.meta.get('kernel', 'linear')})",
        )

        size = min(12.0, 3.0 + 0.06 * len(M))  # M [R, R]
        fig, ax = plt.subplots(figsize=(size + 1.5, size))
        im = ax.imshow(M, vmin=vmin, vmax=1.0, cmap="viridis", interpolation="nearest")
        step = max(1, int(np.ceil(S / 24)))  # at most ~24 site labels
        ticks = [i * n + (n - 1) / 2 for i in range(0, S, step)]
        tick_labels = [site_label(names[i]) for i in range(0, S, step)]
        ax.set_xticks(ticks, tick_labels, rotation=90, fontsize=7)
        ax.set_yticks(ticks, tick_labels, fontsize=7)
        for i in range(1, S):
            ax.axhline(i * n - 0.5, color="w", lw=0.3)
            ax.axvline(i * n - 0.5, color="w", lw=0.3)
        fig.colorbar(im, ax=ax, label=f"CKA ({which})")
        ax.set_title(f"(site, stream) CKA, {n} streams per site; {self.meta.get('tokens_used', '?')} tokens")
        return {"cka_intra": intra, "cka_inter": fig}
