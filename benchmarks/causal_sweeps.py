"""Batched causal sweeps vs the naive one-forward-per-intervention loop.

    python -m benchmarks.causal_sweeps --shape small --device cpu
    python -m benchmarks.causal_sweeps --shape mhc-780m --device cuda --dtype bfloat16 --batch 4 --seq 512

Rows:
  rescue batched   `AblateRescue` (one-shot, zero ablation, frozen mixing) over every sublayer:
                   the full pairwise rescue matrix: n(n-1)/2 pair ablations + n single
                   ablations per sublayer, replicas stacked in the batch axis, each group
                   resumed from the cached clean state at its sublayer
  rescue naive     the same KLs with one full `run_with_hooks` forward per intervention (pair
                   ablations + n(n-1) rescues, as a plain reading of the paper does), mixing frozen;
                   timed on `--naive-sublayers` sublayers and extrapolated to all of them
  patching batched `ActivationPatching` (denoise, recomputed mixing) over every (sublayer, stream)
  patching naive   one full forward per (sublayer, stream), extrapolated likewise
Columns: seconds, peak GPU MiB (cuda), speed-up of batched over naive. JSON to `--out`.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from mhc_interp import HookedMHC
from mhc_interp.hooks import is_mixing_hook
from mhc_interp.probes import ablate_and_rescue, activation_patching

from .forward_overhead import DTYPES, SHAPES, make_config


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn, device):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return time.perf_counter() - t0, peak


@torch.no_grad()
def naive_rescue(model, tokens, sublayers):
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: is_mixing_hook(n) or n.endswith("streams_in"))
    n, names = model.cfg.n_streams, model.sublayer_names
    with model.frozen_mixing(cache):
        for l in sublayers:
            name = f"{names[l]}.hook_streams_in"
            for i, j in itertools.combinations(range(n), 2):
                model.run_with_hooks(tokens, fwd_hooks=[model.stream_hook(name, [i, j], 0.0)])
            for a, r in itertools.permutations(range(n), 2):
                model.run_with_hooks(tokens, fwd_hooks=[model.stream_hook(name, [a, r], 0.0),
                                                        model.stream_hook(name, r, cache[name][:, :, r])])


@torch.no_grad()
def naive_patching(model, clean, corrupted, sublayers):
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("streams_in"))
    for l in sublayers:
        name = f"{model.sublayer_names[l]}.hook_streams_in"
        for s in range(model.cfg.n_streams):
            model.run_with_hooks(corrupted, fwd_hooks=[model.stream_hook(name, s, cache[name][:, :, s])])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="small", choices=sorted(SHAPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--naive-sublayers", type=int, default=2)
    p.add_argument("--max-rows", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    shape = SHAPES[args.shape]
    batch, seq = args.batch or shape["batch"], args.seq or shape["seq"]
    torch.manual_seed(0)
    model = HookedMHC(make_config(args.shape, "mhc")).eval().to(args.device, DTYPES[args.dtype])
    tokens = torch.randint(0, model.cfg.d_vocab, (batch, seq), device=args.device)
    corrupted = tokens.clone()
    corrupted[:, seq // 2] = (corrupted[:, seq // 2] + 1) % model.cfg.d_vocab
    n_sub = model.cfg.n_sublayers
    subset = list(range(0, n_sub, max(1, n_sub // args.naive_sublayers)))[: args.naive_sublayers]
    scale = n_sub / len(subset)
    print(f"{model.summary()}\nprompts {batch} x {seq}; naive loops timed on sublayers {subset}, x{scale:.0f}")
    rows = {}
    kw = dict(batch_size=batch, max_rows=args.max_rows)
    rows["rescue batched"] = measure(lambda: ablate_and_rescue(model, tokens, **kw), args.device)
    t, peak = measure(lambda: naive_rescue(model, tokens, subset), args.device)
    rows["rescue naive"] = (t * scale, peak)
    rows["patching batched"] = measure(lambda: activation_patching(model, tokens, corrupted, **kw), args.device)
    t, peak = measure(lambda: naive_patching(model, tokens, corrupted, subset), args.device)
    rows["patching naive"] = (t * scale, peak)
    print(f"{'row':18s} {'seconds':>9s} {'peak MiB':>9s} {'speed-up':>9s}")
    out = {}
    for name, (sec, peak) in rows.items():
        naive = rows[name.replace("batched", "naive")][0]
        speed = naive / sec if "batched" in name else None
        out[name] = {"seconds": sec, "peak_mib": peak, "speedup_vs_naive": speed}
        print(f"{name:18s} {sec:9.2f} {peak or float('nan'):9.0f} {'' if speed is None else f'{speed:8.1f}x':>9s}")
    info = {"shape": args.shape, "device": args.device, "dtype": args.dtype, "torch": torch.__version__,
            "batch": batch, "seq": seq, "naive_sublayers": subset, "results": out}
    path = Path(args.out or f"benchmarks/results/causal_sweeps-{args.shape}-{args.device.split(':')[0]}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
