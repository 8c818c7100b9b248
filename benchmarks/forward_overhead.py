"""What does the TransformerLens hook machinery of `HookedMHC` cost per forward pass?

    python -m benchmarks.forward_overhead --shape small --device cpu
    python -m benchmarks.forward_overhead --shape mhc-780m --device cuda --dtype bfloat16

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
  compiled mixers (with --compile-mixers) the hooked forward with `model.compile_mixers()`: the
                  coefficient maths torch.compile'd, one graph per variant shared by all sublayers.
  nnsight trace   the hooked model wrapped by `nnsight.NNsight`, one `trace` saving the output
                  (measured last: nnsight instruments every module for good, which also switches
                  attention to the eager path that can serve `hook_pattern`).
  residual        the same shape with `n_streams=1, hyper_conn_type="none"` (a plain GPT-2
                  residual), stripped like the first row: the price of the streams themselves.

MFU (model FLOPs utilisation, forward only) = tokens/s x FLOPs/token / peak FLOP/s, with
FLOPs/token = 2 N + 4 L T d (N: parameters in matmuls, including the unembedding; L layers,
T sequence length, d d_model: attention scores and values), the PaLM-appendix count without the
backward pass; the stream mixing itself is not counted (it is overhead to be minimised). Peak:
dense bf16 of known GPUs (H100/H200 989, A100 312 TFLOP/s); none on CPU.

Columns: ms per forward (median), tokens/s (batch * seq / median seconds), ratio (median / the
stripped median), peak MiB (cuda only: `torch.cuda.max_memory_allocated` over the timed forwards,
with only that row's model resident, so it includes its weights and, for the cache rows, the
cache), cache MiB (bytes of the tensors in the returned cache). A row that runs out of GPU memory
is reported as "OOM" instead of failing the run.

bf16: `--dtype bfloat16` casts the model's weights; with `--autocast` the weights stay fp32 and
the forwards run under `torch.autocast(device, bfloat16)`.
JSON with every individual time, the device name, torch version, shape and dtype goes to `--out`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

from mhc_interp import HookedMHC, MHCConfig
from mhc_interp.config import HYPER_CONN_TYPES

SHAPES: Dict[str, Dict[str, Any]] = {
    "small": dict(cfg=dict(n_layers=4, n_heads=4, d_model=256, n_ctx=256, d_vocab=1024, n_streams=4),
                  batch=8, seq=128),
    "mhc-780m": dict(cfg=dict(n_layers=36, n_heads=20, d_model=1280, n_ctx=1024, d_vocab=50304,
                              n_streams=4), batch=16, seq=1024),
}
STREAM_MIXER_SUFFIXES = ("hook_streams_in", "hook_streams_out", "hook_h_pre", "hook_h_post", "hook_h_res")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_config(shape: str, variant: str) -> MHCConfig:
    kw = dict(SHAPES[shape]["cfg"], hyper_conn_type=variant, bias=True)
    if variant == "none":
        kw["n_streams"] = 1
    if variant == "mhc_lite_lss":
        kw["lss_init"] = 0.6
    return MHCConfig(**kw)


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


def measure(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> Dict[str, Any]:
    """Median wall time of `fn()` plus cuda peak memory; a cuda OOM is returned as such."""
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    times: List[float] = []
    n_bytes = 0
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(warmup + repeats):
            sync()
            t0 = time.perf_counter()
            out = fn()
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            n_bytes = cache_bytes(out)
            del out  # free the cache before the next forward builds another one
    except torch.cuda.OutOfMemoryError:
        times = []
    if not times:  # out of memory; the failed forward's tensors are released once we get here
        torch.cuda.empty_cache()
        return dict(oom=True)
    res: Dict[str, Any] = dict(oom=False, ms=statistics.median(times) * 1e3, times_ms=[t * 1e3 for t in times],
                               cache_mib=n_bytes / 2**20)
    if cuda:
        res["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return res


def forward_flops_per_token(model: HookedMHC, seq: int) -> float:
    """2 N + 4 L T d: matmul parameters (incl. the unembedding) plus attention scores and values."""
    cfg = model.cfg
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    n_matmul += cfg.d_model * cfg.d_vocab  # the (tied) unembedding
    return 2.0 * n_matmul + 4.0 * cfg.n_layers * seq * cfg.d_model


PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def run_nnsight(model: HookedMHC, tokens: torch.Tensor, device: torch.device, autocast_dtype,
                repeats: int, warmup: int) -> Dict[str, Any]:
    """Time one nnsight trace of the model that saves its output (wrapping is permanent)."""
    from nnsight import NNsight

    traced = NNsight(model)

    def fn() -> Any:
        amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            with traced.trace(tokens):
                out = traced.output.save()
        return out

    return measure(fn, device, repeats, warmup)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    return platform.processor() or platform.machine()


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--autocast", action="store_true", help="keep fp32 weights, run under autocast(--dtype)")
    p.add_argument("--variant", choices=HYPER_CONN_TYPES, default="mhc", help="hyper_conn_type of the rows other than 'residual'")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, help="override the shape's batch size")
    p.add_argument("--seq", type=int, help="override the shape's sequence length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU); 1 is steadier on a busy machine")
    p.add_argument("--compile-mixers", action="store_true",
                   help="add a row with HookedMHC.compile_mixers() (torch.compile'd coefficients)")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/forward_overhead-<shape>-<device>.json)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    batch = args.batch or SHAPES[args.shape]["batch"]
    seq = args.seq or SHAPES[args.shape]["seq"]
    weight_dtype = torch.float32 if args.autocast else dtype

    torch.manual_seed(args.seed)
    cfg = make_config(args.shape, args.variant)
    tokens = torch.randint(0, cfg.d_vocab, (batch, seq), generator=torch.Generator().manual_seed(args.seed))
    tokens = tokens.to(device)

    def on_device(m: nn.Module) -> nn.Module:
        return m.to(device=device, dtype=weight_dtype).eval()

    def run(model: nn.Module, cache: Any = False) -> Dict[str, Any]:
        """Time `model(tokens)`, or with `cache` a list of hook names / None (= every hook point)
        `model.run_with_cache(tokens, names_filter=cache)`."""
        def fn() -> Any:
            amp = torch.autocast(device.type, dtype=dtype) if args.autocast else contextlib.nullcontext()
            with torch.inference_mode(), amp:
                return model(tokens) if cache is False else model.run_with_cache(tokens, names_filter=cache)
        return measure(fn, device, args.repeats, args.warmup)

    # Models are built on the CPU and only the one being measured sits on the device.
    model = HookedMHC(cfg)
    stream_names = [n for n in model.hook_dict if n.endswith(STREAM_MIXER_SUFFIXES)]
    rows: Dict[str, Dict[str, Any]] = {}
    stripped = on_device(strip_hooks(model))
    rows["stripped"] = run(stripped)
    del stripped
    model = on_device(model)
    rows["hooked"] = run(model)
    rows["cache streams"] = run(model, cache=stream_names)
    rows["cache all"] = run(model, cache=None)
    if args.compile_mixers:
        rows["compiled mixers"] = run(model.compile_mixers())
        model.compile_mixers(False)
    n_hooks = len(model.hook_dict)
    flops_per_token = forward_flops_per_token(model, seq)
    rows["nnsight trace"] = run_nnsight(model, tokens, device, dtype if args.autocast else None,
                                        args.repeats, args.warmup)
    del model
    residual_cfg = make_config(args.shape, "none")
    residual = on_device(strip_hooks(HookedMHC(residual_cfg)))
    rows["residual"] = run(residual)
    del residual

    base = rows["stripped"].get("ms")
    peak = peak_flops(device)
    for name, r in rows.items():
        if not r["oom"]:
            r["tokens_per_s"] = batch * seq / (r["ms"] / 1e3)
            r["ratio"] = r["ms"] / base if base else None
            if peak and name != "residual":
                r["mfu"] = r["tokens_per_s"] * flops_per_token / peak

    result = dict(
        benchmark="forward_overhead", device=str(device), device_name=device_name(device),
        torch_version=torch.__version__, shape=args.shape, config=cfg.to_dict(), batch=batch, seq=seq,
        dtype=args.dtype, autocast=args.autocast, variant=args.variant, repeats=args.repeats,
        warmup=args.warmup, threads=torch.get_num_threads(), n_hook_points=n_hooks, n_stream_mixer_hooks=len(stream_names),
        flops_per_token=flops_per_token, peak_flops=peak, rows=rows,
    )
    print(f"forward_overhead | {args.shape} ({cfg.n_layers}L d{cfg.d_model} {cfg.n_streams} streams "
          f"{args.variant}) | batch {batch} x seq {seq} | {args.dtype}{' autocast' if args.autocast else ''} | "
          f"{result['device_name']} | torch {torch.__version__} | median of {args.repeats}")
    cuda = device.type == "cuda"
    header = (f"{'row':<15}{'ms/fwd':>10}{'tokens/s':>12}{'ratio':>8}{'cache MiB':>11}"
              + (f"{'peak MiB':>10}{'MFU':>7}" if cuda else ""))
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        if r["oom"]:
            print(f"{name:<15}{'OOM':>10}")
            continue
        ratio = f"{r['ratio']:>8.2f}" if r["ratio"] is not None else f"{'-':>8}"
        line = f"{name:<15}{r['ms']:>10.2f}{r['tokens_per_s']:>12,.0f}{ratio}{r['cache_mib']:>11.1f}"
        mfu = f"{100 * r['mfu']:>6.1f}%" if r.get("mfu") else f"{'-':>7}"
        print(line + (f"{r['peak_mib']:>10.0f}{mfu}" if cuda else ""))

    out = args.out or Path(__file__).parent / "results" / f"forward_overhead-{args.shape}-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
