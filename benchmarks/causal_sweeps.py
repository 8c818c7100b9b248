"""Batched causal sweeps vs the naive one-forward-per-intervention loop, and vs the FLOPs they need.

    python -m benchmarks.causal_sweeps --shape small --device cpu
    python -m benchmarks.causal_sweeps --shape mhc-780m --device cuda --dtype bfloat16 --batch 64 --prompt-batch 16 --compile

Rows:
  forward          one plain forward of a prompt batch (no hooks): the achieved FLOP rate that
                   the sweeps' FLOP budgets are converted to seconds with
  rescue batched   `AblateRescue` (one-shot, zero ablation, frozen mixing) over every sublayer:
                   the full pairwise rescue matrix, n(n-1)/2 pair ablations + n single ablations
                   per sublayer (a one-shot rescue of r after ablating a and r is ablating a
                   alone), replicas stacked in the batch axis, each group resumed from the cached
                   clean state at its sublayer
  rescue naive     the same n(n-1)/2 + n interventions per sublayer, each one full
                   `run_with_hooks` forward from the tokens, mixing frozen; timed on
                   `--naive-sublayers` sublayers and extrapolated to all of them, plus each
                   prompt batch's one cache run (not extrapolated)
  patching batched `ActivationPatching` (denoise, recomputed mixing) over every (sublayer, stream)
  patching naive   one full forward per (sublayer, stream), extrapolated likewise

What a sweep truly needs: the clean run(s) once, then for each intervention at sublayer l the
sublayers l..end and the unembedding, on every prompt (forward FLOPs of `common.py`: matmuls
only). `ideal s` = those FLOPs at the plain forward's achieved rate; `efficiency` = ideal s /
measured s (1.0 = no overhead beyond the FLOPs; the issue's target is >= 0.5); `MFU` = needed
FLOPs / measured s / peak (cuda). Columns also: seconds, peak GPU MiB, speed-up over naive.
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any, Dict, List, Optional

import torch

from mhc_interp.hooks import is_mixing_hook
from mhc_interp.probes import ablate_and_rescue, activation_patching
from mhc_interp.probes.causal import clean_run

from .common import (
    add_common_args,
    build_model,
    check_batch_fits,
    cli,
    forward_flops_per_token,
    peak_flops,
    prepare,
    print_table,
    random_tokens,
    readout_flops_per_token,
    sublayer_flops_per_token,
    sync,
    timed,
    write_result,
)


@torch.no_grad()
def rescue_cache(model, tokens, corrupted):
    return model.run_with_cache(tokens, names_filter=is_mixing_hook)[1]


@torch.no_grad()
def naive_rescue(model, tokens, corrupted, cache, sublayers):
    """One full forward per (sublayer, ablated pair or single), mixing frozen to the clean run."""
    n, names = model.cfg.n_streams, model.sublayer_names
    ablations = [*itertools.combinations(range(n), 2), *((s,) for s in range(n))]
    with model.frozen_mixing(cache):
        for l in sublayers:
            for streams in ablations:
                model.run_with_hooks(
                    tokens, fwd_hooks=[model.stream_hook(f"{names[l]}.hook_streams_in", list(streams), 0.0)]
                )


@torch.no_grad()
def patching_cache(model, clean, corrupted):
    return model.run_with_cache(clean, names_filter=lambda n: n.endswith("streams_in"))[1]


@torch.no_grad()
def naive_patching(model, clean, corrupted, cache, sublayers):
    """One full forward of the corrupted prompts per (sublayer, stream) with the clean stream in."""
    for l in sublayers:
        name = f"{model.sublayer_names[l]}.hook_streams_in"
        for s in range(model.cfg.n_streams):
            model.run_with_hooks(corrupted, fwd_hooks=[model.stream_hook(name, s, cache[name][:, :, s])])


def naive_sweep(
    make_cache, loop, chunks, subset, scale: float, device, repeats: int, warmup: int
) -> Dict[str, Any]:
    """Seconds of the naive sweep: for every prompt batch, its cache run once plus the intervention
    loop, timed on the `subset` of sublayers and extrapolated to all of them (x `scale`; the cache
    run is not scaled); peak memory over the prompt batches."""
    total, peaks, times = 0.0, [], []
    for clean, corrupted in chunks:
        try:
            sync(device)
            t0 = time.perf_counter()
            cache = make_cache(clean, corrupted)
            sync(device)
        except torch.OutOfMemoryError:
            return {"oom": True}
        total += time.perf_counter() - t0
        r = timed(lambda cache=cache: loop(clean, corrupted, cache, subset), device, repeats, warmup)
        del cache
        if r["oom"]:
            return r
        total += scale * r["seconds"]
        times += r["times"]
        peaks.append(r.get("peak_mib"))
    res = {"oom": False, "seconds": total, "times": times}
    if device.type == "cuda":
        res["peak_mib"] = max(peaks)
    return res


def sweep_flops(cfg, seq: int, n_tokens: int, per_sublayer: int, full_runs: int) -> float:
    """FLOPs of `full_runs` full forwards plus `per_sublayer` interventions at every sublayer,
    each resumed there: sublayers l..end and the unembedding, over `n_tokens` tokens."""
    subs = sublayer_flops_per_token(cfg, seq)
    suffix = [sum(subs[l:]) for l in range(len(subs))]
    per_token = full_runs * forward_flops_per_token(cfg, seq)
    per_token += per_sublayer * sum(s + readout_flops_per_token(cfg) for s in suffix)
    return per_token * n_tokens


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = add_common_args(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter),
        repeats=1,
    )
    p.add_argument(
        "--prompt-batch",
        type=int,
        default=None,
        help="prompts per probe batch (its clean states are cached at every sublayer); default --batch",
    )
    p.add_argument("--naive-sublayers", type=int, default=2)
    p.add_argument("--max-rows", type=int, default=None, help="cap on rows per batched forward")
    p.add_argument(
        "--only",
        choices=["rescue", "patching"],
        default=None,
        help="measure one sweep (each fits a 10-minute device call at mhc-780m)",
    )
    args = p.parse_args(argv)
    device = prepare(args)
    model = build_model(args, device)
    cfg, n = model.cfg, model.cfg.n_streams
    batch, seq = args.batch, args.seq
    prompt_batch = args.prompt_batch or batch
    if not 1 <= prompt_batch <= batch:
        p.error(f"--prompt-batch {prompt_batch} must lie in 1..--batch ({batch})")
    if args.naive_sublayers < 1:
        p.error(f"--naive-sublayers must be >= 1, got {args.naive_sublayers}")
    tokens = random_tokens(model, batch, seq)
    corrupted = tokens.clone()
    corrupted[:, seq // 2] = (corrupted[:, seq // 2] + 1) % cfg.d_vocab
    n_sub = cfg.n_sublayers
    subset = list(range(0, n_sub, max(1, n_sub // args.naive_sublayers)))[: args.naive_sublayers]
    scale = n_sub / len(subset)
    print(
        f"{model.summary()}\nprompts {batch} x {seq} in probe batches of {prompt_batch}; "
        f"naive loops timed on sublayers {subset}, x{scale:.0f}"
    )

    def run(fn, extrapolate: float = 1.0, warmup: int = args.warmup):
        r = timed(fn, device, args.repeats, warmup)
        if not r["oom"]:
            r["seconds"] *= extrapolate
        return r

    prompt_tokens = tokens[:prompt_batch]
    # a probe batch caches its clean stream state at every sublayer: say so if that cannot fit
    check_batch_fits(
        lambda b: clean_run(model, prompt_tokens[:b]),
        prompt_batch,
        device,
        "the clean run of one probe batch (--prompt-batch)",
        flag="--prompt-batch",
    )
    kw = dict(batch_size=prompt_batch, max_rows=args.max_rows)
    kinds = [args.only] if args.only else ["rescue", "patching"]
    if args.compile:  # compile outside the timings: edits at sublayer 0 run every sublayer on a replica stack
        if "rescue" in kinds:
            ablate_and_rescue(model, prompt_tokens, sublayers=[0], **kw)
        if "patching" in kinds:
            activation_patching(model, prompt_tokens, corrupted[:prompt_batch], sublayers=[0], **kw)
    rows: Dict[str, Dict[str, Any]] = {}
    with torch.inference_mode():
        rows["forward"] = run(lambda: model(prompt_tokens), warmup=max(1, args.warmup))  # cheap: always warm
    chunks = [
        (tokens[i : i + prompt_batch], corrupted[i : i + prompt_batch]) for i in range(0, batch, prompt_batch)
    ]

    def naive(make_cache, loop):
        return naive_sweep(
            lambda *c: make_cache(model, *c),
            lambda *a: loop(model, *a),
            chunks,
            subset,
            scale,
            device,
            args.repeats,
            args.warmup,
        )

    if "rescue" in kinds:
        rows["rescue batched"] = run(lambda: ablate_and_rescue(model, tokens, **kw))
        rows["rescue naive"] = naive(rescue_cache, naive_rescue)
    if "patching" in kinds:
        rows["patching batched"] = run(lambda: activation_patching(model, tokens, corrupted, **kw))
        rows["patching naive"] = naive(patching_cache, naive_patching)

    peak = peak_flops(device)
    fwd = rows["forward"]
    rate = None if fwd["oom"] else forward_flops_per_token(cfg, seq) * prompt_batch * seq / fwd["seconds"]
    needed = {
        "rescue": sweep_flops(cfg, seq, batch * seq, n * (n - 1) // 2 + n, full_runs=1),
        "patching": sweep_flops(cfg, seq, batch * seq, n, full_runs=2),
    }
    for name, r in rows.items():
        kind, _, how = name.partition(" ")
        if r["oom"] or how != "batched":
            continue
        naive = rows[f"{kind} naive"]
        r["speedup_vs_naive"] = None if naive["oom"] else naive["seconds"] / r["seconds"]
        r["needed_flops"] = needed[kind]
        r["ideal_seconds"] = needed[kind] / rate if rate else None
        r["efficiency"] = r["ideal_seconds"] / r["seconds"] if rate else None
        r["mfu"] = needed[kind] / r["seconds"] / peak if peak else None
    print_table(
        rows,
        [
            ("seconds", "seconds", ".2f"),
            ("peak MiB", "peak_mib", ".0f"),
            ("speed-up", "speedup_vs_naive", ".1f"),
            ("ideal s", "ideal_seconds", ".2f"),
            ("efficiency", "efficiency", ".2f"),
            ("MFU", "mfu", ".1%"),
        ],
    )
    result = dict(
        prompt_batch=prompt_batch, naive_sublayers=subset, forward_flop_rate=rate, peak_flops=peak, rows=rows
    )
    write_result("causal_sweeps", args, device, result)
    return result


if __name__ == "__main__":
    cli(main)
