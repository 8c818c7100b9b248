"""Attention-head detectors: a score per (layer, head) for five head roles, a top-k table, a
layer-distribution plot, and which residual streams each head's sublayer reads from and writes to.

Scores (pattern = `blocks.{l}.attn.hook_pattern` [batch, head, query q, key k]; averaged over the
query positions the runner's mask keeps):

    previous_token    E_q[pattern[q, q-1]]
    duplicate_token   E_q[sum_{k < q, tok_k = tok_q} pattern[q, k]]
    induction         E_q[sum_{k: k-1 < q-1, tok_{k-1} = tok_q} pattern[q, k]]
    copy_suppression  E_q[mean_{k<=q} dlogit[q, tok_k] - mean_v dlogit[q, v]], dlogit = logits with the
                      head's hook_z slice zeroed - clean (positive: the head suppresses context tokens)
    successor         direct-logit readout of each head on ordinal sequences (`head_inputs`)

`detect_heads(model, corpus)` runs `HeadDetector` (a causal probe); `mean_h_pre[l, s]`,
`mean_h_post[l, s]` are the token-averaged read / write weights of `blocks.{l}.attn`, shared by
all its heads. Details (which queries count, the ablation, the generated sequences, attention
paths): docs/probes.md#attention-heads-headspy
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from .base import ProbeResult, ReportSection, register_probe, register_result
from .causal import CausalProbe
from .head_inputs import (
    DEFAULT_ORDINAL_WORDS,
    HEAD_SCORES,
    _check_heads,
    add_successor,
    add_whole_list_successor,
    check_attention_model,
    head_ablation_hook,
    repeated_random_tokens,
    successor_scores,
)
from .runner import run_probes

__all__ = [
    "HeadDetector",
    "HeadScores",
    "detect_heads",
    "repeated_random_tokens",
    "successor_scores",
    "head_ablation_hook",
    "check_attention_model",
    "add_whole_list_successor",
    "HEAD_SCORES",
    "DEFAULT_ORDINAL_WORDS",
]

_PATTERN_SCORES = ("previous_token", "duplicate_token", "induction")
_CORPUS_SCORES = _PATTERN_SCORES + ("copy_suppression",)  # what HeadDetector scores
_COEFFICIENTS = ("h_pre", "h_post")  # the attention sublayer's mixing it averages


# ------------------------------------------------------------------------------ the probe
class _StopForward(Exception):
    """Raised by a hook to end an ablation forward once the stream sum is known."""


@register_probe
class HeadDetector(CausalProbe):
    """Scores previous-token, duplicate-token and induction heads from attention patterns and
    copy-suppression heads by per-head ablation, on the tokens the runner gives it; also the
    token-averaged H_pre / H_post of every attention sublayer. State: [L, H] and [L, n] float64
    sums. `result()` gives a `HeadScores` (successor: NaN, see `detect_heads`).

    copy_suppression: run the per-head ablations (L x H extra partial forwards per batch, batched
    `max_rows` rows at a time, each resuming from the clean state entering the head's layer and
    stopping at the stream sum: the logits are only formed for the context tokens and the
    vocabulary mean, never [rows, pos, d_vocab]).
    heads: restrict the ablations to these (layer, head) pairs (others get NaN).
    """

    name = "head_detector"
    report = ReportSection(
        "What the attention heads do",
        order=70,
        captions={
            "scores": "Attention-head scores per (layer, head): previous-token, duplicate-token, induction, successor "
            "and copy-suppression.",
            "layer_distribution": "Where the best heads of each kind sit.",
            "read_write": "Which streams the attention sublayer of each top head reads (H_pre) and writes (H_post); "
            "heads of one layer share their sublayer's mixing.",
        },
    )

    for_report = None  # not in the shared forward: `report_run`

    @classmethod
    def report_run(cls, model, tokens: Tensor, cfg, timer):
        """Head scores on the report's causal budget (a forward per ablated head) in one batch of
        the corpus windows, and the successor scores on whole ordinal lists."""
        heads = run_probes(
            model,
            cls(heads=cfg.sampled_heads(model)),
            tokens[: 2 * cfg.causal_prompts, : cfg.causal_seq_len],
            batch_size=2 * cfg.causal_prompts,
            progress=cfg.progress,
            timer=timer,
        )  # one batch: 0.61x
        with timer("head_detector: successor"):
            add_whole_list_successor(model, heads)
        return [(heads, cfg.sample_note(model, "heads"))]

    def __init__(
        self,
        copy_suppression: bool = True,
        heads: Optional[Sequence[Tuple[int, int]]] = None,
        max_rows: int = 64,
    ):
        if int(max_rows) < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.copy_suppression = bool(copy_suppression)
        self.heads_spec = heads
        self.max_rows = int(max_rows)

    def setup(self, model) -> None:
        check_attention_model(model)
        cfg = model.cfg
        self.n_layers, self.n_heads, self.n_streams = cfg.n_layers, cfg.n_heads, cfg.n_streams
        self.ablate = _check_heads(model, self.heads_spec)
        self.hyper_conn_type = cfg.hyper_conn_type
        self.sums = {  # [L, H] per score, [L, n] per mixing coefficient
            k: torch.zeros(
                self.n_layers, self.n_streams if k in _COEFFICIENTS else self.n_heads, dtype=torch.float64
            )
            for k in _CORPUS_SCORES + _COEFFICIENTS
        }
        self.counts = dict.fromkeys(_CORPUS_SCORES, 0)
        self.n_tokens = 0

    # -- pattern scores ------------------------------------------------------------------
    def _pattern_pass(self, model, tokens: Tensor, mask: Tensor) -> None:
        b, p = tokens.shape
        dev = tokens.device
        lower = torch.ones(p, p, dtype=torch.bool, device=dev).tril(-1)  # k < q
        dup = (tokens[:, :, None] == tokens[:, None, :]) & lower  # [B, q, k]
        ind = F.pad(dup[:, :, :-1], (1, 0)) & lower  # key k+1 of an earlier match
        q_masks = {
            "previous_token": mask & (torch.arange(p, device=dev) > 0),
            "duplicate_token": dup.any(-1) & mask,
            "induction": ind.any(-1) & mask,
        }
        for key, qm in q_masks.items():
            self.counts[key] += int(qm.sum())
        weights = {k: v.double() for k, v in q_masks.items()}
        dup_f, ind_f = dup.float(), ind.float()
        found: Dict[tuple, Tensor] = {}  # (score or h_pre / h_post, layer) -> sums on the device

        def on_pattern(pattern: Tensor, hook) -> None:
            layer = int(hook.name.split(".")[1])
            pat = pattern.float()  # [B, H, q, k]
            per_q = {
                "previous_token": F.pad(pat.diagonal(-1, -2, -1), (1, 0)),  # [B, H, q] each
                "duplicate_token": torch.einsum("bhqk,bqk->bhq", pat, dup_f),
                "induction": torch.einsum("bhqk,bqk->bhq", pat, ind_f),
            }
            for key, v in per_q.items():
                found[key, layer] = (v.double() * weights[key][:, None]).sum((0, 2))

        def on_coeff(h: Tensor, hook) -> None:
            layer = int(hook.name.split(".")[1])
            found[hook.name.split("hook_")[-1], layer] = (h.double() * mask[..., None]).sum((0, 1))

        hooks = [
            (f"blocks.{l}.attn.hook_{k}", on_pattern if k == "pattern" else on_coeff)
            for l in range(self.n_layers)
            for k in ("pattern", *_COEFFICIENTS)
        ]
        with model.hooks(fwd_hooks=hooks):
            model(tokens, stop_at_sublayer=2 * self.n_layers - 1, return_type=None)
        flat = torch.cat([v.to(dev).flatten() for v in found.values()]).cpu()  # one copy back for all
        for (key, layer), v in zip(found, flat.split([v.numel() for v in found.values()])):
            self.sums[key][layer] += v

    # -- copy suppression ----------------------------------------------------------------
    def _copy_suppression_pass(self, model, tokens: Tensor, mask: Tensor) -> None:
        b, p = tokens.shape
        layers = sorted(self.ablate)
        names = [f"blocks.{l}.attn.hook_streams_in" for l in layers] + ["hook_stream_sum"]
        _, cache = model.run_with_cache(tokens, names_filter=names)
        clean = cache["hook_stream_sum"].float()  # [B, pos, d]
        W_U = model.W_U.detach().float()
        w_tok = W_U.T[tokens]  # [B, pos(k), d]
        w_mean = W_U.mean(1)  # [d]
        ctx = torch.ones(p, p, dtype=torch.bool, device=tokens.device).tril() & mask[:, None, :]  # [B, q, k]
        ctx_w = ctx.float() / ctx.float().sum(-1, keepdim=True).clamp_min(1)
        q_ok = mask & ctx.any(-1)
        self.counts["copy_suppression"] += int(q_ok.sum())
        for l in layers:
            heads = self.ablate[l]
            per_chunk = max(1, self.max_rows // b)
            for lo in range(0, len(heads), per_chunk):
                chunk = heads[lo : lo + per_chunk]
                c = len(chunk)
                keep = torch.ones(c, 1, 1, self.n_heads, 1, device=tokens.device, dtype=model.dtype)
                keep[range(c), :, :, chunk] = 0  # replica i zeroes head chunk[i]
                out: Dict[str, Tensor] = {}

                def zero_heads(z: Tensor, hook, c=c, keep=keep) -> Tensor:
                    return (z.unflatten(0, (c, b)) * keep).flatten(0, 1)

                def grab(x: Tensor, hook, out=out) -> None:
                    out["sum"] = x
                    raise _StopForward  # the logits are never formed: [rows, pos, d_vocab] saved

                state = cache[f"blocks.{l}.attn.hook_streams_in"].repeat(c, 1, 1, 1)
                try:
                    with model.hooks(
                        fwd_hooks=[(f"blocks.{l}.attn.hook_z", zero_heads), ("hook_stream_sum", grab)]
                    ):
                        model(state, start_at_sublayer=2 * l, return_type=None, tokens=tokens.repeat(c, 1))
                except _StopForward:
                    pass
                d_sum = out["sum"].float().unflatten(0, (c, b)) - clean  # [c, B, pos, d]
                d_ctx = torch.einsum("cbqd,bkd->cbqk", d_sum, w_tok)  # dlogit[q, tok_k]
                d_ctx = (d_ctx * ctx_w).sum(-1)  # [c, B, q]
                d_mean = d_sum @ w_mean  # [c, B, q]
                self.sums["copy_suppression"][l, chunk] += (
                    ((d_ctx - d_mean) * q_ok).double().sum((1, 2)).cpu()
                )

    @torch.no_grad()
    def intervene(self, model, tokens: Tensor, mask: Tensor) -> None:
        mask = mask.to(tokens.device).bool()
        self._pattern_pass(model, tokens, mask)
        if self.copy_suppression:
            self._copy_suppression_pass(model, tokens, mask)
        self.n_tokens += int(mask.sum())

    def result(self) -> "HeadScores":
        if self.n_tokens == 0:
            raise ValueError("head_detector saw no unmasked tokens")
        nan = np.full((self.n_layers, self.n_heads), np.nan)
        arrays = {"successor": nan}
        skipped = {
            "successor": "successor scores need ordinal sequences: use detect_heads(..., ordinal_sequences=...)"
        }
        if not self.copy_suppression:
            skipped["copy_suppression"] = "copy_suppression=False"
        for key in _CORPUS_SCORES:
            if self.counts[key] == 0:
                skipped.setdefault(key, f"no query position qualified for {key} in the tokens seen")
            arrays[key] = nan.copy() if key in skipped else (self.sums[key] / self.counts[key]).numpy()
        ablated = np.zeros((self.n_layers, self.n_heads), dtype=bool)  # [L, H]
        for l, heads in self.ablate.items():
            ablated[l, heads] = True
        arrays["copy_suppression"][~ablated] = np.nan
        arrays.update({f"mean_{k}": (self.sums[k] / self.n_tokens).numpy() for k in _COEFFICIENTS})
        sources = {k: "corpus" for k in HEAD_SCORES if k not in skipped}
        sources.update(dict.fromkeys(skipped, "skipped"))
        meta = {
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_streams": self.n_streams,
            "hyper_conn_type": self.hyper_conn_type,
            "tokens": self.n_tokens,
            "counts": dict(self.counts),
            "sources": sources,
            "skipped": skipped,
            "reads_writes_source": "corpus",
        }
        return HeadScores(self.name, arrays, meta)


# ------------------------------------------------------------------------------ the result
@register_result
class HeadScores(ProbeResult):
    """Arrays: one [n_layers, n_heads] score per name in HEAD_SCORES (NaN = not computed, see
    meta["skipped"]), mean_h_pre / mean_h_post [n_layers, n_streams] at each attention sublayer.
    meta: sources (where each score was measured), counts (queries / items averaged), skipped."""

    def top_heads(self, score: str = "previous_token", k: int = 10) -> List[dict]:
        """The k highest-scoring heads: [{"layer", "head", "score", "reads", "writes"}]; reads /
        writes = the mean H_pre / H_post of the head's attention sublayer (per stream)."""
        if score not in HEAD_SCORES:
            raise KeyError(f"unknown score {score!r}; scores: {HEAD_SCORES}")
        s = self[score]
        ranked = [
            divmod(int(i), s.shape[1])
            for i in np.argsort(-s, axis=None, kind="stable")
            if np.isfinite(s.flat[i])
        ]
        return [
            {
                "layer": l,
                "head": h,
                "score": float(s[l, h]),
                "reads": self["mean_h_pre"][l].tolist(),
                "writes": self["mean_h_post"][l].tolist(),
            }
            for l, h in ranked[:k]
        ]

    def table(self, scores: Optional[Sequence[str]] = None, k: int = 10) -> str:
        """Top-k heads per score, with the streams each reads from / writes to."""
        lines = []
        for score in scores or HEAD_SCORES:
            src = self.meta.get("sources", {}).get(score, "")
            lines.append(f"{score} ({src})")
            if score in self.meta.get("skipped", {}):
                lines.append(f"  skipped: {self.meta['skipped'][score]}")
                continue
            lines.append(f"  {'rank':>4} {'head':>7} {'score':>9}   reads (H_pre)   writes (H_post)")
            for r, row in enumerate(self.top_heads(score, k)):
                reads, writes = (" ".join(f"{v:.2f}" for v in row[key]) for key in ("reads", "writes"))
                lines.append(
                    f"  {r + 1:>4} {row['layer']:>3}.{row['head']:<3} {row['score']:9.4f}   {reads}   {writes}"
                )
        return "\n".join(lines)

    def plot(self, k: int = 5):
        """{"scores": [layer, head] heatmap per score, "layer_distribution": each head's score
        against its layer (top head of each layer ringed), "read_write": mean H_pre / H_post per
        stream of the layers holding the top-k heads of each score}."""
        import matplotlib.pyplot as plt

        from .figure_helpers import annotate, empty_panel, panel_grid

        L, H, n = self.meta["n_layers"], self.meta["n_heads"], self.meta["n_streams"]
        skipped = self.meta.get("skipped", {})
        fig, axes, _ = panel_grid(len(HEAD_SCORES), (3.4, max(2.4, 0.3 * L + 1)), max_cols=3, extra_width=0)
        spread, spread_axes, _ = panel_grid(len(HEAD_SCORES), (3.4, 2.6), max_cols=3, extra_width=0)
        spread.subplots_adjust(wspace=0.35, hspace=0.45)
        figs = {"scores": fig, "layer_distribution": spread}
        rng = np.random.default_rng(0)
        for ax, spread_ax, score in zip(axes, spread_axes, HEAD_SCORES):
            s = self[score]  # [layer, head]
            for l in range(L):
                spread_ax.scatter(np.full(H, l) + rng.uniform(-0.15, 0.15, H), s[l], s=8, alpha=0.6)
                if np.isfinite(s[l]).any():
                    spread_ax.scatter([l], [np.nanmax(s[l])], s=40, facecolors="none", edgecolors="k")
            for a in (ax, spread_ax):
                a.set_title(score.replace("_", " "), fontsize=9)
            if not np.isfinite(s).any():
                for a in (ax, spread_ax):
                    empty_panel(a, f"not computed: {skipped.get(score, 'no value')}")
                continue
            im = ax.imshow(np.ma.masked_invalid(s), aspect="auto", cmap="viridis")
            if H <= 16:
                ax.set_xticks(range(H))
            if L <= 16:
                ax.set_yticks(range(L))
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            fig.colorbar(im, ax=ax, shrink=0.8)
            spread_ax.set_xticks(np.arange(L))
            spread_ax.set_xlabel("layer")
            spread_ax.set_ylabel("head score")
        fig.subplots_adjust(wspace=0.45, hspace=0.45)
        rows, labels, groups = [], [], []
        for score in HEAD_SCORES:
            for row in self.top_heads(score, k):
                labels.append(f"{score.replace('_', ' ')}  L{row['layer']} H{row['head']}")
                rows.append(row)
            groups.append(len(rows))
        fig, axes = plt.subplots(
            1,
            2,
            figsize=(3.4 + 2 * (0.55 * n + 1.1), max(2.5, 0.3 * len(rows) + 1.4)),
            sharey=True,
        )
        for ax, key, title in zip(axes, ("reads", "writes"), ("reads: mean H_pre", "writes: mean H_post")):
            if rows:
                values = np.array([row[key] for row in rows])
                im = ax.imshow(values, aspect="auto", cmap="magma")
                annotate(ax, im, values, fontsize=7)
                fig.colorbar(im, ax=ax, shrink=0.8, pad=0.03)
                for g in groups[:-1]:
                    ax.axhline(g - 0.5, color="white", lw=1.5)
            else:
                empty_panel(ax, "no head has a finite score")
            ax.set_xticks(np.arange(n), [f"stream {s}" for s in range(n)], fontsize=8)
            ax.set_title(title, fontsize=9)
        if rows:
            axes[0].set_yticks(np.arange(len(rows)), labels, fontsize=8)
        fig.suptitle(
            f"streams read / written by the sublayers of the top-{k} heads of each score", fontsize=9
        )
        figs["read_write"] = fig
        return figs


# ------------------------------------------------------------------------------ the driver
def detect_heads(
    model,
    corpus=None,
    *,
    ordinal_sequences=None,
    n_random: int = 32,
    half_len: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 8,
    copy_suppression: bool = True,
    heads: Optional[Sequence[Tuple[int, int]]] = None,
    max_rows: int = 64,
    max_tokens: Optional[int] = None,
    seq_len: Optional[int] = None,
    progress: bool = False,
) -> HeadScores:
    """Every head score (see the module docstring) in one `HeadScores`.

    corpus: any `run_probes` token source, for previous-token and copy-suppression scores and the
        reads / writes; None = use the repeated random sequences for them too.
    ordinal_sequences: lists of token ids (or single-token words, with a tokenizer) in ordinal
        order, for successor scores; None = built-in day / month / number lists if the model has a
        tokenizer, else the successor score is skipped (NaN, reason in meta["skipped"]).
    n_random, half_len, seed: the repeated random sequences (`repeated_random_tokens`).
    heads: restrict copy-suppression ablations to these (layer, head) pairs.
    """
    check_attention_model(model)
    rep = repeated_random_tokens(model, n_random, half_len, seed)
    probe = HeadDetector(copy_suppression=copy_suppression and corpus is None, heads=heads, max_rows=max_rows)
    synthetic = run_probes(model, probe, rep, batch_size=batch_size, progress=progress)
    if corpus is None:
        on, where = synthetic, "repeated_random"
    else:
        on = run_probes(
            model,
            HeadDetector(copy_suppression=copy_suppression, heads=heads, max_rows=max_rows),
            corpus,
            batch_size=batch_size,
            max_tokens=max_tokens,
            seq_len=seq_len,
            progress=progress,
        )
        where = "corpus"
    arrays = {"mean_h_pre": on["mean_h_pre"], "mean_h_post": on["mean_h_post"]}
    sources, counts, skipped = {}, {}, {}
    for run, run_source, keys in (
        (synthetic, "repeated_random", ("induction", "duplicate_token")),
        (on, where, ("previous_token", "copy_suppression")),
    ):
        for key in keys:
            arrays[key], sources[key], counts[key] = run[key], run_source, run.meta["counts"][key]
            if key in run.meta["skipped"]:
                skipped[key] = run.meta["skipped"][key]
    sources.update(dict.fromkeys(skipped, "skipped"))
    meta = {
        **{k: on.meta[k] for k in ("n_layers", "n_heads", "n_streams", "hyper_conn_type")},
        "sources": sources,
        "counts": counts,
        "skipped": skipped,
        "reads_writes_source": where,
        "repeated_random": {"n_seq": int(rep.shape[0]), "seq_len": int(rep.shape[1]), "seed": seed},
        "tokens": on.meta["tokens"],
    }
    result = HeadScores("head_detector", arrays, meta)
    add_successor(model, result, ordinal_sequences)
    return result
