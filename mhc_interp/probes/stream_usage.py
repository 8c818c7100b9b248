"""Stream-usage diagnostics (the stream-collapse paper's and "Ablate and Rescue"'s routing plots),
per sublayer, averaged over the unmasked tokens of a corpus.

For sublayer l with stream state x [n, d] and coefficients (h_pre, h_post, H_res) at a token:
    mean_h_res[l]           = E_t[H_res]                                (papers' [target, source])
    mean_h_res_dist[l]      = ||E_t[H_res] - I||_F
    h_res_dist[l]           = E_t[||H_res - I||_F]     (averaging can hide token-level permutations)
    read_share[l, s]        = E_t[|h_pre_s| / sum_s' |h_pre_s'|]       (coefficient share)
    read_share_norm[l, s]   = E_t[|h_pre_s| ||x_s|| / sum_s' |h_pre_s'| ||x_s'||]   (signal read)
    write_share[l, s]       = E_t[|h_post_s| / sum_s' |h_post_s'|]
    stream_norm[l, s]       = E_t[||x_s||_2]  of the state entering sublayer l; the last row is
                              the final state leaving the last sublayer
    h_post_fro[l]           = E_t[||h_post||_2]
    h_post_var_tokens[l]    = mean_s Var_t(h_post_s)                   (how dynamic the writes are)
    h_post_var_streams[l]   = E_t[Var_s(h_post_s)]                     (how uneven across streams)
|.| matters only for unconstrained HC, whose coefficients can be negative. All sums are float64.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

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
    take_rows,
)
from .figure_helpers import annotate, heatmap_grid
from .sites import evenly_spaced


def _share(weights: Tensor) -> Tensor:  # [..., n] -> [..., n], |w| normalised to sum 1
    w = weights.abs()
    return w / w.sum(-1, keepdim=True).clamp_min(1e-30)


@register_probe
class StreamUsage(Probe):
    name = "stream_usage"
    report = ReportSection(
        "How the sublayers read, write and mix the streams",
        order=10,
        min_streams=2,
        captions={
            "h_res": "Token-averaged residual mixer H_res [target, source] at evenly spaced sublayers: "
            "near-identity means streams are kept apart; off-diagonal mass means they are mixed.",
            "shares": "Read share (H_pre), norm-weighted read share and write share (H_post) per stream: "
            "a stream with most of the share dominates what the sublayers read or write.",
            "stream_norms": "Mean L2 norm of each stream entering every sublayer (log scale).",
            "h_post": "H_post Frobenius norm and its variance across tokens and across streams per sublayer.",
        },
    )

    def setup(self, model) -> None:
        require_streams(model, self.name)
        self.sublayers: List[str] = model.sublayer_names
        self.n_streams = model.cfg.n_streams
        self.hyper_conn_type = model.cfg.hyper_conn_type
        self.sums: Dict[str, Tensor] = {}
        self.count = 0

    def hook_names(self, model) -> List[str]:
        names = [
            f"{s}.hook_{k}" for s in model.sublayer_names for k in ("streams_in", "h_pre", "h_post", "h_res")
        ]
        return names + [f"{model.sublayer_names[-1]}.hook_streams_out"]

    def update(self, acts: Dict[str, Tensor], mask: Tensor) -> None:
        eye = torch.eye(self.n_streams, dtype=torch.float64, device=mask.device)
        rows = masked_rows(mask)

        def stacked(kind: str) -> Tensor:  # [tokens, n_sublayers, ...] float64
            return torch.stack(
                [take_rows(acts[f"{s}.hook_{kind}"], rows).double() for s in self.sublayers], dim=1
            )

        h_pre, h_post, h_res = stacked("h_pre"), stacked("h_post"), stacked("h_res")  # [tokens, L, n(, n)]
        states = [f"{s}.hook_streams_in" for s in self.sublayers] + [f"{self.sublayers[-1]}.hook_streams_out"]
        # the norms are reduced from the states as they are (no float64 copy of [tokens, n, d])
        norms = torch.stack(
            [take_rows(torch.linalg.vector_norm(acts[s], dim=-1, dtype=torch.float32), rows) for s in states],
            dim=1,
        ).double()  # [tokens, L + 1, n]
        stats = {
            "mean_h_res": h_res,
            "h_res_dist": (h_res - eye).flatten(2).norm(dim=-1),
            "read_share": _share(h_pre),
            "read_share_norm": _share(h_pre.abs() * norms[:, :-1]),
            "write_share": _share(h_post),
            "stream_norm": norms,
            "mean_h_pre": h_pre,
            "mean_h_post": h_post,
            "h_post_sq": h_post**2,
            "h_post_fro": h_post.norm(dim=-1),
            "h_post_var_streams": h_post.var(dim=-1, unbiased=False),
        }
        for key, per_token in stats.items():  # sums over tokens
            self.sums[key] = self.sums.get(key, 0) + per_token.sum(0)
        self.count += len(rows)

    def result(self) -> "StreamUsageResult":
        if self.count == 0:
            raise ValueError("stream_usage saw no unmasked tokens")
        arrays = {k: (v / self.count).cpu().numpy() for k, v in self.sums.items()}  # token means
        h_post_sq = arrays.pop("h_post_sq")
        arrays["mean_h_res_dist"] = np.linalg.norm(
            arrays["mean_h_res"] - np.eye(self.n_streams), axis=(-2, -1)
        )
        arrays["h_post_var_tokens"] = (h_post_sq - arrays["mean_h_post"] ** 2).clip(min=0).mean(-1)
        meta = {
            "sublayers": self.sublayers,
            "n_streams": self.n_streams,
            "hyper_conn_type": self.hyper_conn_type,
            "tokens": self.count,
        }
        return StreamUsageResult(self.name, arrays, meta)


@register_result
class StreamUsageResult(ProbeResult):
    def findings(self) -> List[Optional[Dict]]:
        """The stream the sublayers read most (norm-weighted read share) and how far the mixers are
        from the identity (E_t ||H_res - I||_F against sqrt(n - 1), uniform mixing)."""
        subs = self.meta["sublayers"]
        share = np.asarray(self["read_share_norm"], dtype=float).mean(0)  # [n] over sublayers
        n = share.size
        out: List[Optional[Dict]] = [None, None]
        if n > 1 and np.isfinite(share).all():
            top, low, even = int(share.argmax()), int(share.argmin()), 1 / n
            if share[top] - even < 0.05:
                text = (
                    f"No stream dominates what the sublayers read: norm-weighted read shares from "
                    f"{share[low]:.0%} to {share[top]:.0%} (an even split is {even:.0%})."
                )
            else:
                text = (
                    f"Stream {top} dominates what the sublayers read: {share[top]:.0%} of the norm-weighted "
                    f"read share (an even split is {even:.0%}; stream {low} least, {share[low]:.0%})."
                )
            out[0] = self.finding(
                "dominant_stream",
                text,
                stream=top,
                share=float(share[top]),
                least_stream=low,
                least_share=float(share[low]),
                even_share=even,
            )
        dist = np.asarray(self["h_res_dist"], dtype=float)  # E_t ||H_res - I||_F per sublayer
        if n > 1 and np.isfinite(dist).all() and dist.size:
            ref, k, mean = math.sqrt(n - 1), int(dist.argmax()), float(dist.mean())
            verdict = (
                "stay close to the identity"
                if mean < 0.2 * ref
                else "mix the streams partly"
                if mean < 0.5 * ref
                else "mix the streams strongly"
            )
            where = (
                f"except at {subs[k]} ({dist[k]:.2f})"
                if mean < 0.2 * ref and dist[k] >= 0.5 * ref
                else f"most at {subs[k]} ({dist[k]:.2f})"
            )
            out[1] = self.finding(
                "mixers",
                f"The mixers H_res {verdict}: ||H_res - I||_F = {mean:.2f} on average "
                f"(0 = identity, {ref:.2f} = uniform mixing), {where}.",
                mean_distance=mean,
                max_distance=float(dist[k]),
                max_sublayer=subs[k],
                uniform_mixing_distance=ref,
            )
        return out

    def collapse_summary(self) -> Dict[str, float]:
        """Scalars that say how far the streams have collapsed onto one:
        read_share_entropy   mean over sublayers of H(norm-weighted read share) / log2(n)
                             (1 = every stream read equally, 0 = one stream only)
        dominant_read_share  mean over sublayers of the largest norm-weighted read share
        norm_imbalance       largest / mean stream norm of the final state (1 = balanced)
        h_res_dist           mean over sublayers of E_t||H_res - I||_F (0 = streams never mixed)"""
        n = self.meta["n_streams"]
        share = np.clip(self["read_share_norm"], 1e-12, 1.0)
        entropy = -(share * np.log2(share)).sum(-1) / np.log2(n)
        final = self["stream_norm"][-1]
        return {
            "read_share_entropy": float(entropy.mean()),
            "dominant_read_share": float(self["read_share_norm"].max(-1).mean()),
            "norm_imbalance": float(final.max() / final.mean()),
            "h_res_dist": float(self["h_res_dist"].mean()),
        }

    def plot(self, max_heatmaps: int = 8):
        """{"h_res": token-averaged H_res heatmaps, "shares": read/write shares,
        "stream_norms": per-stream norms (log scale), "h_post": H_post norm and variances}."""
        import matplotlib.pyplot as plt

        subs, n = self.meta["sublayers"], self.meta["n_streams"]
        x = np.arange(len(subs))
        picks = evenly_spaced(len(subs), max_heatmaps)
        figs = {
            "h_res": heatmap_grid(
                [self["mean_h_res"][k] for k in picks],
                [subs[k] for k in picks],
                vmin=0,
                vmax=1,
                xlabel="source stream",
                ylabel="target stream",
                colorbar="mean H_res",
                title="token-averaged H_res [target, source]",
            )
        }

        fig, axes = plt.subplots(1, 3, figsize=(14, 3.4), sharey=True)
        for ax, key, title in zip(
            axes,
            ("read_share", "read_share_norm", "write_share"),
            ("read share (H_pre)", "norm-weighted read share", "write share (H_post)"),
        ):
            ax.plot(x, self[key], label=[f"stream {s}" for s in range(n)])
            ax.axhline(1 / n, color="grey", ls=":", lw=1)
            ax.set(title=title, xlabel="sublayer")
        axes[0].set_ylabel("share")
        axes[0].legend(fontsize=7)
        figs["shares"] = fig

        fig, ax = plt.subplots(figsize=(6, 3.4))
        ax.plot(np.arange(len(subs) + 1), self["stream_norm"], label=[f"stream {s}" for s in range(n)])
        ax.set(yscale="log", xlabel="sublayer (input; last = final state)", ylabel="mean ||x_s||")
        ax.legend(fontsize=7)
        figs["stream_norms"] = fig

        fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
        for ax, key, title in zip(
            axes,
            ("h_post_fro", "h_post_var_tokens", "h_post_var_streams"),
            ("E||H_post||", "Var over tokens", "Var over streams"),
        ):
            ax.plot(x, self[key], marker=".")
            ax.set(title=title, xlabel="sublayer")
        figs["h_post"] = fig
        return figs

    def save_layer_figures(self, folder) -> List[Tuple[Path, str]]:
        """One small H_res heatmap per sublayer, saved as folder/h_res_{k:03d}.png -> [(path,
        sublayer)]: one figure, its image, numbers (`annotate`) and title redrawn for each sublayer."""
        import matplotlib.pyplot as plt

        mats, names = self["mean_h_res"], self.meta["sublayers"]  # [sublayer, n, n]
        n = mats.shape[-1]
        fig, ax = plt.subplots(figsize=(3.2, 2.8))
        im = ax.imshow(mats[0], vmin=0, vmax=1, cmap="viridis")
        ax.set(xticks=range(n), yticks=range(n), xlabel="source stream", ylabel="target stream")
        fig.colorbar(im, ax=ax, shrink=0.9)
        title = ax.set_title("", fontsize=9)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        saved = []
        try:
            for k, name in enumerate(names):
                im.set_data(mats[k])
                for text in list(ax.texts):
                    text.remove()
                annotate(ax, im, mats[k], fontsize=float(np.clip(40 / n, 6, 10)))
                title.set_text(f"{name}: mean H_res")
                saved.append((folder / f"h_res_{k:03d}.png", name))
                fig.savefig(saved[-1][0], dpi=100, bbox_inches="tight")
        finally:
            plt.close(fig)
        return saved
