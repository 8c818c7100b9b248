"""Attribution patching vs exact activation patching: time, passes and memory.

    python -m benchmarks.attribution --shape tiny                      # seconds (CI-sized)
    python -m benchmarks.attribution --shape small --device cpu
    python -m benchmarks.attribution --shape mhc-780m --device cuda --dtype bfloat16 --batch 4 --seq 256

Rows (denoising, KL metric, mixing recomputed, random prompts with one token shifted mid-sequence):
  fwd+bwd            one forward and a backward of the KL into the parameters: the yardstick for
                     memory (a plain training-style step at the same shape)
  exact              `activation_patching` [sublayer, stream]
  atp / ig           `attribution_patching` [sublayer, stream] (method atp; ig with --steps)
  exact per-pos      `activation_patching(positions="each")`: timed on `--position-sublayers`
                     evenly spaced sublayers (`sublayers=` runs only those cells) and scaled to all
                     of them by cost (a cell at sublayer l resumes there: (L - l) / L of a forward)
  atp per-pos        `attribution_patching(positions="each")`
Columns: seconds (median), passes (forwards + backwards of one prompt batch, the count each
method reports: constant in sublayers, streams and positions for atp / ig; the exact sweeps'
count is forward-equivalents: a cell at sublayer l costs (L - l) / L of a forward), saved MiB
(bytes autograd saves for the backward plus the gradients kept, counted with
`torch.autograd.graph.saved_tensors_hooks`, so also on a CPU; on cuda also peak MiB), and the
speed-up of each estimate over its exact sweep. Never asserts timings.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional

import torch

from mhc_interp.probes import activation_patching, attribution_patching
from mhc_interp.probes.causal import clean_run, kl_metric

from .common import (
    add_common_args,
    build_model,
    cli,
    prepare,
    print_table,
    random_tokens,
    timed,
    write_result,
)


def saved_mib(fn) -> float:
    """MiB of distinct tensors autograd saves for the backward while `fn` runs, plus what `fn`
    keeps (the attribution's gradients count through the result; a plain backward keeps none)."""
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            key = t.untyped_storage().data_ptr()
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. sparse, meta)
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def exact_forward_equivalents(n_sub: int, n: int, positions: int = 1) -> float:
    return 2 + positions * n * sum((n_sub - l) / n_sub for l in range(n_sub))


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = add_common_args(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter),
        repeats=1,
    )
    p.add_argument("--steps", type=int, default=2, help="integrated-gradient points (default 2)")
    p.add_argument(
        "--position-sublayers",
        type=int,
        default=2,
        help="sublayers the exact per-position sweep is timed on (scaled to all)",
    )
    args = p.parse_args(argv)
    device = prepare(args)
    if args.steps < 1 or args.position_sublayers < 1:
        p.error("--steps and --position-sublayers must be >= 1")
    model = build_model(args, device)
    cfg, batch, seq = model.cfg, args.batch, args.seq
    n_sub, n = cfg.n_sublayers, cfg.n_streams
    tokens = random_tokens(model, batch, seq)
    corrupted = tokens.clone()
    corrupted[:, seq // 2] = (corrupted[:, seq // 2] + 1) % cfg.d_vocab
    subset = list(range(0, n_sub, max(1, n_sub // args.position_sublayers)))[: args.position_sublayers]
    # a cell at sublayer l runs (L - l) / L of the model: scale by cost, not by count
    scale = sum(n_sub - l for l in range(n_sub)) / sum(n_sub - l for l in subset)
    print(
        f"{model.summary()}\nprompts {batch} x {seq}; exact per-position sweep timed on sublayers {subset}, x{scale:.2f}"
    )
    kw = dict(batch_size=batch)

    def plain():
        mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
        mask[:, 0] = False
        ref, _, _ = clean_run(model, tokens)
        loss = kl_metric(ref, mask)(model(corrupted)[None]).sum()
        loss.backward()
        model.zero_grad(set_to_none=True)

    def run(fn, scale_by: float = 1.0) -> Dict[str, Any]:
        r = timed(fn, device, args.repeats, args.warmup)
        if not r["oom"]:
            r["seconds"] *= scale_by
        return r

    rows: Dict[str, Dict[str, Any]] = {}
    rows["fwd+bwd"] = run(plain)
    rows["fwd+bwd"].update(passes=2.0, saved_mib=saved_mib(plain))
    rows["exact"] = run(lambda: activation_patching(model, tokens, corrupted, **kw))
    rows["exact"]["passes"] = exact_forward_equivalents(n_sub, n)
    for name, method, steps in (("atp", "atp", 1), (f"ig ({args.steps})", "ig", args.steps)):
        fn = lambda method=method, steps=steps: attribution_patching(
            model, tokens, corrupted, method=method, steps=steps, **kw
        )
        rows[name] = run(fn)
        if not rows[name]["oom"]:
            res = fn()
            rows[name].update(
                passes=(res.meta["forward_passes"] + res.meta["backward_passes"]) / -(-batch // batch),
                saved_mib=saved_mib(fn),
                speedup=rows["exact"]["seconds"] / rows[name]["seconds"],
            )
    rows["exact per-pos"] = run(
        lambda: activation_patching(model, tokens, corrupted, positions="each", sublayers=subset, **kw),
        scale_by=scale,
    )
    rows["exact per-pos"]["passes"] = exact_forward_equivalents(n_sub, n, seq)
    per_pos = lambda: attribution_patching(model, tokens, corrupted, positions="each", **kw)  # noqa: E731
    rows["atp per-pos"] = run(per_pos)
    if not rows["atp per-pos"]["oom"]:
        rows["atp per-pos"].update(
            passes=3.0,
            saved_mib=saved_mib(per_pos),
            speedup=rows["exact per-pos"]["seconds"] / rows["atp per-pos"]["seconds"],
        )
    base = rows["fwd+bwd"].get("saved_mib")
    for r in rows.values():
        if r.get("saved_mib") is not None and base:
            r["saved_ratio"] = r["saved_mib"] / base
    print_table(
        rows,
        [
            ("seconds", "seconds", ".3f"),
            ("passes", "passes", ".1f"),
            ("saved MiB", "saved_mib", ".1f"),
            ("x fwd+bwd", "saved_ratio", ".2f"),
            ("peak MiB", "peak_mib", ".0f"),
            ("speed-up", "speedup", ".1f"),
        ],
    )
    result = {"rows": rows, "steps": args.steps, "position_sublayers": subset}
    write_result("attribution", args, device, result)
    return result


if __name__ == "__main__":
    cli(main)
