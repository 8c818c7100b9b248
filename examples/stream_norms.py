"""Per-stream L2 norm across depth (log scale).

Reproduces the per-stream norm plot of "Analyzing Stream Collapse in Hyper-Connections": the mean
over tokens of ||x_s||_2 of every stream entering each sublayer, plus the final state leaving the
last one. The paper finds the signal concentrating in a dominant stream, whose norm grows away
from the others. Norms are not output influence: the final LayerNorm is applied per stream.

    python examples/stream_norms.py [--model NAME_OR_PATH] [--out DIR] [--fast]
"""

from __future__ import annotations

import os
import sys

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # run as a file or via runpy
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Example, fmt, sublayer_ticks  # noqa: E402


def main(argv=None):
    import matplotlib.pyplot as plt
    import numpy as np

    from mhc_interp.probes import StreamUsage

    ex = Example("stream_norms", __doc__, argv)
    ex.require_streams()
    usage = ex.run(StreamUsage())
    ex.save_result(usage)
    names, n = usage.meta["sublayers"], ex.n_streams
    norms = usage["stream_norm"]  # [n_sublayers + 1, n]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(names) + 4), 3.8))
    x = np.arange(len(names) + 1)
    for s in range(n):
        ax.plot(x, norms[:, s], marker=".", label=f"stream {s}")
    ax.set_yscale("log")
    sublayer_ticks(ax, list(names) + ["final"])
    ax.set_xlabel("state entering sublayer (last: final state)")
    ax.set_ylabel("mean ||x_s||_2 (log)")
    ax.set_title(f"per-stream L2 norm ({ex.corpus_note})", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    caption = (
        "Mean L2 norm of each stream entering every sublayer, and of the final state (log scale): "
        "a dominant stream shows as one line growing away from the others."
    )
    ex.save_figure(fig, "stream_norms", caption)
    final = norms[-1]
    top = int(final.argmax())
    return ex.finish(
        f"final-state norms {fmt(final, 1)}: stream {top} largest, "
        f"{final.max() / final.mean():.2f}x the mean ({ex.corpus_note})",
        norm_imbalance=float(final.max() / final.mean()),
        largest_stream=top,
    )


if __name__ == "__main__":
    main()
