"""One entry point for every benchmark, one JSON summary.

    python -m benchmarks.run --shape small --device cpu
    python -m benchmarks.run --shape mhc-780m --device cuda --dtype bfloat16

Runs, in order: `forward_overhead` (plain vs hooked vs caching vs nnsight forward, the n = 1
yardstick, MFU on known GPUs), `probe_throughput` (StreamUsage, Curvature, CKA, all three, the
CKA GEMM over n_layers x n_streams representations), `causal_sweeps` (full rescue matrix and
patching sweep vs the naive loop) and `crosscoder_throughput`; each writes its own JSON under
`--out-dir`, and `summary-<shape>-<device>.json` collects them. `--only NAME ...` picks some.
Never asserts timings.
"""
from __future__ import annotations

import argparse
import json
import traceback
from pathlib import Path

from . import causal_sweeps, crosscoder_throughput, forward_overhead, probe_throughput

BENCHMARKS = {
    "forward_overhead": forward_overhead.main,
    "probe_throughput": probe_throughput.main,
    "causal_sweeps": causal_sweeps.main,
    "crosscoder_throughput": crosscoder_throughput.main,
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="small", choices=sorted(forward_overhead.SHAPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(forward_overhead.DTYPES))
    p.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), default=None)
    p.add_argument("--out-dir", default="benchmarks/results")
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device_kind = args.device.split(":")[0]
    summary = {"shape": args.shape, "device": args.device, "dtype": args.dtype, "results": {}, "errors": {}}
    for name in args.only or BENCHMARKS:
        path = out_dir / f"{name}-{args.shape}-{device_kind}.json"
        print(f"\n=== {name}")
        try:
            BENCHMARKS[name](["--shape", args.shape, "--device", args.device, "--dtype", args.dtype,
                              "--out", str(path)])
            summary["results"][name] = json.loads(path.read_text())
        except Exception as e:  # noqa: BLE001 - one failing benchmark must not hide the others
            traceback.print_exc()
            summary["errors"][name] = f"{type(e).__name__}: {e}"
    path = out_dir / f"summary-{args.shape}-{device_kind}.json"
    path.write_text(json.dumps(summary, indent=1))
    print(f"\nwrote {path}" + (f"; failed: {sorted(summary['errors'])}" if summary["errors"] else ""))
    return summary


if __name__ == "__main__":
    main()
