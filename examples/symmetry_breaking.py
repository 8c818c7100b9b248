"""Symmetry breaking at stream expansion ("Analyzing Stream Collapse in Hyper-Connections"):
train mHC-lite with identical stream copies (baseline) and with learned stream scaling (LSS:
x_s = x * lss_s, lss init 0.6 + Xavier noise) for several seeds, then compare validation loss
and the collapse diagnostics of the trained models (read-share entropy, dominant read share,
final stream-norm imbalance, distance of H_res to the identity).

    python examples/symmetry_breaking.py [--seeds 3] [--steps 600] [--out out/symmetry_breaking] [--fast]

Writes results.json, val_loss.png and diagnostics.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from small_runs import corpus_ids, run

VARIANTS = {
    "copies (mhc_lite)": dict(hyper_conn_type="mhc_lite", lss_init=None),
    "LSS (mhc_lite_lss)": dict(hyper_conn_type="mhc_lite_lss", lss_init=0.6),
}


def plot(results, out: Path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, runs in results.items():
        steps = runs[0]["val_step"]
        curves = np.array([r["val_loss"] for r in runs])
        ax.plot(steps, curves.mean(0), label=f"{name} ({len(runs)} seeds)")
        ax.fill_between(steps, curves.min(0), curves.max(0), alpha=0.25)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.legend(fontsize=8)
    ax.set_title("baseline vs learned stream scaling (mean, min-max over seeds)", fontsize=9)
    fig.savefig(out / "val_loss.png", dpi=120, bbox_inches="tight")
    keys = list(next(iter(results.values()))[0]["diagnostics"])
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3))
    for ax, key in zip(axes, keys):
        for x, runs in enumerate(results.values()):
            vals = [r["diagnostics"][key] for r in runs]
            ax.bar(x, np.mean(vals), yerr=np.std(vals), capsize=4, alpha=0.7)
            ax.scatter([x] * len(vals), vals, color="black", s=10, zorder=3)
        ax.set_xticks(range(len(results)), [n.split(" ")[0] for n in results], fontsize=8)
        ax.set_title(key, fontsize=9)
    fig.suptitle("collapse diagnostics of the trained models", fontsize=9)
    fig.savefig(out / "diagnostics.png", dpi=120, bbox_inches="tight")
    plt.close("all")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--texts", default=None)
    p.add_argument("--out", default="out/symmetry_breaking")
    p.add_argument("--fast", action="store_true")
    args = p.parse_args(argv)
    if args.fast:
        args.seeds, args.steps = 2, 8
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, train_ids, val_ids = corpus_ids(args.texts, vocab=256 if args.fast else 1024)
    results = {
        name: [
            run(
                train_ids,
                val_ids,
                len(tokenizer),
                n_streams=4,
                seed=s,
                steps=args.steps,
                fast=args.fast,
                **kw,
            )
            for s in range(args.seeds)
        ]
        for name, kw in VARIANTS.items()
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out)
    for name, runs in results.items():
        d = {k: np.mean([r["diagnostics"][k] for r in runs]) for k in runs[0]["diagnostics"]}
        print(
            f"{name:20s} val loss {np.mean([r['val_loss'][-1] for r in runs]):.3f}  "
            + "  ".join(f"{k} {v:.3f}" for k, v in d.items())
        )
    return results


if __name__ == "__main__":
    main()
