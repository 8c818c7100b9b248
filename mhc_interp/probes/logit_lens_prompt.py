"""The logit lens on one prompt: top-k tokens per site, view and position (`logit_lens`), with
the same views and readout as the corpus probe `LogitLens` (see `logit_lens.py`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from .base import index_of, register_result
from .logit_lens import (
    LogitLensResult,
    Translator,
    _check_write_readout,
    _readout,
    _translate,
    _view_colours,
    _view_labels,
    _write_readout,
    check_subsets,
    lens_sites,
    stream_sums,
)
from .sites import SiteSpec, site_label

if TYPE_CHECKING:
    from ..contract import MultiStreamModel

__all__ = ["logit_lens", "PromptLensResult"]

_SITE_ARRAYS = ("topk_ids", "topk_probs", "kl", "top1_agree")  # [site, view, pos(, k)]
_WRITE_ARRAYS = ("write_topk_ids", "write_topk_probs", "write_kl")  # [sublayer, pos(, k)]


def _kl_top1(final_lp: Tensor, final_top: Tensor, logits: Tensor) -> Tuple[Tensor, Tensor]:
    """final_lp [N, V] (log-probs), final_top [N]; logits [N, k, V] -> KL(P_final||P) [N, k],
    agreement [N, k] (bool). The direct formula (the single-prompt lens; `_Final.stats` is the
    probe's cheaper equivalent)."""
    lp = F.log_softmax(logits, dim=-1)
    kl = (final_lp.exp()[:, None] * (final_lp[:, None] - lp)).sum(-1).clamp_min(0)  # >= 0 up to rounding
    return kl, logits.argmax(-1) == final_top[:, None]


def _view_logits(contrib: Tensor, subsets: Sequence[Tuple[int, ...]]) -> Tensor:
    """contrib [N, n, V] -> view logits [N, n_views, V]: sum, each stream, each subset."""
    added = stream_sums(contrib, subsets, 1)  # [N, 1 + subsets, V]
    return torch.cat([added[:, :1], contrib, added[:, 1:]], 1)


def _lens_arrays(final_lp: Tensor, top: Tensor, logits: Tensor, k: int) -> Tuple[Tensor, ...]:
    """Against the final log-probs final_lp [pos, V] (top [pos]: their argmax), logits [pos, j, V]
    -> (top-k ids, their probabilities [j, pos, k], KL(P_final||P) [j, pos], top-1 agreement [j, pos])."""
    kl, agree = _kl_top1(final_lp, top, logits)
    probs, ids = F.softmax(logits, -1).topk(k, dim=-1)
    return ids.transpose(0, 1), probs.transpose(0, 1), kl.T, agree.T


def _token_strings(tokenizer, out: Dict[str, np.ndarray]) -> Dict[str, object]:
    """meta's token_strs (the prompt's tokens) and vocab_strs (every token id in a top-k)."""
    shown = np.concatenate([out[key].ravel() for key in ("topk_ids", "write_topk_ids", "final_topk_ids")])
    return {
        "token_strs": [tokenizer.decode([int(t)]) for t in out["tokens"]],
        "vocab_strs": {int(t): tokenizer.decode([int(t)]) for t in np.unique(shown)},
    }


# ------------------------------------------------------------------------ single prompt
@torch.no_grad()
def logit_lens(
    model: "MultiStreamModel",
    tokens,
    *,
    k: int = 5,
    subsets=None,
    sites: SiteSpec = None,
    writes: bool = True,
    translator: Translator = None,
) -> "PromptLensResult":
    """The lens on one prompt (tokens [pos] or [1, pos], or text with a tokenizer), every position.

    Arrays: topk_ids / topk_probs [site, view, pos, k], kl [site, view, pos] (KL(P_final||P_view)),
    top1_agree [site, view, pos]; write_topk_ids / write_topk_probs [sublayer, pos, k], write_kl
    [sublayer, pos]; final_topk_ids [pos, k] and final_topk_contributions [pos, n_streams, k]
    (the exact per-stream split of the final top-k logits); tokens [pos].
    meta: sites, site_labels, views, sublayers, token_strs (if the model has a tokenizer),
    decomposition_max_error."""
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    tokens = model._check_tokens(tokens)
    if tokens.shape[0] != 1:
        raise ValueError(
            f"logit_lens takes one prompt (tokens [pos] or [1, pos]), got batch "
            f"{tokens.shape[0]}; use the LogitLens probe with run_probes for a corpus"
        )
    n = model.cfg.n_streams
    subsets = check_subsets(subsets, n)
    site_names = lens_sites(model, sites)
    subs = model.sublayer_names if writes else []
    final_site = f"{model.sublayer_names[-1]}.hook_streams_out"
    write_sites = [f"{s}.hook_write" for s in subs]
    wanted = {*site_names, final_site, *write_sites}
    logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name in wanted)
    if subs:
        _check_write_readout(model)
    final = logits[0].float()
    final_lp = F.log_softmax(final, dim=-1)
    top = final.argmax(-1)
    k = min(int(k), final.shape[-1])
    per_site = [  # the view logits [pos, views, V] of each site
        _lens_arrays(
            final_lp, top, _view_logits(_readout(model, _translate(translator, s, cache[s][0])), subsets), k
        )
        for s in site_names
    ]
    out = {key: torch.stack(v).cpu().numpy() for key, v in zip(_SITE_ARRAYS, zip(*per_site))}
    wl = [_write_readout(model, _translate(translator, s, cache[s][0])) for s in write_sites]
    wl = torch.stack(wl, 1) if wl else final_lp[:, None][:, :0]  # [pos, sublayer, V]
    for key, v in zip(_WRITE_ARRAYS, _lens_arrays(final_lp, top, wl, k)):
        out[key] = v.cpu().numpy()
    contrib = _readout(model, cache[final_site][0])  # [pos, n, V]
    f_ids = final.topk(k, dim=-1).indices  # [pos, k]
    out.update(
        final_topk_ids=f_ids.cpu().numpy(),
        final_topk_contributions=contrib.gather(-1, f_ids[:, None].expand(-1, n, -1)).cpu().numpy(),
        tokens=tokens[0].cpu().numpy(),
    )
    meta = {
        "sites": site_names,
        "site_labels": [site_label(s) for s in site_names],
        "views": _view_labels(n, subsets),
        "subsets": [list(s) for s in subsets],
        "sublayers": subs,
        "n_streams": n,
        "k": k,
        "hyper_conn_type": model.cfg.hyper_conn_type,
        "decomposition_max_error": float((contrib.sum(1) - final).abs().max()),
        "translator": None if translator is None else repr(translator),
        "kl_direction": "KL(P_final || P_view), nats",
    }
    if model.tokenizer is not None:
        meta.update(_token_strings(model.tokenizer, out))
    return PromptLensResult("logit_lens_prompt", out, meta)


@register_result
class PromptLensResult(LogitLensResult):
    """Single-prompt logit lens (see `logit_lens`)."""

    def _tok(self, t: int) -> str:
        strs = self.meta.get("vocab_strs")
        if strs:
            return repr(strs.get(int(t), strs.get(str(int(t)), str(int(t)))))
        return str(int(t))

    def _site_index(self, site: Union[str, int]) -> int:
        return index_of(site, self.meta["sites"], "site", self.meta["site_labels"])

    def top_tokens(
        self, site: Union[str, int] = -1, view: Union[str, int] = "sum", position: int = -1
    ) -> List[Tuple[int, float]]:
        """[(token id, probability)] top-k of one site / view at one position."""
        i, j = self._site_index(site), self.view_index(view)
        return [
            (int(t), float(p))
            for t, p in zip(self["topk_ids"][i, j, position], self["topk_probs"][i, j, position])
        ]

    def table(self, position: int = -1, views: Optional[Sequence[Union[str, int]]] = None) -> str:
        """Top-k tokens (with probability) per site (rows) and view at one position; branch
        outputs at the end."""
        cols = [self.view_index(v) for v in (views if views is not None else range(len(self.meta["views"])))]
        lines = []
        for i, lab in enumerate(self.meta["site_labels"]):
            for j in cols:
                toks = ", ".join(
                    f"{self._tok(t)} {p:.2f}"
                    for t, p in zip(self["topk_ids"][i, j, position], self["topk_probs"][i, j, position])
                )
                lines.append(
                    f"{lab:<16} {self.meta['views'][j]:<14} KL {self['kl'][i, j, position]:7.3f} | {toks}"
                )
        for i, sub in enumerate(self.meta["sublayers"]):
            toks = ", ".join(
                f"{self._tok(t)} {p:.2f}"
                for t, p in zip(self["write_topk_ids"][i, position], self["write_topk_probs"][i, position])
            )
            lines.append(f"{sub:<16} {'write':<14} KL {self['write_kl'][i, position]:7.3f} | {toks}")
        return "\n".join(lines)

    def plot(self, position: int = -1):
        """{"kl": KL per site and view at `position`, "top1_grid": the stream-sum view's top-1
        token per site (rows) and position (columns), coloured by its probability,
        "final_decomposition": per-stream contributions to the final top-k logits at `position`}."""
        import matplotlib.pyplot as plt

        labels, views = self.meta["site_labels"], self.meta["views"]
        figs = {}
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(labels)), 3.6))
        colours = _view_colours(views)
        for j, v in enumerate(views):
            ax.plot(
                np.arange(len(labels)),
                self["kl"][:, j, position],
                marker=".",
                label=v,
                color=colours[v],
                lw=2 if v == "sum" else 1,
            )
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xticks(np.arange(len(labels)), labels, rotation=60, fontsize=7, ha="right")
        ax.set_title(f"KL(P_final || P_lens) at position {position}")
        ax.legend(fontsize=7)
        figs["kl"] = fig
        probs = self["topk_probs"][:, 0, :, 0]  # [site, pos]
        ids = self["topk_ids"][:, 0, :, 0]
        fig, ax = plt.subplots(figsize=(max(5, 0.6 * probs.shape[1]), max(3, 0.3 * len(labels))))
        ax.imshow(probs, aspect="auto", cmap="Blues", vmin=0, vmax=1)
        for (i, j), t in np.ndenumerate(ids):
            ax.text(j, i, self._tok(t)[:8], ha="center", va="center", fontsize=6)
        ax.set_yticks(np.arange(len(labels)), labels, fontsize=7)
        ax.set(xlabel="position", title="top-1 of the stream sum per site")
        figs["top1_grid"] = fig
        contrib = self["final_topk_contributions"][position]  # [n, k]
        fig, ax = plt.subplots(figsize=(5, 3))
        n, k = contrib.shape
        for s in range(n):
            ax.bar(np.arange(k) + (s - (n - 1) / 2) * 0.8 / n, contrib[s], width=0.8 / n, label=f"stream {s}")
        ax.set_xticks(np.arange(k), [self._tok(t) for t in self["final_topk_ids"][position]], fontsize=7)
        ax.set_title("final top-k logits split by stream")
        ax.legend(fontsize=7)
        figs["final_decomposition"] = fig
        return figs
