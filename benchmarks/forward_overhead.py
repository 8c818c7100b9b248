"""What does the TransformerLens hook machinery of `HookedMHC` cost per forward pass?

    python -m benchmarks.forward_overhead --shape small --device cpu
    python -m benchmarks.forward_overhead --shape mhc-780m --device cuda --dtype bfloat16 --compile

Random weights, random tokens [batch, seq]; every forward is full-sequence, logits at every
position, under `torch.inference_mode()`. Each row is the median wall time of `--repeats` timed
forwards after `--warmup` untimed ones (`torch.cuda.synchronize()` around each on cuda).

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
  nnsight trace   the hooked model wrapped by `nnsight.NNsight`, one `trace` saving the output
                  (measured last: nnsight instruments every module for good, which also switches
                  attention to the eager path that can serve `hook_pattern`).
  residual        the same shape with `n_streams=1, hyper_conn_type="none"` (a plain GPT-2
                  residual), stripped like the first row: the price of the streams themselves
                  (and `residual compiled` with --compile).

MFU (model FLOPs utilisation, forward only) = tokens/s x FLOPs/token / peak FLOP/s, with
FLOPs/token = 2 N + 4 L T d (N: parameters in matmuls, including the unembedding; L layers,
T sequence length, d d_model: attention scores and values), the PaLM-appendix count without the
backward pass; the stream mixing itself is not counted (it is overhead to be minimised). Peak:
dense bf16 of known GPUs (H100/H200 989, A100 312 TFLOP/s); none on CPU.

Columns: ms per forward (median), tokens/s, ratio (median / the stripped median), cache MiB
(bytes of the tensors in the returned cache), and on cuda peak MiB (`max_memory_allocated` over
the timed forwards, with only that row's model resident, so weights and cache included) and
MFU. On cuda each row first measures what one sequence needs; a row whose batch cannot fit says
how much it needs and which batch fits, and the run goes on (`cache all` at mhc-780m with
16 x 1024 holds ~100 GiB of activations).

bf16: `--dtype bfloat16` casts the model's weights; with `--autocast` the weights stay fp32 and
the forwards run under `torch.autocast(device, bfloat16)`.
"""
from __future__ import annotations

import argparse
import copy
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

from mhc_interp import HookedMHC
from mhc_interp.config import HYPER_CONN_TYPES
from mhc_interp.model.sublayer import BOUNDARY_HOOKS

from .common import (DTYPES, BenchmarkError, add_common_args, autocast_if, check_batch_fits, cli,
                     forward_flops_per_token, make_config, peak_flops, prepare, print_table,
                     random_tokens, timed, write_result)



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


def cache_bytes(out: Any) -> int:
    if isinstance(out, tuple) and len(out) == 2 and hasattr(out[1], "values"):
        return sum(t.numel() * t.element_size() for t in out[1].values() if torch.is_tensor(t))
    return 0


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]), repeats=10)
    p.add_argument("--autocast", action="store_true", help="keep fp32 weights, run under autocast(--dtype)")
    p.add_argument("--variant", choices=HYPER_CONN_TYPES, default="mhc",
                   help="hyper_conn_type of the rows other than 'residual'")
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

    def row(model: nn.Module, cache: Any = False, wrap: Callable = lambda m: m) -> Dict[str, Any]:
        """Time one row; on cuda, first check the batch fits (else the row says what fits)."""
        model = wrap(model)
        try:
            check_batch_fits(lambda b: forward_fn(model, cache, b)(), batch, device, "forward")
        except BenchmarkError as e:
            return {"oom": True, "error": str(e)}
        r = timed(forward_fn(model, cache, batch), device, args.repeats, args.warmup)
        if not r["oom"]:
            r["cache_mib"] = cache_bytes(forward_fn(model, cache, 1)()) * batch / 2**20
        return r

    # Models are built on the CPU and only the one being measured sits on the device.
    torch.manual_seed(0)
    model = HookedMHC(cfg)
    stream_names = [n for n in model.hook_dict if n.endswith(BOUNDARY_HOOKS)]
    rows: Dict[str, Dict[str, Any]] = {}
    rows["stripped"] = row(on_device(strip_hooks(model)))
    if rows["stripped"].get("error"):
        raise BenchmarkError(rows["stripped"]["error"])
    model = on_device(model)
    rows["hooked"] = row(model)
    rows["cache streams"] = row(model, stream_names)
    rows["cache all"] = row(model, None)
    if args.compile:
        rows["compiled mixers"] = row(model, wrap=lambda m: m.compile_mixers())
        rows["compiled"] = row(model, wrap=lambda m: m.compile())
        rows["compiled cache streams"] = row(model, stream_names)
        model.compile(False)
    n_hooks = len(model.hook_dict)
    from nnsight import NNsight

    traced = NNsight(model)  # permanent: measured last

    def trace_fn(n_seq: int) -> Any:
        tokens = random_tokens(model, n_seq, seq)
        with torch.inference_mode(), autocast_if(device, amp_dtype), traced.trace(tokens):
            out = traced.output.save()
        return out

    rows["nnsight trace"] = timed(lambda: trace_fn(batch), device, args.repeats, args.warmup)
    del model, traced
    residual = HookedMHC(make_config(args.shape, "none"))
    rows["residual"] = row(on_device(strip_hooks(residual)))
    if args.compile:
        rows["residual compiled"] = row(on_device(strip_hooks(residual)), wrap=lambda m: m.compile())

    flops_per_token = forward_flops_per_token(cfg, seq)
    peak = peak_flops(device)
    base = rows["stripped"]["seconds"]
    for r in rows.values():
        if not r["oom"]:
            r["ms"] = r["seconds"] * 1e3
            r["tokens_per_s"] = batch * seq / r["seconds"]
            r["ratio"] = r["seconds"] / base
            r["mfu"] = r["tokens_per_s"] * flops_per_token / peak if peak else None

    print(f"forward_overhead | {args.shape} ({cfg.n_layers}L d{cfg.d_model} {cfg.n_streams} streams "
          f"{args.variant}) | batch {batch} x seq {seq} | {args.dtype}{' autocast' if args.autocast else ''} | "
          f"torch {torch.__version__} | median of {args.repeats}")
    print_table(rows, [("ms/fwd", "ms", ".2f"), ("tokens/s", "tokens_per_s", ",.0f"), ("ratio", "ratio", ".2f"),
                       ("cache MiB", "cache_mib", ".1f"), ("peak MiB", "peak_mib", ".0f"), ("MFU", "mfu", ".1%")])
    result = dict(variant=args.variant, autocast=args.autocast, n_hook_points=n_hooks,
                  n_stream_mixer_hooks=len(stream_names), flops_per_token=flops_per_token,
                  peak_flops=peak, rows=rows)
    write_result("forward_overhead", args, device, result)
    return result


if __name__ == "__main__":
    cli(main)
