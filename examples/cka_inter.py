"""Inter-layer CKA between every (layer, stream) representation.

Reproduces the inter-layer CKA heatmap of "Ablate and Rescue": debiased linear CKA (minibatch,
Nguyen et al. 2021) between the representations of every stream at the embedding and every layer (block outputs),
ordered layer-major (each white-gridded n x n block is a pair of layers; diagonal blocks are the
intra-layer matrices). Bright off-diagonal blocks = representations that persist across depth;
bright bands along one stream index = a stream that changes little.

    python examples/cka_inter.py [--model NAME_OR_PATH] [--out DIR] [--fast] [--sites layers|sublayers]
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
        help="block outputs (default) or every sublayer's output, after the embedding",
    )


def main(argv=None):
    import matplotlib.pyplot as plt
    import numpy as np

    from mhc_interp.probes import CKA

    ex = Example("cka_inter", __doc__, argv, add_arguments=_options)
    ex.require_streams()
    result = ex.run(CKA(sites=ex.args.sites, minibatch_tokens=ex.cfg.cka_minibatch))
    ex.save_result(result)
    figs = result.plot()
    plt.close(figs.pop("cka_intra"))  # cka_intra.py draws those
    fig = figs["cka_inter"]
    ax = fig.axes[0]
    sites = result.site_names
    step = max(1, int(np.ceil(len(sites) / 24)))  # the plot's own tick thinning
    labels = [site_label(sites[i]) for i in range(0, len(sites), step)]
    ax.set_xticklabels(labels, rotation=90 if len(labels) > 8 else 0, fontsize=7)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_title(
        f"debiased CKA between (layer, stream) representations, {ex.n_streams} streams per layer\n"
        f"{result.meta['tokens_used']:,} tokens ({ex.corpus_note.split(',')[0]})",
        fontsize=9,
    )
    ax.set_xlabel(
        f"(layer, stream): {ex.n_streams} streams per layer, streams 0..{ex.n_streams - 1} in order"
    )
    ax.set_ylabel("(layer, stream)")
    outputs = "block outputs" if ex.args.sites == "layers" else "sublayer outputs"
    caption = (
        f"Debiased linear CKA between every (layer, stream) representation ({outputs}, layer-major; "
        "each gridded block compares two layers' streams): how representations persist across depth "
        "and across streams ('Ablate and Rescue')."
    )
    ex.save_figure(fig, "cka_inter", caption)
    n, S = ex.n_streams, len(result.site_names)
    M = result["cka"]
    same_stream = np.array([M[a * n + s, (a + 1) * n + s] for a in range(S - 1) for s in range(n)])
    return ex.finish(
        f"{S * n}x{S * n} CKA matrix; same stream, adjacent layers: mean {np.nanmean(same_stream):.2f} "
        f"(min {np.nanmin(same_stream) if same_stream.size else float('nan'):.2f}) ({ex.corpus_note})"
    )


if __name__ == "__main__":
    main()
