"""Per-sublayer read and write share of every stream.

Reproduces the read/write-share plot of "Analyzing Stream Collapse in Hyper-Connections": for
each sublayer, how the read weights H_pre and the write weights H_post are divided among the
streams, averaged over tokens: read share E_t[|h_pre_s| / sum |h_pre|], norm-weighted read share
E_t[|h_pre_s| ||x_s|| / sum_s' |h_pre_s'| ||x_s'||] (the share of the signal a sublayer actually
reads) and write share E_t[|h_post_s| / sum |h_post|]. Each bar sums to 1; the dotted line is the
even split 1/n. Collapse shows as one stream taking most of the (norm-weighted) read share.

    python examples/read_write_share.py [--model NAME_OR_PATH] [--out DIR] [--fast]
"""

from __future__ import annotations

import os
import sys

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # run as a file or via runpy
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Example, sublayer_ticks  # noqa: E402

PANELS = (
    ("read_share", "read share (H_pre)"),
    ("read_share_norm", "norm-weighted read share (H_pre · ||x_s||)"),
    ("write_share", "write share (H_post)"),
)


def main(argv=None):
    import matplotlib.pyplot as plt
    import numpy as np

    from mhc_interp.probes import StreamUsage

    ex = Example("read_write_share", __doc__, argv)
    ex.require_streams()
    usage = ex.run(StreamUsage())
    ex.save_result(usage)
    names, n = usage.meta["sublayers"], ex.n_streams
    x = np.arange(len(names))
    colors = plt.get_cmap("tab10" if n <= 10 else "tab20")(np.arange(n))
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(max(6.0, 0.16 * len(names) + 3), 7.5), sharex=True)
    for ax, (key, title) in zip(axes, PANELS):
        bottom = np.zeros(len(names))
        for s in range(n):
            ax.bar(x, usage[key][:, s], bottom=bottom, width=0.85, color=colors[s], label=f"stream {s}")
            bottom += usage[key][:, s]
        for k in range(1, n):
            ax.axhline(k / n, color="white", ls=":", lw=0.8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("share")
        ax.set_title(title, fontsize=9)
    sublayer_ticks(axes[-1], names)
    axes[-1].set_xlabel("sublayer")
    axes[0].legend(fontsize=7, ncol=min(n, 8), loc="upper center", bbox_to_anchor=(0.5, 1.45))
    fig.tight_layout()
    dom = usage["read_share_norm"].argmax(-1)
    top = np.bincount(dom, minlength=n).argmax()
    caption = (
        "Read share (H_pre), norm-weighted read share and write share (H_post) of every stream per "
        "sublayer, stacked (each bar sums to 1; dotted lines = even split). A stream taking most "
        "of the norm-weighted read share is the dominant stream of the stream-collapse paper."
    )
    ex.save_figure(fig, "read_write_share", caption)
    summary = usage.collapse_summary()
    return ex.finish(
        f"stream {top} has the largest norm-weighted read share at {int((dom == top).sum())}/"
        f"{len(names)} sublayers; mean dominant read share {summary['dominant_read_share']:.2f}, "
        f"read entropy {summary['read_share_entropy']:.2f} of max 1 ({ex.corpus_note})",
        dominant_stream=int(top),
        **summary,
    )


if __name__ == "__main__":
    main()
