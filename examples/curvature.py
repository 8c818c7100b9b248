"""Token-trajectory curvature of every stream and of the stream sum across layers.

Reproduces the per-stream curvature plot of "Analyzing Stream Collapse in Hyper-Connections"
(curvature as in Hosseini & Fedorenko 2023): for each sequence, the mean turning angle between
consecutive steps x_{t+1} - x_t of a stream's token trajectory, averaged over sequences (error
bars: s.e.m.), at the embedding and after every block; the dashed black line is the stream sum
(the single residual the unembedding effectively reads). Lower = straighter trajectories. The
controls are drawn with it: i.i.d. points (120 degrees, exact), a random walk (90, exact) and,
dotted, the same windows with their tokens shuffled, run through the same model. Right: the
change relative to the embedding (the shuffled control's own change dotted).

    python examples/curvature.py [--model NAME_OR_PATH] [--out DIR] [--fast] [--sites layers|sublayers]
"""

from __future__ import annotations

import os
import sys

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # run as a file or via runpy
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Example, site_label  # noqa: E402


def _options(p):
    p.add_argument(
        "--sites",
        default="layers",
        choices=["layers", "sublayers"],
        help="embedding + every block output (default) or every sublayer output",
    )


def main(argv=None):
    import matplotlib.pyplot as plt

    from mhc_interp.probes import Curvature

    ex = Example("curvature", __doc__, argv, add_arguments=_options)
    result = ex.run(Curvature(sites=ex.args.sites))
    ex.save_result(result)
    n_sites = len(result.meta["site_names"])
    fig, axes = plt.subplots(1, 2, figsize=(max(11.0, 0.35 * n_sites + 6), 4))
    result.plot(ax=axes[0])
    result.plot(ax=axes[1], change=True)
    axes[0].set_title(
        f"curvature per stream (mean ± s.e.m. over {int(result['n_sequences'][0, 0])} sequences)", fontsize=9
    )
    axes[1].set_title("change relative to the embedding", fontsize=9)
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[1].get_legend().remove()
    labels = [site_label(h) for h in result.meta["site_names"]]
    for ax in axes:
        ax.set_xticks(range(n_sites), labels, rotation=90 if n_sites > 8 else 0, fontsize=8)
        ax.set_xlabel(
            "embedding, then " + ("block outputs" if ex.args.sites == "layers" else "sublayer outputs")
        )
    fig.tight_layout()
    where = "block" if ex.args.sites == "layers" else "sublayer"
    caption = (
        "Token-trajectory curvature (degrees) of every stream and of the stream sum (dashed) at the "
        f"embedding and after every {where}, and its change from the embedding; lower = straighter. "
        "Controls: the same windows with their tokens shuffled (dotted), i.i.d. points (120, exact) "
        "and a random walk (90, exact)."
    )
    ex.save_figure(fig, "curvature", caption)
    mean, shuffled = result["mean"], result["shuffled_mean"]
    return ex.finish(
        f"stream-sum curvature {mean[0, -1]:.1f} deg at {labels[0]} -> "
        f"{mean[-1, -1]:.1f} deg at {labels[-1]} (shuffled-token control {shuffled[0, -1]:.1f} -> "
        f"{shuffled[-1, -1]:.1f}); streams at the last site "
        f"{', '.join(f'{v:.1f}' for v in mean[-1, :-1])} ({ex.corpus_note})"
    )


if __name__ == "__main__":
    main()
