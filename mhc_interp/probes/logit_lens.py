"""Per-stream logit lens: what each residual stream (or subset, or branch output) "predicts" at
every site, and the exact decomposition of the final logits into stream contributions.

The lens reads states through the model's readout split by stream (`model.stream_contributions`);
for HookedMHC (final LayerNorm per stream, then sum and unembed):

    logits = W_U^T sum_s LN_f(x_s) = sum_s c_s,        c_s = W_U^T LN_f(x_s)   [d_vocab]

    view "sum"         sum_s c_s          view "stream s"   c_s (as if the others contributed nothing)
    view "streams S"   sum_{s in S} c_s   "write"           W_U^T LN_f(w), w a branch output (hook_write)

Each view is scored against the final distribution: KL(P_final || softmax(view)) (nats) and top-1
agreement. Sites: `sites.py`'s vocabulary ("layers" by default). `translator` (site, x) -> x' is
applied before LN_f and W_U: the seam for a tuned lens (identity: the plain logit lens).
`LogitLens` is the corpus probe; `logit_lens(model, tokens)` the single-prompt version.

Details (DeepSeek-V4's readout, the write lens, the translator's shapes, cost):
docs/probes.md#logit-lens-logit_lenspy
"""

from __future__ import annotations

from itertools import combinations
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from .base import (
    Probe,
    ProbeResult,
    ReportSection,
    index_of,
    masked_rows,
    register_probe,
    register_result,
    take_rows,
)
from .sites import SiteSpec, check_site_spec, site_hooks, site_label

if TYPE_CHECKING:
    from ..contract import MultiStreamModel

__all__ = [
    "LogitLens",
    "LogitLensResult",
    "decompose_logits",
    "stream_contributions",
    "lens_sites",
    "check_subsets",
    "all_subsets",
]

Translator = Union[None, Callable[[str, Tensor], Tensor], Mapping[str, Callable[[Tensor], Tensor]]]
_INT = (int, np.integer)
_LENS_SITE_SUFFIXES = ("hook_streams_init", "hook_streams_in", "hook_streams_out", "hook_res_mix")


# ------------------------------------------------------------------------------ validation
def lens_sites(model: "MultiStreamModel", sites: SiteSpec = None) -> List[str]:
    """Hook names of a site spec (`sites.py`'s vocabulary; default "layers"), limited to the
    stream states the lens can read (not the already normed hook_ln_final)."""
    return site_hooks(model, sites, "logit lens", suffixes=_LENS_SITE_SUFFIXES)


def check_subsets(subsets, n_streams: int) -> List[Tuple[int, ...]]:
    """Validate stream subsets: each a non-empty collection of distinct ints in [0, n_streams).
    Raises ValueError (empty subset, repeated stream), IndexError (index out of range), TypeError."""
    if subsets is None:
        return []
    if isinstance(subsets, _INT) or (
        isinstance(subsets, (list, tuple)) and subsets and isinstance(subsets[0], _INT)
    ):
        raise TypeError(f"subsets must be a list of stream subsets, e.g. [(0, 1), (2,)], got {subsets!r}")
    out = []
    for sub in subsets:
        sub = (sub,) if isinstance(sub, _INT) else tuple(sub)
        if not sub:
            raise ValueError("a stream subset is empty; each subset needs at least one stream index")
        for s in sub:
            if not isinstance(s, _INT) or isinstance(s, bool):
                raise TypeError(f"stream indices must be ints, got {s!r} in subset {sub}")
            if not 0 <= s < n_streams:
                raise IndexError(
                    f"stream index {s} in subset {sub} is out of range: the model has "
                    f"{n_streams} streams (0..{n_streams - 1})"
                )
        if len(set(sub)) != len(sub):
            raise ValueError(f"stream subset {sub} repeats a stream")
        out.append(tuple(sorted(int(s) for s in sub)))
    return out


def all_subsets(n_streams: int, min_size: int = 2, max_size: Optional[int] = None) -> List[Tuple[int, ...]]:
    """Every subset of size min_size..max_size (default n - 1: proper subsets), for `subsets=`."""
    max_size = n_streams - 1 if max_size is None else max_size
    return [c for k in range(min_size, max_size + 1) for c in combinations(range(n_streams), k)]


def _view_labels(n_streams: int, subsets: Sequence[Tuple[int, ...]]) -> List[str]:
    return (
        ["sum"]
        + [f"stream {s}" for s in range(n_streams)]
        + ["streams " + "+".join(str(s) for s in sub) for sub in subsets]
    )


# ------------------------------------------------------------------------------------ maths
def _translate(translator: Translator, site: str, x: Tensor) -> Tensor:
    if translator is None:
        return x
    if isinstance(translator, Mapping):
        f = translator.get(site)
        out = x if f is None else f(x)
    else:
        out = translator(site, x)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        raise ValueError(
            f"translator for site {site!r} must return a tensor of shape "
            f"{tuple(x.shape)}, got {getattr(out, 'shape', type(out))}"
        )
    return out


def _translate_is_identity(translator: Translator, site: str) -> bool:
    """Whether the translator leaves `site` as it is without being called (None, or a mapping
    that does not name it)."""
    return translator is None or (isinstance(translator, Mapping) and site not in translator)


def _readout(model: "MultiStreamModel", x: Tensor, dtype=torch.float32) -> Tensor:
    """The model's own per-stream readout (the contract's `stream_contributions`), detached:
    x [..., n, d_model] -> [..., n, d_vocab]."""
    with torch.no_grad():
        return model.stream_contributions(x, dtype=dtype)


def stream_contributions(
    model: "MultiStreamModel", x: Tensor, site: str = "", translator: Translator = None, dtype=torch.float32
) -> Tensor:
    """Per-stream logit contributions c_s (W_U^T LN_f(x_s) for HookedMHC): x [..., n_streams,
    d_model] -> [..., n_streams, d_vocab], the translator (if any) applied first. Their sum over
    streams is the model's unembedding of x."""
    return _readout(model, _translate(translator, site, x), dtype)


def _write_readout(model: "MultiStreamModel", w: Tensor) -> Tensor:
    """A branch output w [..., d_model] read as a one-stream state -> [..., d_vocab]."""
    return _readout(model, w.unsqueeze(-2))[..., 0, :]


def _check_write_readout(model: "MultiStreamModel") -> None:
    """The write lens reads a branch output as a one-stream state; a readout that mixes the
    streams with learned weights (DeepSeek-V4's hc_head) cannot, so say so up front."""
    try:
        _write_readout(model, torch.zeros(1, model.cfg.d_model, device=model.device))
    except Exception as e:  # noqa: BLE001 - any failure means the same thing here
        raise ValueError(
            f"the write lens reads each branch output as a one-stream state through "
            f"model.stream_contributions, which {type(model).__name__} does not support "
            f"({type(e).__name__}: {e}); pass writes=False"
        ) from e


@torch.no_grad()
def decompose_logits(
    model, tokens, dtype=torch.float32, atol: Optional[float] = None
) -> Tuple[Tensor, Tensor]:
    """The exact decomposition of the final logits into stream contributions.

    Returns (contributions [batch, pos, n_streams, d_vocab], logits [batch, pos, d_vocab]) where
    `logits` is the model's own output and contributions.sum(-2) equals it up to float rounding
    (the model sums the normed streams before W_U, this sums after; ~1e-7 in float32).
    atol: if given, raise ArithmeticError when max |sum - logits| exceeds it.
    Memory: n_streams x the logits."""
    final = f"{model.sublayer_names[-1]}.hook_streams_out"
    logits, cache = model.run_with_cache(tokens, names_filter=[final])
    contributions = stream_contributions(model, cache[final], dtype=dtype)
    if atol is not None:
        err = float((contributions.sum(-2) - logits.to(contributions.dtype)).abs().max())
        if err > atol:
            raise ArithmeticError(
                f"stream contributions sum to the logits only within {err:.3g} > atol={atol:g} "
                f"(model dtype {model.dtype}; compare in float32 or raise atol)"
            )
    return contributions, logits


class _Final:
    """The final distribution of N tokens, computed once and shared by every site and view.

    KL(P_final || softmax(z)) = sum_v p_v (log p_v - z_v) + logsumexp(z)
                              = negH + (m - p.z) + log sum_v exp(z_v - m),     m = max_v z_v
    where negH = sum_v p_v log p_v is per token. Per view row the vocabulary-sized work is one
    amax (a plain reduction, no index tracking), one fused log_softmax (log sum exp(z - m) =
    z[y*] - m - log_softmax(z)[y*] at the final top-1 token y*), the dot p.(z - m) and the top-1
    test `_argmax_is`. m - p.z is formed as -p.(z - m) before the O(log V) term is added, so large
    common logit offsets cancel as they do in log_softmax; the combination is in float64."""

    def __init__(self, logits: Tensor):
        final = logits.float()  # [N, V]
        lp = F.log_softmax(final, dim=-1)
        self.p = lp.exp()  # [N, V]
        self.top = final.argmax(-1)  # [N]
        self.neg_entropy = (self.p * lp).sum(-1).double()  # [N]
        self.logits = final


def _row_stats(z: Tensor, pz: Tensor, fin: _Final, sl: slice, cpu: bool) -> Tuple[Tensor, Tensor]:
    """Per row of z [A, c, B, V] (c tokens of block `sl`) with pz = p.z [A, c, B]: KL - negH =
    log sum exp(z - m) - p.(z - m) [A, B, c] in float64, and the top-1 agreement [A, B, c].
    z is overwritten."""
    idx = fin.top[sl][None, :, None, None].expand(*z.shape[:-1], 1)
    m = z.amax(-1)  # [A, c, B]
    z_top = z.gather(-1, idx)[..., 0]
    log_norm = (z_top - m) - F.log_softmax(z, dim=-1).gather(-1, idx)[..., 0]
    kl = log_norm.double() - (pz.double() - m.double())
    agree = _argmax_is(z, idx, z_top, m, host_check=cpu)
    return kl.transpose(1, 2), agree.transpose(1, 2)


def stream_sums(t: Tensor, subsets: Sequence[Tuple[int, ...]], dim: int) -> Tensor:
    """The views that add streams, from `t` whose axis `dim` holds the streams: the sum over all
    streams, then the sum over each subset, in one tensor whose axis `dim` has 1 + len(subsets)."""
    out = t.new_empty(*t.shape[:dim], 1 + len(subsets), *t.shape[dim + 1 :])
    torch.sum(t, dim, out=out.select(dim, 0))
    for j, sub in enumerate(subsets, 1):
        torch.sum(t.index_select(dim, torch.tensor(sub, device=t.device)), dim, out=out.select(dim, j))
    return out


def _dot_p(z: Tensor, p: Tensor) -> Tensor:
    """p.z per row: z [A, c, B, V], p [c, V] -> [A, c, B] (one batched GEMV)."""
    A, c, B, V = z.shape
    return torch.bmm(z.reshape(A * c, B, V), p.expand(A, c, V).reshape(A * c, V, 1)).view(A, c, B)


def _argmax_is(z: Tensor, idx: Tensor, z_top: Tensor, z_max: Tensor, host_check: bool = True) -> Tensor:
    """argmax(z, -1) == idx[..., 0] for z [..., V], idx [..., 1] (the final top-1 token), z_top =
    z.gather(-1, idx)[..., 0], z_max = z.amax(-1), without the slow index-tracking max over the
    vocabulary: z[top] must be the max and no earlier entry may tie with it. A tie needs a second
    maximum, so `top` is masked out of z (z is overwritten) and the max taken again; only tied rows
    need an argmax - on the host's say-so (`host_check`, one sync) or, sync-free, as one more pass
    over every row."""
    hit = z_top == z_max
    z.scatter_(-1, idx, float("-inf"))
    tie = hit & (z.amax(-1) == z_max)
    top = idx[..., 0]
    if not host_check:
        return hit & (~tie | (top < z.argmax(-1)))
    if bool(tie.any()):  # rare: exact ties at the max; argmax decides
        where = tie.nonzero(as_tuple=True)
        hit[where] = top[where] < z[where].argmax(-1)
    return hit


# ------------------------------------------------------------------------------ the probe
@register_probe
class LogitLens(Probe):
    """Logit lens over a corpus, per site and view (sum / each stream / each subset) and per
    sublayer branch output, aggregated online (float64 sums over masked tokens).

    Arrays of the result:
        kl[site, view]              mean KL(P_final || P_view), nats
        top1[site, view]            fraction of tokens with argmax view == argmax final logits
        kl_write[sublayer], top1_write[sublayer]   the same for each branch output (hook_write)
        final_top1_contribution[s]  E_t[c_s[y*] - mean_v c_s[v]], y* = the final top-1 token:
                                    each stream's share of the top-1 logit's margin over the mean
                                    logit (sums over streams to E_t[logit[y*] - mean logit])
        kl_se, top1_se, kl_write_se, top1_write_se   their standard errors (clustered by sequence)
    meta: sites, site_labels, views, subsets, sublayers, decomposition_max_error (max |sum_s c_s
    - logits| seen at the final state), tokens (scored), tokens_seen, sequences, token_fraction.

    subsets: extra stream subsets (e.g. `[(0, 1), (2, 3)]` or `all_subsets(n)`); "sum" and each
    single stream are always included. sites: see `lens_sites`. writes: also lens the branch
    outputs. translator: the tuned-lens seam. chunk_tokens: tokens per vocabulary-sized block
    (memory and cost: docs/probes.md#logit-lens-logit_lenspy). token_fraction (default 1): score a
    seeded random sample of about this share of the masked tokens (seed), the sampling error
    reported in the `*_se` arrays.
    """

    name = "logit_lens"
    report = ReportSection(
        "What each stream predicts (logit lens)",
        order=50,
        captions={
            "kl": "Logit lens: KL from the final distribution to the prediction read off each site through the final "
            "LayerNorm and unembedding, for the stream sum and each stream alone. Scored on a seeded sample of "
            "the corpus tokens (`lens_token_fraction`, 25% by default, as the title says); bands: ±2 standard "
            "errors, clustered by sequence.",
            "top1": "Logit lens: how often each view's top-1 token agrees with the final prediction.",
            "writes": "Each sublayer's branch output (what it writes) read through the final LayerNorm and "
            "unembedding: KL to the final distribution and top-1 agreement.",
            "final_decomposition": "The final logits split exactly into per-stream contributions.",
        },
    )

    def __init__(
        self,
        subsets=None,
        sites: SiteSpec = None,
        writes: bool = True,
        translator: Translator = None,
        chunk_tokens: int = 256,
        token_fraction: float = 1.0,
        seed: int = 0,
    ):
        if int(chunk_tokens) < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        if not 0 < float(token_fraction) <= 1:
            raise ValueError(f"token_fraction must be in (0, 1], got {token_fraction}")
        self.subsets_spec = subsets
        self.sites_spec = check_site_spec(sites, "logit lens")
        self.writes = bool(writes)
        self.translator = translator
        self.chunk_tokens = int(chunk_tokens)
        self.token_fraction = float(token_fraction)
        self.seed = int(seed)

    @classmethod
    def for_report(cls, cfg) -> "LogitLens":
        """The report's lens scores a sample of the tokens (`cfg.lens_token_fraction`), with its errors."""
        return cls(token_fraction=cfg.lens_token_fraction)

    def setup(self, model) -> None:
        self.n_streams = model.cfg.n_streams
        self.subsets = check_subsets(self.subsets_spec, self.n_streams)
        self.sites = lens_sites(model, self.sites_spec)
        self.sublayers = model.sublayer_names if self.writes else []
        self.final_site = f"{model.sublayer_names[-1]}.hook_streams_out"
        self.views = _view_labels(self.n_streams, self.subsets)
        self.hyper_conn_type = model.cfg.hyper_conn_type
        if self.writes:
            _check_write_readout(model)
        self.model = model
        n_sites, n_views, n_sub = len(self.sites), len(self.views), len(self.sublayers)
        f64 = dict(dtype=torch.float64, device=model.device)
        # per statistic: sum over tokens, and for its standard error sum_i S_i^2 and sum_i S_i n_i
        # over sequences i (S_i the sequence's sum, n_i its scored tokens)
        shapes = {
            "kl": (n_sites, n_views),
            "top1": (n_sites, n_views),
            "kl_write": (n_sub,),
            "top1_write": (n_sub,),
        }
        self.sums, self.sq, self.cross = (
            {k: torch.zeros(v, **f64) for k, v in shapes.items()} for _ in range(3)
        )
        self.n_sq = 0  # sum_i n_i^2
        self.groups = 0  # sequences with a scored token
        self.final_contrib = torch.zeros(self.n_streams, **f64)
        self.decomposition_error = 0.0
        self.count = 0
        self.seen = 0
        self.gen = torch.Generator().manual_seed(self.seed)

    def hook_names(self, model) -> List[str]:
        sites = list(dict.fromkeys([*self.sites, self.final_site]))  # the final state once
        return sites + [f"{s}.hook_write" for s in self.sublayers] + ["hook_logits"]

    def update(self, acts: Dict[str, Tensor], mask: Tensor) -> None:
        device = acts["hook_logits"].device
        rows = masked_rows(mask, device)
        self.seen += len(rows)
        if self.token_fraction < 1 and len(rows):  # a seeded Bernoulli sample of the masked tokens
            rows = rows[(torch.rand(len(rows), generator=self.gen) < self.token_fraction).to(device)]
        n_tok = len(rows)
        if n_tok == 0:
            return
        n, n_sites, n_sub = self.n_streams, len(self.sites), len(self.sublayers)
        fin = _Final(take_rows(acts["hook_logits"], rows))  # shared by every site and view
        # the final state's contributions are one site's rows unless a translator changes that site
        shared_final = self.final_site in self.sites and _translate_is_identity(
            self.translator, self.final_site
        )
        states = torch.stack(
            [_translate(self.translator, site, take_rows(acts[site], rows)) for site in self.sites]
        )  # [sites, N, n, d]
        writes = [
            _translate(self.translator, f"{sub}.hook_write", take_rows(acts[f"{sub}.hook_write"], rows))
            for sub in self.sublayers
        ]  # each [N, d]
        k_final = self.sites.index(self.final_site) if shared_final else None
        kl = torch.empty(n_sites, len(self.views), n_tok, dtype=torch.float64, device=device)
        agree = torch.empty(kl.shape, dtype=torch.bool, device=device)
        kl_w = torch.empty(n_sub, n_tok, dtype=torch.float64, device=device)
        agree_w = torch.empty(kl_w.shape, dtype=torch.bool, device=device)
        at_top = torch.empty(n, n_tok, dtype=torch.float64, device=device)
        err = torch.zeros((), dtype=torch.float32, device=device)
        chunk = self._block_tokens(n_sites * len(self.views) + n_sub)
        cpu = device.type == "cpu"
        added = [0, *range(1 + n, kl.shape[1])]  # the views that add streams: sum, then subsets
        for lo in range(0, n_tok, chunk):
            sl = slice(lo, lo + chunk)
            z = _readout(self.model, states[:, sl].contiguous())  # [sites, c, n, V]
            pz = _dot_p(z, fin.p[sl])  # [sites, c, n]; views add rows
            views = stream_sums(z, self.subsets, 2)  # [sites, c, 1 + subsets, V]
            pz_views = stream_sums(pz, self.subsets, 2)  # p.z is linear: the same sums
            # exact decomposition at the final state (no translator: it is the model's own map)
            contrib = (
                z[k_final]
                if shared_final
                else _readout(self.model, take_rows(acts[self.final_site], rows[sl]))
            )
            err = torch.maximum(
                err,
                (views[k_final, :, 0] if shared_final else contrib.sum(1)).sub(fin.logits[sl]).abs_().amax(),
            )
            top = fin.top[sl][:, None, None].expand(-1, n, 1)
            at_top[:, sl] = (
                contrib.gather(-1, top)[..., 0] - contrib.mean(-1)
            ).T.double()  # c_s[y*] - mean c_s
            del contrib
            kl[:, 1 : 1 + n, sl], agree[:, 1 : 1 + n, sl] = _row_stats(z, pz, fin, sl, cpu)
            del z
            kl[:, added, sl], agree[:, added, sl] = _row_stats(views, pz_views, fin, sl, cpu)
            if writes:
                zw = _readout(self.model, torch.stack([w[sl] for w in writes])[:, :, None])  # [sub, c, 1, V]
                w_kl, w_agree = _row_stats(zw, _dot_p(zw, fin.p[sl]), fin, sl, cpu)
                kl_w[:, sl], agree_w[:, sl] = w_kl[:, 0], w_agree[:, 0]
        kl = (kl + fin.neg_entropy).clamp_min(0)
        kl_w = (kl_w + fin.neg_entropy).clamp_min(0)
        per_token = {"kl": kl, "top1": agree.double(), "kl_write": kl_w, "top1_write": agree_w.double()}
        self._add_sequence_sums(per_token, rows, mask)
        self.decomposition_error = max(self.decomposition_error, float(err))
        self.final_contrib += at_top.sum(1)
        self.count += n_tok

    def _add_sequence_sums(self, per_token: Dict[str, Tensor], rows: Tensor, mask: Tensor) -> None:
        """Add each statistic's per-token values [..., N] to its token sum, and per sequence i (S_i
        its sum, n_i its scored tokens) to sum_i S_i^2 and sum_i S_i n_i, for `result`'s
        clustered standard errors."""
        seq = torch.div(rows, mask.shape[1], rounding_mode="floor")  # [N] sequence of each row
        n_i = torch.bincount(seq, minlength=mask.shape[0]).double()  # [batch]
        for key, values in per_token.items():
            S = torch.zeros(*values.shape[:-1], mask.shape[0], dtype=torch.float64, device=values.device)
            S.index_add_(-1, seq, values)  # [..., batch]
            self.sums[key] += S.sum(-1)
            self.sq[key] += (S * S).sum(-1)
            self.cross[key] += S @ n_i
        self.n_sq += float((n_i * n_i).sum())
        self.groups += int((n_i > 0).sum())

    def _block_tokens(self, rows: int) -> int:
        """Tokens per vocabulary-sized block: `chunk_tokens` x (n_views + n_streams) rows of d_vocab
        (the memory the lens used per site before it unembedded all sites at once), spread over
        all `rows` rows of a token."""
        return max(1, self.chunk_tokens * (len(self.views) + self.n_streams) // rows)

    def result(self) -> "LogitLensResult":
        if self.count == 0:
            raise ValueError("logit_lens saw no unmasked tokens")
        c, g = self.count, self.groups
        arrays = {k: (v / c).cpu().numpy() for k, v in self.sums.items()}
        for k, total in self.sums.items():
            # cluster-robust (by sequence) standard error of the ratio mean sum_i S_i / sum_i n_i
            mean = total / c
            ss = (self.sq[k] - 2 * mean * self.cross[k] + mean * mean * self.n_sq).clamp_min(0)
            se = (ss * g / (g - 1)).sqrt() / c if g > 1 else torch.full_like(ss, float("nan"))
            arrays[f"{k}_se"] = se.cpu().numpy()
        arrays["final_top1_contribution"] = (self.final_contrib / c).cpu().numpy()
        meta = {
            "sites": self.sites,
            "site_labels": [site_label(s) for s in self.sites],
            "views": self.views,
            "subsets": [list(s) for s in self.subsets],
            "sublayers": self.sublayers,
            "n_streams": self.n_streams,
            "hyper_conn_type": self.hyper_conn_type,
            "tokens": c,
            "tokens_seen": self.seen,
            "sequences": g,
            "token_fraction": self.token_fraction,
            "seed": self.seed,
            "standard_errors": "*_se: standard error of each mean, clustered by sequence (the tokens "
            "of a sequence are not independent); with token_fraction < 1 it also "
            "covers the sampling of tokens",
            "decomposition_max_error": float(self.decomposition_error),
            "translator": None if self.translator is None else repr(self.translator),
            "kl_direction": "KL(P_final || P_view), nats",
        }
        return LogitLensResult(self.name, arrays, meta)


def _view_colours(views: Sequence[str]):
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    return {v: ("black" if v == "sum" else cmap(i % 10)) for i, v in enumerate(views)}


@register_result
class LogitLensResult(ProbeResult):
    def view_index(self, view: Union[str, int]) -> int:
        return index_of(view, self.meta["views"], "view")

    def table(self) -> str:
        """KL (nats) / top-1 agreement per site (rows) and view (columns)."""
        views, labels = self.meta["views"], self.meta["site_labels"]
        w = max(len(l) for l in labels) + 2
        rows = [
            f"{lab:<{w}}"
            + "".join(f"{self['kl'][k, j]:9.3f} /{self['top1'][k, j]:6.1%}" for j in range(len(views)))
            for k, lab in enumerate(labels)
        ]
        return "\n".join([" " * w + "".join(f"{v:>18}" for v in views), *rows])

    def findings(self) -> List[Optional[Dict]]:
        """From which site the final top-1 token can be read off the stream sum."""
        top1 = np.asarray(self["top1"], dtype=float)  # [site, view]
        labels, views = self.meta.get("site_labels", []), self.meta.get("views", [])
        if top1.ndim != 2 or not views or views[0] != "sum" or len(labels) != top1.shape[0]:
            return []
        readable = np.nonzero(top1[:, 0] >= 0.5)[0]
        if not readable.size:
            return []
        first = int(readable[0])
        text = (
            f"The final top-1 token can be read off the stream sum from {labels[first]} on (>= 50% agreement)"
        )
        values = dict(first_site=labels[first], agreement=float(top1[first, 0]))
        if top1.shape[1] > 2:
            s = int(top1[-1, 1:].argmax())
            text += (
                f"; of single streams, {views[1 + s]} agrees best at the last site ({top1[-1, 1 + s]:.0%})"
            )
            values.update(best_single_view=views[1 + s], best_single_agreement=float(top1[-1, 1 + s]))
        return [self.finding("logit_lens", text + ".", **values)]

    def plot(self):
        """{"kl": mean KL to the final distribution per site and view (log scale), "top1": top-1
        agreement per site and view, "writes": the same for each branch output,
        "final_decomposition": each stream's share of the top-1 logit margin}."""
        import matplotlib.pyplot as plt

        labels, views = self.meta["site_labels"], self.meta["views"]
        colours = _view_colours(views)
        x = np.arange(len(labels))
        figs = {}
        sample = self.meta.get("token_fraction", 1.0)
        note = f"\n{sample:.0%} token sample; " if sample < 1 else "\n"
        for key, title, log in (
            ("kl", "KL(P_final || P_lens) [nats]", True),
            ("top1", "top-1 agreement with the final prediction", False),
        ):
            fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(labels)), 3.6))
            for j, v in enumerate(views):
                y = self[key][:, j]
                ax.plot(x, y, marker=".", label=v, color=colours[v], lw=2 if v == "sum" else 1)
                if f"{key}_se" in self.arrays:  # +-2 standard errors (clustered by sequence)
                    band = 2 * np.nan_to_num(self[f"{key}_se"][:, j])
                    ax.fill_between(x, y - band, y + band, color=colours[v], alpha=0.2, lw=0)
            if log:
                ax.set_yscale("symlog", linthresh=1e-3)
            ax.set_xticks(x, labels, rotation=60, fontsize=7, ha="right")
            ax.set_title(title + note + "bands: ±2 standard errors", fontsize=10)
            ax.legend(fontsize=7)
            figs[key] = fig
        subs = self.meta["sublayers"]
        fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.5 * len(subs)), 3.4))
        for ax, key, what in zip(axes, ("kl_write", "top1_write"), ("KL to final [nats]", "top-1 agreement")):
            if subs:
                se = self.arrays.get(f"{key}_se")
                ax.bar(np.arange(len(subs)), self[key], yerr=None if se is None else 2 * se, ecolor="grey")
                ax.set_xticks(np.arange(len(subs)), subs, rotation=60, fontsize=7, ha="right")
            ax.set_title(f"branch output: {what}" + note + "bars: ±2 s.e.", fontsize=10)
        figs["writes"] = fig
        fig, ax = plt.subplots(figsize=(4, 3))
        n = self.meta["n_streams"]
        ax.bar(np.arange(n), self["final_top1_contribution"])
        ax.set_xticks(np.arange(n), [f"stream {s}" for s in range(n)], fontsize=7)
        ax.set_title("contribution to final top-1 logit\n(minus mean logit)", fontsize=9)
        figs["final_decomposition"] = fig
        return figs
