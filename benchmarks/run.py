"""One entry point for every benchmark, one JSON summary.

    python -m benchmarks.run --shape small --device cpu
    python -m benchmarks.run --shape mhc-780m --device cuda --dtype bfloat16 --compile

Runs, in order: `forward_overhead` (plain vs hooked vs caching vs nnsight forward, compiled rows
with --compile, the n = 1 yardstick, MFU on known GPUs), `probe_throughput` (StreamUsage,
Curvature, CKA, all three, the CKA GEMM over n_layers x n_streams representations),
`causal_sweeps` (full rescue matrix and patching sweep vs the naive loop and vs the FLOPs they
need) and `crosscoder_throughput`; each writes its own JSON under `--out-dir`, and
`summary-<shape>-<device>.json` collects them. `--only NAME ...` picks some; options after `--`
go to every benchmark (e.g. `-- --repeats 1`). Never asserts timings.
"""

from __future__ import annotations

import argparse
import json
import traceback
from pathlib import Path

from . import attribution, causal_sweeps, crosscoder_throughput, forward_overhead, probe_throughput
from .common import DTYPES, SHAPES, BenchmarkError, resolve_device

BENCHMARKS = {
    "forward_overhead": forward_overhead.main,
    "probe_throughput": probe_throughput.main,
    "causal_sweeps": causal_sweeps.main,
    "crosscoder_throughput": crosscoder_throughput.main,
    "attribution": attribution.main,
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="small", choices=sorted(SHAPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--compile", action="store_true", help="HookedMHC.compile() in every benchmark")
    p.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), default=None)
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    p.add_argument("extra", nargs="*", help="after --: options passed to every benchmark")
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except BenchmarkError as e:
        p.error(str(e))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    common = [
        "--shape",
        args.shape,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        *(["--compile"] if args.compile else []),
        *args.extra,
    ]
    summary = {
        "shape": args.shape,
        "device": args.device,
        "dtype": args.dtype,
        "compiled": args.compile,
        "results": {},
        "errors": {},
    }
    for name in args.only or BENCHMARKS:
        path = out_dir / f"{name}-{args.shape}-{device.type}.json"
        print(f"\n=== {name}")
        try:
            BENCHMARKS[name]([*common, "--out", str(path)])
            summary["results"][name] = json.loads(path.read_text())
        except Exception as e:  # noqa: BLE001 - one failing benchmark must not hide the others
            traceback.print_exc()
            summary["errors"][name] = f"{type(e).__name__}: {e}"
    path = out_dir / f"summary-{args.shape}-{device.type}.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nwrote {path}" + (f"; failed: {sorted(summary['errors'])}" if summary["errors"] else ""))
    return summary


if __name__ == "__main__":
    main()
