"""H_post Frobenius norm and variance per sublayer (the routing plot of "Ablate and Rescue").

Reproduces the H_post statistics of "Ablate and Rescue" (Peng et al. 2026, on wgpeng/mhc-780m):
per sublayer, the mean over tokens of ||H_post||_2 (the Frobenius norm of the 1 x n write vector:
how strongly the sublayer writes back), its variance over tokens averaged over streams (how
token-dependent - dynamic - the writes are) and the mean over tokens of its variance across
streams (how unevenly the write is split among the streams).

    python examples/h_post_stats.py [--model NAME_OR_PATH] [--out DIR] [--fast]
"""

from __future__ import annotations

import os
import sys

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # run as a file or via runpy
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Example, sublayer_ticks  # noqa: E402

PANELS = (
    ("h_post_fro", "E_t ||H_post||_F"),
    ("h_post_var_tokens", "variance over tokens (mean over streams)"),
    ("h_post_var_streams", "variance across streams (mean over tokens)"),
)


def main(argv=None):
    import matplotlib.pyplot as plt
    import numpy as np

    from mhc_interp.probes import StreamUsage

    ex = Example("h_post_stats", __doc__, argv)
    ex.require_streams()
    usage = ex.run(StreamUsage())
    ex.save_result(usage)
    names = usage.meta["sublayers"]
    x = np.arange(len(names))
    is_attn = np.array([s.endswith("attn") for s in names])
    fig, axes = plt.subplots(3, 1, figsize=(max(7.0, 0.15 * len(names) + 4), 7.5), sharex=True)
    for ax, (key, title) in zip(axes, PANELS):
        ax.plot(x, usage[key], color="grey", lw=0.8)
        ax.plot(x[is_attn], usage[key][is_attn], "o", ms=4, label="attn")
        ax.plot(x[~is_attn], usage[key][~is_attn], "s", ms=4, label="mlp")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    sublayer_ticks(axes[-1], names)
    axes[-1].set_xlabel("sublayer")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"H_post per sublayer ({ex.corpus_note})", fontsize=9)
    fig.tight_layout()
    caption = (
        "H_post per sublayer: mean Frobenius norm of the write vector, its variance over tokens "
        "(how dynamic the routing is) and across streams (how uneven the write split is); "
        "'Ablate and Rescue' routing plot."
    )
    ex.save_figure(fig, "h_post_stats", caption)
    fro = usage["h_post_fro"]
    k = int(fro.argmax())
    return ex.finish(
        f"E||H_post|| from {fro.min():.2f} to {fro.max():.2f} (max at {names[k]}), "
        f"token variance up to {usage['h_post_var_tokens'].max():.2g} ({ex.corpus_note})"
    )


if __name__ == "__main__":
    main()
