"""Token-averaged residual mixers H_res of an early and a deep sublayer, side by side.

Reproduces the H_res heatmaps of "Analyzing Stream Collapse in Hyper-Connections" (Alimaskina et
al. 2026): E_t[H_res] in the papers' [target, source] convention, averaged over the corpus tokens
(position 0 excluded). The paper's observation: after an early seeding stage the residual mixing
stays close to the identity, so the streams are barely mixed in deep layers. Each panel's title
gives ||E_t H_res - I||_F and E_t ||H_res - I||_F (the second is larger when the per-token mixers
are far from I but average out, e.g. token-dependent permutations).

    python examples/h_res_matrices.py [--model NAME_OR_PATH] [--out DIR] [--fast] [--early K] [--deep K]
"""

from __future__ import annotations

import os
import sys

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # run as a file or via runpy
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Example, short  # noqa: E402


def _options(p):
    p.add_argument("--early", default="0", help="early sublayer: index or name like blocks.0.mlp (default 0)")
    p.add_argument("--deep", default="-1", help="deep sublayer: index or name (default -1, the last one)")


def pick(names, spec: str) -> int:
    if spec in names:
        return names.index(spec)
    try:
        k = int(spec)
    except ValueError:
        raise SystemExit(f"unknown sublayer {spec!r}; sublayers: {', '.join(names)}") from None
    if not -len(names) <= k < len(names):
        raise SystemExit(f"sublayer index {k} out of range for {len(names)} sublayers")
    return k % len(names)


def main(argv=None):
    import matplotlib.pyplot as plt

    from mhc_interp.probes import StreamUsage
    from mhc_interp.probes.figure_helpers import annotate

    ex = Example("h_res_matrices", __doc__, argv, add_arguments=_options)
    ex.require_streams()
    usage = ex.run(StreamUsage())
    ex.save_result(usage)
    names = usage.meta["sublayers"]
    picks = [pick(names, ex.args.early), pick(names, ex.args.deep)]
    n = ex.n_streams
    fig, axes = plt.subplots(1, 2, figsize=(2.0 + 1.6 * n, 0.6 + 0.8 * n), squeeze=False)
    im = None
    for ax, k, role in zip(axes[0], picks, ("early", "deep")):
        m = usage["mean_h_res"][k]
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        annotate(ax, im, m, fontsize=8 if n <= 6 else 6)
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xlabel("source stream")
        ax.set_ylabel("target stream")
        ax.set_title(
            f"{role}: {names[k]}\n||E H_res - I|| = {usage['mean_h_res_dist'][k]:.2f}, "
            f"E||H_res - I|| = {usage['h_res_dist'][k]:.2f}",
            fontsize=8,
        )
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, pad=0.03)
    fig.suptitle(f"token-averaged H_res [target, source], {n} streams", fontsize=9)
    caption = (
        f"Token-averaged H_res [target, source] at an early ({names[picks[0]]}) and a deep "
        f"({names[picks[1]]}) sublayer; identity = streams kept apart, off-diagonal mass = "
        f"streams mixed (stream-collapse paper)."
    )
    ex.save_figure(fig, "h_res_matrices", caption)
    d = usage["mean_h_res_dist"]
    return ex.finish(
        f"distance of the mean mixer to the identity ||E H_res - I||_F = {d[picks[0]]:.3f} at "
        f"{short(names[picks[0]])}, {d[picks[1]]:.3f} at {short(names[picks[1]])} ({ex.corpus_note})",
        picks=picks,
    )


if __name__ == "__main__":
    main()
