"""Intra-layer stream-by-stream CKA: debiased, with the biased estimator for comparison.

Reproduces the intra-layer CKA matrices of "Ablate and Rescue": at a few evenly spaced layers
(block outputs), the n x n linear CKA between the streams' representations of the same tokens
(minibatch CKA, Nguyen et al. 2021, minibatches drawn from a token shuffle across windows). Top
row: debiased CKA (unbiased HSIC, the default); bottom row: the biased estimator, which is
inflated when features outnumber tokens. 1 = the two streams carry the same representation up to
rotation and scale, 0 = unrelated. CKA ignores scale: read it together with the stream norms.

    python examples/cka_intra.py [--model NAME_OR_PATH] [--out DIR] [--fast] [--layers 4]
"""

from __future__ import annotations

import os
import sys

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # run as a file or via runpy
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Example, fmt, site_label  # noqa: E402


def _options(p):
    p.add_argument("--layers", type=int, default=4, help="how many evenly spaced layers to show (default 4)")


def main(argv=None):
    import matplotlib.pyplot as plt
    import numpy as np

    from mhc_interp.probes import CKA
    from mhc_interp.probes.figure_helpers import annotate
    from mhc_interp.probes.sites import evenly_spaced

    ex = Example("cka_intra", __doc__, argv, add_arguments=_options)
    ex.require_streams()
    result = ex.run(CKA(sites="layers", minibatch_tokens=ex.cfg.cka_minibatch))
    ex.save_result(result)
    sites, n = result.site_names, ex.n_streams
    picks = evenly_spaced(len(sites), ex.args.layers)
    fig, axes = plt.subplots(
        2, len(picks), figsize=(0.4 + (0.75 * n + 0.6) * len(picks), 1.2 + 1.5 * n), squeeze=False
    )
    blocks = {}
    for row, key in enumerate(("cka_debiased", "cka_biased")):
        M = result[key]
        blocks[key] = np.stack([M[i * n : (i + 1) * n, i * n : (i + 1) * n] for i in range(len(sites))])
        for ax, i in zip(axes[row], picks):
            im = ax.imshow(blocks[key][i], vmin=0, vmax=1, cmap="viridis")
            annotate(ax, im, blocks[key][i], fontsize=8 if n <= 4 else 6)
            ax.set_xticks(range(n))
            ax.set_yticks(range(n))
            ax.set_title(f"{site_label(sites[i])} ({key[4:]})", fontsize=8)
        axes[row][0].set_ylabel("stream")
    for ax in axes[-1]:
        ax.set_xlabel("stream")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.7, pad=0.02, label="linear CKA")
    fig.suptitle(
        f"stream-by-stream CKA at block outputs (top: debiased, bottom: biased); "
        f"{result.meta['tokens_used']:,} tokens, minibatches of {result.meta['minibatch_tokens']} "
        f"drawn from a {result.meta['shuffle_tokens']}-token shuffle",
        fontsize=9,
    )
    caption = (
        "Linear CKA between the streams of one layer (block output) at evenly spaced layers: debiased "
        "(top) and biased (bottom, inflated when features outnumber tokens); 1 = same representation "
        "up to rotation and scale ('Ablate and Rescue')."
    )
    ex.save_figure(fig, "cka_intra", caption)
    off = ~np.eye(n, dtype=bool)
    mean_u = np.array([b[off].mean() for b in blocks["cka_debiased"]])
    mean_b = np.array([b[off].mean() for b in blocks["cka_biased"]])
    return ex.finish(
        f"mean off-diagonal stream CKA per layer: debiased {fmt(mean_u)}; biased {fmt(mean_b)} "
        f"({ex.corpus_note})",
        picks=[int(i) for i in picks],
    )


if __name__ == "__main__":
    main()
