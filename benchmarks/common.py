"""What every benchmark shares: the model shapes, the common command-line options, device and
memory checks that fail with a clear message, timing with peak GPU memory, FLOP counts, and the
JSON result file."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from mhc_interp import HookedMHC, MHCConfig
from mhc_interp import device as mhc_device
from mhc_interp.config import mixer_class

SHAPES: Dict[str, Dict[str, Any]] = {
    # a seconds-long smoke run (CI runs every benchmark at this shape)
    "tiny": dict(
        cfg=dict(n_layers=2, n_heads=2, d_model=32, n_ctx=32, d_vocab=128, n_streams=4), batch=2, seq=16
    ),
    "small": dict(
        cfg=dict(n_layers=4, n_heads=4, d_model=256, n_ctx=256, d_vocab=1024, n_streams=4), batch=8, seq=128
    ),
    "mhc-780m": dict(
        cfg=dict(n_layers=36, n_heads=20, d_model=1280, n_ctx=1024, d_vocab=50304, n_streams=4),
        batch=16,
        seq=1024,
    ),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# dense bf16 tensor-core peaks (FLOP/s) of the GPUs model FLOPs utilisation is reported for
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
RESULTS = Path(__file__).parent / "results"


class BenchmarkError(RuntimeError):
    """Bad benchmark input: an unavailable device, a batch that cannot fit."""


# ------------------------------------------------------------------------------ options, model
def add_common_args(parser: argparse.ArgumentParser, repeats: int = 3) -> argparse.ArgumentParser:
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model weights")
    parser.add_argument(
        "--batch", type=int, default=None, help="sequences per forward (default: the shape's)"
    )
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the shape's)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="HookedMHC.compile(): the hook-safe compiled fast path (first call compiles)",
    )
    parser.add_argument("--repeats", type=int, default=repeats, help="timed runs per row (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/<name>-<shape>-<device>.json)"
    )
    return parser


def prepare(args: argparse.Namespace) -> torch.device:
    """Check the options and the device; set threads and the seed. Returns the device."""
    if args.repeats < 1 or args.warmup < 0:
        raise BenchmarkError(
            f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}"
        )
    shape = SHAPES[args.shape]
    args.batch, args.seq = args.batch or shape["batch"], args.seq or shape["seq"]
    if args.seq > shape["cfg"]["n_ctx"]:
        raise BenchmarkError(
            f"--seq {args.seq} is longer than the {args.shape} context ({shape['cfg']['n_ctx']})"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return resolve_device(args.device)


def resolve_device(name: str) -> torch.device:
    """`name` as a torch.device, or a BenchmarkError saying why it cannot be used here
    (`mhc_interp.device.resolve_device`'s checks)."""
    try:
        return mhc_device.resolve_device(name)
    except mhc_device.DeviceError as e:
        raise BenchmarkError(str(e)) from None


def make_config(shape: str, variant: str = "mhc") -> MHCConfig:
    """The shape's config as `variant`; "none" means the plain residual (one stream)."""
    kw = dict(SHAPES[shape]["cfg"], hyper_conn_type=variant, bias=True)
    kw["n_streams"] = mixer_class(variant).n_streams_required or kw["n_streams"]
    return MHCConfig(**kw)


def build_model(args: argparse.Namespace, device: torch.device, variant: str = "mhc") -> HookedMHC:
    """A random-weight model of `args.shape` in eval mode on `device`, compiled with --compile."""
    model = HookedMHC(make_config(args.shape, variant)).eval().to(device, DTYPES[args.dtype])
    return model.compile() if args.compile else model


def random_tokens(model: HookedMHC, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (batch, seq), generator=gen).to(model.device)


# ----------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quartiles(times: Sequence[float]) -> Dict[str, float]:
    """Median and quartiles (q1, q3) of `times` (all three the one value if there is one)."""
    if len(times) < 2:
        return dict(seconds=times[0], q1=times[0], q3=times[0])
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return dict(seconds=median, q1=q1, q3=q3)


def interleaved(
    rows: Dict[str, Callable[[], Any]],
    device: torch.device,
    repeats: int,
    warmup: int = 1,
    before: Optional[Dict[str, Callable[[], None]]] = None,
) -> Dict[str, Dict[str, Any]]:
    """Time the compared `rows` {name: fn} round by round: every round runs each row once, in
    alternating order (A B C, C B A, A B C, ...), so load drift on a shared machine lands on all rows
    alike instead of on whichever ran during it. `warmup` untimed rounds first; then `repeats`
    timed ones. `before[name]()`, if given, runs untimed before each of the row's calls (e.g. to
    switch a shared model's compile state).

    Per row: "seconds" (median), "q1" / "q3" (quartiles), every time, and on cuda "peak_mib"
    (`max_memory_allocated` over its timed calls) and "extra_mib" (that peak less what was
    allocated before the call: what the call itself needs, whichever other rows' models are
    resident). A row that runs out of cuda memory is returned as {"oom": True} and leaves the
    later rounds."""
    before = before or {}
    times: Dict[str, List[float]] = {name: [] for name in rows}
    peaks: Dict[str, List[int]] = {name: [0, 0] for name in rows}
    live = list(rows)
    for rnd in range(warmup + repeats):
        for name in live if rnd % 2 == 0 else live[::-1]:
            try:
                before.get(name, lambda: None)()
                sync(device)
                if device.type == "cuda":
                    resident = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                out = rows[name]()
                sync(device)
                elapsed = time.perf_counter() - t0
                if device.type == "cuda" and rnd >= warmup:
                    peak = torch.cuda.max_memory_allocated(device)
                    peaks[name] = [max(peaks[name][0], peak), max(peaks[name][1], peak - resident)]
                del out  # a returned cache is freed before the next run builds another
            except torch.OutOfMemoryError:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                times[name] = None
                continue
            if rnd >= warmup:
                times[name].append(elapsed)
        live = [name for name in live if times[name] is not None]
    res: Dict[str, Dict[str, Any]] = {}
    for name, ts in times.items():
        if ts is None:
            res[name] = {"oom": True}
            continue
        res[name] = dict(oom=False, **quartiles(ts), times=ts)
        if device.type == "cuda":
            res[name]["peak_mib"], res[name]["extra_mib"] = (b / 2**20 for b in peaks[name])
    return res


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> Dict[str, Any]:
    """One row of `interleaved`: median seconds (and quartiles) of `fn()` over `repeats` runs after
    `warmup` untimed ones, every time, and on cuda the peak allocated memory (MiB) over the timed
    runs. A cuda out-of-memory error is returned as {"oom": True}."""
    return interleaved({"row": fn}, device, repeats, warmup)["row"]


@contextlib.contextmanager
def autocast_if(device: torch.device, dtype: Optional[torch.dtype]):
    with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
        yield


# ------------------------------------------------------------------------------------ memory
MEMORY_RESERVE = 0.1  # share of the free memory a batch may not use (fragmentation, workspaces)


def batch_fit(
    per_sequence_bytes: float,
    available_bytes: float,
    batch: int,
    fixed_bytes: float = 0.0,
    reserve: float = MEMORY_RESERVE,
):
    """(fits, largest batch that fits) for work needing `fixed_bytes` plus `per_sequence_bytes`
    per sequence, given `available_bytes`, keeping `reserve` of them free."""
    usable = (1 - reserve) * available_bytes - fixed_bytes
    largest = max(0, int(usable // max(per_sequence_bytes, 1.0)))
    return batch <= largest, largest


def _peak_extra(run: Callable[[int], Any], b: int, device: torch.device) -> int:
    """Peak memory `run(b)` allocates on top of what is resident (bytes)."""
    sync(device)
    resident = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = run(b)
    sync(device)
    extra = torch.cuda.max_memory_allocated(device) - resident
    del out
    return extra


def check_batch_fits(
    run: Callable[[int], Any], batch: int, device: torch.device, what: str, flag: str = "--batch"
) -> None:
    """On cuda: run `run(1)` and `run(2)` and split the memory they need on top of what is
    resident into a fixed part (e.g. autocast's weight copies) and a per-sequence part; raise a
    BenchmarkError if `batch` sequences would not fit - saying how much they need and which batch
    fits (`flag` sets it). Runs eagerly (a compiled model would otherwise compile these batch
    sizes and then a batch-dynamic graph for the real one). Nothing on other devices."""
    if device.type != "cuda":
        return
    torch.cuda.empty_cache()
    resident = torch.cuda.memory_allocated(device)
    with torch.compiler.set_stance("force_eager"):
        one = _peak_extra(run, 1, device)
        two = _peak_extra(run, 2, device) if batch > 1 else one
    per_sequence = max(two - one, 1) if batch > 1 else one
    fixed = max(one - per_sequence, 0)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    problem = batch_fit_problem(what, batch, per_sequence, resident, free, total, fixed=fixed, flag=flag)
    if problem:
        raise BenchmarkError(problem)


def batch_fit_problem(
    what: str,
    batch: int,
    per_sequence: float,
    resident: float,
    free: float,
    total: float,
    fixed: float = 0.0,
    flag: str = "--batch",
) -> Optional[str]:
    """None if `fixed` + `batch` sequences of `per_sequence` bytes fit in `free` bytes (less the
    reserve), else the message: how much the batch needs, and which batch fits."""
    fits, largest = batch_fit(per_sequence, free, batch, fixed_bytes=fixed)
    if fits:
        return None
    gib = 2**30
    return (
        f"{what}: batch {batch} needs about {(fixed + batch * per_sequence) / gib:.1f} GiB of GPU memory "
        f"({per_sequence / gib:.2f} GiB per sequence + {fixed / gib:.2f} GiB fixed) on top of "
        f"{resident / gib:.1f} GiB resident, but {free / gib:.1f} of {total / gib:.1f} GiB are free "
        f"and {MEMORY_RESERVE:.0%} of that is kept in reserve: at most batch {largest} fits "
        + (f"(use {flag} {largest})" if largest else "(not even one sequence: use a shorter --seq)")
    )


# ------------------------------------------------------------------------------------ FLOPs
def sublayer_flops_per_token(cfg: MHCConfig, seq: int) -> List[float]:
    """Forward FLOPs per token of each sublayer's matmuls (attn: 2 * 4 d^2 for QKV and output
    projections + 4 T d for scores and values, with T the sequence length, not halved for the
    causal mask; mlp: 2 * 2 d d_mlp). The stream mixing is not counted: it is overhead."""
    d = cfg.d_model
    attn = 2 * 4 * d * d + 4 * seq * d
    mlp = 2 * 2 * d * cfg.d_mlp
    return [attn, mlp] * cfg.n_layers


def readout_flops_per_token(cfg: MHCConfig) -> float:
    return 2.0 * cfg.d_model * cfg.d_vocab  # the unembedding


def forward_flops_per_token(cfg: MHCConfig, seq: int) -> float:
    """2 N + 4 L T d (N: matmul parameters incl. the unembedding; the PaLM count, forward only)."""
    return sum(sublayer_flops_per_token(cfg, seq)) + readout_flops_per_token(cfg)


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


# ---------------------------------------------------------------------------------- results
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    return platform.processor() or platform.machine()


def write_result(
    benchmark: str, args: argparse.Namespace, device: torch.device, result: Dict[str, Any]
) -> Path:
    """Write `result` with what it was measured on (device, torch, shape, variant, dtype, batch) as JSON."""
    variant = getattr(args, "variant", "mhc")
    info = dict(
        benchmark=benchmark,
        shape=args.shape,
        device=str(device),
        device_name=device_name(device),
        torch_version=torch.__version__,
        dtype=args.dtype,
        compiled=args.compile,
        batch=args.batch,
        seq=args.seq,
        repeats=args.repeats,
        warmup=args.warmup,
        threads=torch.get_num_threads(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        config=make_config(args.shape, variant).to_dict(),
        **result,
    )
    path = Path(args.out) if args.out else RESULTS / f"{benchmark}-{args.shape}-{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {path}")
    return path


def print_table(rows: Dict[str, Dict[str, Any]], columns: Sequence[tuple]) -> None:
    """rows {name: {key: value}}; columns (header, key, format) - missing values print '-',
    out-of-memory rows print their reason."""
    header = f"{'row':<24}" + "".join(f"{h:>12}" for h, _, _ in columns)
    print(header + "\n" + "-" * len(header))
    for name, r in rows.items():
        if r.get("oom") or r.get("error"):
            print(f"{name:<24}{r.get('error', 'OOM')}")
            continue
        cells = [format(r[k], f) if r.get(k) is not None else "-" for _, k, f in columns]
        print(f"{name:<24}" + "".join(f"{c:>12}" for c in cells))


def cli(main: Callable[[], Any]) -> None:
    """Run a benchmark's `main` from the command line: bad input exits with its message."""
    try:
        main()
    except BenchmarkError as e:
        sys.exit(f"error: {e}")
