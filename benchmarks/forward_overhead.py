"""What does the TransformerLens hook machinery of `HookedMHC` cost per forward pass?

    python -m benchmarks.forward_overhead --shape small --device cpu
    python -m benchmarks.forward_overhead --shape mhc-780m --device cuda --dtype bfloat16 --compile

Random weights, random tokens [batch, seq]; every forward is full-sequence, logits at every
position, under `torch.inference_mode()`. The rows are timed interleaved: `--warmup` untimed
rounds, then `--repeats` rounds in each of which every row runs once (in alternating order, so a
load change on a shared machine reaches all rows alike); each row reports the median and the
quartiles of its times (`torch.cuda.synchronize()` around each on cuda). All the rows' models are
resident at once (built on the CPU, moved to the device together); the compiled rows share the
hooked model, switched between eager / `compile_mixers()` / `compile()` before each call (the
compiled graphs are built once, in the warm-up round, and kept).

Rows:
  stripped        a deep copy of the model with every `HookPoint` replaced by `nn.Identity`:
                  the plain forward with no hook machinery at all. The baseline (ratio 1.00).
  hooked          the `HookedMHC` forward itself, no hooks attached: what the hook points cost
                  when nobody is listening.
  cache streams   `run_with_cache` on the hook points named `*hook_streams_in`,
                  `*hook_streams_out`, `*hook_h_pre`, `*hook_h_post`, `*hook_h_res` (the stream
                  states and mixing coefficients of every sublayer), cache kept on the device.
  cache all       `run_with_cache` on every hook point. A hook on `hook_pattern` /
                  `hook_attn_scores` switches attention from fused SDPA to the eager path that
                  materialises [batch, head, pos, pos], so this also measures that.
  with --compile:
  compiled mixers the hooked forward with `model.compile_mixers()` (coefficient maths only)
  compiled        the hooked forward with `model.compile()` (hook-safe regional compile: mixer
                  maths and each sublayer's read/branch/write-back, one graph per type)
  compiled cache streams   `cache streams` on the compiled model (those hooks sit between the
                  compiled regions, so the sublayers stay compiled)
  nnsight trace   a copy of the hooked model wrapped by `nnsight.NNsight`, one `trace` saving the
                  output (a copy: nnsight instruments every module for good, which also switches
                  attention to the eager path that can serve `hook_pattern`).
  residual        the same shape with `n_streams=1, hyper_conn_type="none"` (a plain GPT-2
                  residual), stripped like the first row: the price of the streams themselves
                  (and `residual compiled` with --compile).

MFU (model FLOPs utilisation, forward only) = tokens/s x FLOPs/token / peak FLOP/s, with
FLOPs/token = 2 N + 4 L T d (N: parameters in matmuls, including the unembedding; L layers,
T sequence length, d d_model: attention scores and values), the PaLM-appendix count without the
backward pass; the stream mixing itself is not counted (it is overhead to be minimised). Peak:
dense bf16 of known GPUs (H100/H200 989, A100 312 TFLOP/s); none on CPU.

Columns: ms per forward (median), its quartiles q1 / q3, tokens/s, ratio (median / the stripped
median), cache MiB (bytes of the tensors in the returned cache), and on cuda peak MiB (the row's
model's weights plus what its forward allocates on top of everything resident: weights, activations
and cache of that row alone) and MFU. On cuda each row first measures what one sequence needs; a row whose batch cannot fit says
how much it needs and which batch fits, and the run goes on (`cache all` at mhc-780m with
16 x 1024 holds ~100 GiB of activations).

bf16: `--dtype bfloat16` casts the model's weights; with `--autocast` the weights stay fp32 and
the forwards run under `torch.autocast(device, bfloat16)`.
"""

from __future__ import annotations

import argparse
import copy
import os
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

from mhc_interp import HookedMHC
from mhc_interp.model.mixers import MIXERS
from mhc_interp.model.sublayer import BOUNDARY_HOOKS

from .common import (
    DTYPES,
    BenchmarkError,
    add_common_args,
    autocast_if,
    check_batch_fits,
    cli,
    forward_flops_per_token,
    interleaved,
    make_config,
    peak_flops,
    prepare,
    print_table,
    random_tokens,
    write_result,
)


def strip_hooks(model: HookedMHC) -> HookedMHC:
    """A deep copy of `model` with every HookPoint replaced by `nn.Identity`."""
    stripped = copy.deepcopy(model)
    for name, module in list(stripped.named_modules()):
        if isinstance(module, HookPoint):
            parent_name, _, attr = name.rpartition(".")
            setattr(stripped.get_submodule(parent_name), attr, nn.Identity())
    stripped.hook_dict, stripped.mod_dict = {}, {}
    # Attention asks its pattern/score hook points whether anyone observes them before choosing
    # fused SDPA; with no hook points there is nobody to ask, so answer from the config alone.
    for module in stripped.modules():
        if hasattr(type(module), "_eager"):
            module._eager = lambda cfg=module.cfg: cfg.attn_impl == "eager"
    return stripped


def weights_mib(model: nn.Module) -> float:
    """MiB of the model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / 2**20


def cache_bytes(out: Any) -> int:
    if isinstance(out, tuple) and len(out) == 2 and hasattr(out[1], "values"):
        return sum(t.numel() * t.element_size() for t in out[1].values() if torch.is_tensor(t))
    return 0


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]), repeats=10)
    p.add_argument("--autocast", action="store_true", help="keep fp32 weights, run under autocast(--dtype)")
    p.add_argument(
        "--variant",
        choices=sorted(MIXERS),
        default="mhc",
        help="hyper_conn_type of the rows other than 'residual'",
    )
    args = p.parse_args(argv)
    device = prepare(args)
    amp_dtype = DTYPES[args.dtype] if args.autocast else None
    weight_dtype = torch.float32 if args.autocast else DTYPES[args.dtype]
    batch, seq = args.batch, args.seq
    cfg = make_config(args.shape, args.variant)

    def on_device(m: nn.Module) -> nn.Module:
        return m.to(device=device, dtype=weight_dtype).eval()

    def forward_fn(model: nn.Module, cache: Any, n_seq: int) -> Callable[[], Any]:
        """`model(tokens)`, or with `cache` (hook names, or None = every hook point)
        `model.run_with_cache(tokens, names_filter=cache)`, on `n_seq` sequences."""
        tokens = random_tokens(model, n_seq, seq)

        def fn() -> Any:
            with torch.inference_mode(), autocast_if(device, amp_dtype):
                return model(tokens) if cache is False else model.run_with_cache(tokens, names_filter=cache)

        return fn

    def cache_mib(model: nn.Module, cache: Any) -> float:
        """MiB the row's cache holds at `batch`, from one eager run on one sequence (the same hook
        points fire eagerly and compiled; eager, so no graph is compiled for its shape)."""
        if cache is False:
            return 0.0
        with torch.compiler.set_stance("force_eager"):
            return cache_bytes(forward_fn(model, cache, 1)()) * batch / 2**20

    def compile_state(model: HookedMHC, mode: str) -> Callable[[], None]:
        """Put `model` into `mode` (eager / mixers / all) before a row's call."""

        def switch() -> None:
            model.compile(False)
            if mode == "mixers":
                model.compile_mixers()
            elif mode == "all":
                model.compile()

        return switch

    # Models are built on the CPU, then all go to the device: the rows are timed interleaved.
    torch.manual_seed(0)
    model = HookedMHC(cfg)
    stream_names = [n for n in model.hook_dict if n.endswith(BOUNDARY_HOOKS)]
    n_hooks = len(model.hook_dict)
    stripped = on_device(strip_hooks(model))
    model = on_device(model)
    # (model, cache, compile mode) per row; cache False = plain forward, None = every hook point
    specs: Dict[str, tuple] = {
        "stripped": (stripped, False, "eager"),
        "hooked": (model, False, "eager"),
        "cache streams": (model, stream_names, "eager"),
        "cache all": (model, None, "eager"),
    }
    if args.compile:
        specs.update(
            {
                "compiled mixers": (model, False, "mixers"),
                "compiled": (model, False, "all"),
                "compiled cache streams": (model, stream_names, "all"),
            }
        )
    residual = on_device(strip_hooks(HookedMHC(make_config(args.shape, "none"))))
    specs["residual"] = (residual, False, "eager")
    if args.compile:
        specs["residual compiled"] = (residual, False, "all")

    from nnsight import NNsight

    traced = NNsight(on_device(copy.deepcopy(model)))  # a copy: nnsight instruments it for good

    def trace_fn(n_seq: int) -> Callable[[], Any]:
        tokens = random_tokens(model, n_seq, seq)

        def fn() -> Any:
            with torch.inference_mode(), autocast_if(device, amp_dtype), traced.trace(tokens):
                out = traced.output.save()
            return out

        return fn

    rows: Dict[str, Dict[str, Any]] = {}
    fns: Dict[str, Callable[[], Any]] = {}
    before: Dict[str, Callable[[], None]] = {}
    for name, (m, cache, mode) in specs.items():
        before[name] = compile_state(m, mode)
        before[name]()
        try:  # on cuda: check the batch fits (eagerly); else the row says what fits
            check_batch_fits(lambda b: forward_fn(m, cache, b)(), batch, device, "forward")
        except BenchmarkError as e:
            rows[name] = {"oom": True, "error": str(e)}
            continue
        fns[name] = forward_fn(m, cache, batch)
    fns["nnsight trace"] = trace_fn(batch)
    if "stripped" in rows:
        raise BenchmarkError(rows["stripped"]["error"])
    timings = interleaved(fns, device, args.repeats, args.warmup, before)
    for name in list(specs) + ["nnsight trace"]:
        if name in rows:
            continue
        r = rows[name] = timings[name]
        if r["oom"]:
            continue
        m, cache, _ = specs.get(name, (model, False, "eager"))  # nnsight's copy weighs what model does
        if device.type == "cuda":
            r["peak_mib"] = weights_mib(m) + r["extra_mib"]
        if name != "nnsight trace":
            before[name]()
            r["cache_mib"] = cache_mib(m, cache)
    model.compile(False)
    residual.compile(False)

    flops_per_token = forward_flops_per_token(cfg, seq)
    peak = peak_flops(device)
    base = rows["stripped"]["seconds"]
    for r in rows.values():
        if not r["oom"]:
            r["ms"], r["q1_ms"], r["q3_ms"] = (r[k] * 1e3 for k in ("seconds", "q1", "q3"))
            r["tokens_per_s"] = batch * seq / r["seconds"]
            r["ratio"] = r["seconds"] / base
            r["mfu"] = r["tokens_per_s"] * flops_per_token / peak if peak else None

    print(
        f"forward_overhead | {args.shape} ({cfg.n_layers}L d{cfg.d_model} {cfg.n_streams} streams "
        f"{args.variant}) | batch {batch} x seq {seq} | {args.dtype}{' autocast' if args.autocast else ''} | "
        f"torch {torch.__version__} | {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', 'unset')} | median and quartiles of "
        f"{args.repeats} interleaved rounds"
    )
    print_table(
        rows,
        [
            ("ms/fwd", "ms", ".2f"),
            ("q1", "q1_ms", ".2f"),
            ("q3", "q3_ms", ".2f"),
            ("tokens/s", "tokens_per_s", ",.0f"),
            ("ratio", "ratio", ".2f"),
            ("cache MiB", "cache_mib", ".1f"),
            ("peak MiB", "peak_mib", ".0f"),
            ("MFU", "mfu", ".1%"),
        ],
    )
    result = dict(
        variant=args.variant,
        autocast=args.autocast,
        n_hook_points=n_hooks,
        n_stream_mixer_hooks=len(stream_names),
        flops_per_token=flops_per_token,
        peak_flops=peak,
        rows=rows,
    )
    write_result("forward_overhead", args, device, result)
    return result


if __name__ == "__main__":
    cli(main)
