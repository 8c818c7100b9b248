"""Stream-count sweep: train small mHC models (Sinkhorn H_res) with n = 1 (plain residual), 2, 4,
8 and 16 streams on the same data and compare validation loss and the collapse diagnostics.

    python examples/stream_count_sweep.py [--streams 1 2 4 8 16] [--steps 600] [--out out/stream_count_sweep] [--fast]

Writes results.json and stream_count_sweep.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from small_runs import corpus_ids, run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--texts", default=None)
    p.add_argument("--out", default="out/stream_count_sweep")
    p.add_argument("--fast", action="store_true")
    args = p.parse_args(argv)
    if args.fast:
        args.streams, args.steps = [1, 2, 4], 8
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, train_ids, val_ids = corpus_ids(args.texts, vocab=256 if args.fast else 1024)
    results = {
        n: run(
            train_ids,
            val_ids,
            len(tokenizer),
            "none" if n == 1 else "mhc",
            n,
            args.seed,
            args.steps,
            args.fast,
        )
        for n in args.streams
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    ns = list(results)
    axes[0].plot(ns, [results[n]["val_loss"][-1] for n in ns], marker="o")
    axes[0].set_title("final validation loss", fontsize=9)
    multi = [n for n in ns if n > 1]
    for ax, key in zip(axes[1:], ("read_share_entropy", "norm_imbalance")):
        ax.plot(multi, [results[n]["diagnostics"][key] for n in multi], marker="o")
        ax.set_title(key, fontsize=9)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("streams n")
    fig.savefig(out / "stream_count_sweep.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    for n in ns:
        print(f"n={n:2d} val loss {results[n]['val_loss'][-1]:.3f} {results[n]['diagnostics']}")
    return results


if __name__ == "__main__":
    main()
