"""Global ablate-and-rescue matrix in the form of Table 1 of "Ablate and Rescue".

Reproduces Table 1 of "Ablate and Rescue" (Peng et al. 2026, on wgpeng/mhc-780m): for every
sublayer and stream pair {a, r}, both streams are zero-ablated in the state entering that
sublayer with every sublayer's mixing (H_pre, H_post, H_res) frozen to the clean run; the damage
is D = E_tokens KL(P_clean || P_ablated), and restoring r from the clean run while a stays ablated
leaves D_{a|r}. The rescue R(a, r) = (D - D_{a|r}) / D, averaged over sublayers (those with
D < min_kl left out), is the table's cell (row a: stays ablated, column r: recovered), in %.
A row of high values = the ablated stream is not needed once any partner is back; an asymmetric
pair has R(a, r) far from R(r, a). Writes rescue_table.md and the heatmap. `--ablation mean`
ablates to the mean state of each batch of prompts (it moves with the batch size);
`--ablation corpus_mean` to the mean over every corpus token (position 0 excluded, as in the
scoring), from a first pass over the corpus windows.

    python examples/rescue_table.py [--model NAME_OR_PATH] [--out DIR] [--fast] [--mode one_shot] [--ablation zero]
"""

from __future__ import annotations

import os
import sys

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # run as a file or via runpy
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Example  # noqa: E402

from mhc_interp.probes.figure_helpers import annotate  # noqa: E402


def rescue_options(p):
    p.add_argument(
        "--mode",
        default="one_shot",
        choices=["one_shot", "persistent"],
        help="ablate the state entering one sublayer (default) or every sublayer from there on",
    )
    p.add_argument(
        "--ablation",
        default="zero",
        choices=["zero", "mean", "corpus_mean"],
        help="ablation value: zero (default), the batch's mean, or the corpus mean (batch-size independent)",
    )
    p.add_argument("--min-kl", type=float, default=1e-3, help="damage below this is left out (default 1e-3)")


def run_rescue(ex):
    from mhc_interp.probes import AblateRescue

    ex.require_streams()
    probe = AblateRescue(mode=ex.args.mode, ablation=ex.args.ablation, min_kl=ex.args.min_kl)
    if probe.uses_corpus_mean:  # every corpus window, not only the prompts: a better estimate of the mean
        probe.fit_corpus_mean(ex.model, ex.tokens(), batch_size=ex.cfg.batch_size, progress=ex.cfg.progress)
    result = ex.run(probe, source=ex.prompts())
    ex.save_result(result)
    return result


def main(argv=None):
    import matplotlib.pyplot as plt
    import numpy as np

    ex = Example("rescue_table", __doc__, argv, causal=True, add_arguments=rescue_options)
    result = run_rescue(ex)
    meta = result.meta
    low = result["low_damage"]
    pairs_total = int(np.triu(np.ones(low.shape[1:], bool), 1).sum()) * low.shape[0]
    pairs_low = int(np.triu(low, 1).sum())
    table = result.table()
    header = (
        f"Global rescue % (rows: ablated stream, columns: recovered stream), {meta['mode'].replace('_', '-')} "
        f"{meta['ablation']} ablation with frozen mixing, mean over sublayers; {meta['prompts']} prompts x "
        f"{ex.cfg.causal_seq_len} tokens; model {ex.model_name}"
        + (
            f"; corpus mean over {meta['corpus_mean_tokens']:,} tokens."
            if "corpus_mean_tokens" in meta
            else "."
        )
    )
    weighted = result.table(weighted=True)
    note = (
        f"{pairs_low} of {pairs_total} (sublayer, pair) ablations did damage below {meta['min_kl']:g} nats "
        f"and are left out."
    )
    ex.save_text(
        "rescue_table.md",
        f"{header}\n\n{table}\n\nDamage-weighted over sublayers "
        f"((sum D - sum D_rescued) / sum D):\n\n{weighted}\n\n{note}\n",
    )
    print(header)
    print(table)
    print(note)
    g = 100 * result["global_rescue"]
    n = g.shape[0]
    fig, ax = plt.subplots(figsize=(1.6 + 0.75 * n, 1.2 + 0.7 * n))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(g), vmin=0, vmax=100, cmap=cmap)
    labels = np.char.mod("%.1f", g)
    np.fill_diagonal(labels, "-")
    annotate(ax, im, g, fontsize=9 if n <= 6 else 7, labels=labels)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("recovered stream r")
    ax.set_ylabel("ablated stream a (stays ablated)")
    ax.set_title(
        f"global rescue % R(a, r), {meta['mode'].replace('_', '-')} {meta['ablation']} ablation,\n"
        f"frozen mixing, mean over sublayers; {meta['prompts']} prompts",
        fontsize=9,
    )
    fig.colorbar(im, ax=ax, shrink=0.8, label="% of the pair's damage undone")
    caption = (
        f"Global rescue % (rows: ablated stream, columns: recovered stream), "
        f"{meta['mode'].replace('_', '-')} {meta['ablation']} ablation of a stream pair with frozen mixing, "
        f"averaged over sublayers: Table 1 of 'Ablate and Rescue'."
    )
    ex.save_figure(fig, "rescue_table", caption)
    off = ~np.eye(n, dtype=bool)
    return ex.finish(
        f"{g.shape[0]}x{g.shape[0]} rescue table, off-diagonal {np.nanmin(g[off]):.1f}% to "
        f"{np.nanmax(g[off]):.1f}%; {pairs_low}/{pairs_total} low-damage ablations left out",
        table=table,
    )


if __name__ == "__main__":
    main()
