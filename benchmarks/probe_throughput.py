"""How fast do the observational probes run?

    python -m benchmarks.probe_throughput --shape small --device cpu
    python -m benchmarks.probe_throughput --shape mhc-780m --device cuda --dtype bfloat16

Rows (each the median of `--repeats` runs after one warm-up, random weights and tokens):
  forward             `run_probes` with a probe that needs nothing but the final stream state
                      (the runner's own cost: one forward per batch + masking)
  stream_usage        the StreamUsage probe over the corpus
  curvature           the Curvature probe (layer outputs, per stream + sum)
  cka                 the CKA probe (debiased + biased, every sublayer's streams, minibatches of
                      `--cka-minibatch` tokens)
  all three           the three probes sharing one forward per batch
  cka GEMM (R x N)    `hsic_matrix` alone on R = n_layers * n_streams random representations of
                      N tokens x d_model (centred Grams stacked, one GEMM; float64) - the "144
                      representations" figure at the mhc-780m shape
Columns: seconds per run, tokens/s over the corpus. JSON goes to `--out`. No timing asserts.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from mhc_interp import HookedMHC
from mhc_interp.probes import CKA, Curvature, Probe, ProbeResult, StreamUsage, run_probes
from mhc_interp.probes.cka import gram_linear, hsic_matrix

from .forward_overhead import DTYPES, SHAPES, make_config


class FinalStateOnly(Probe):
    """Needs only the last stream state: measures the runner + forward alone."""
    name = "forward"

    def hook_names(self, model):
        return [f"{model.sublayer_names[-1]}.hook_streams_out"]

    def update(self, acts, mask):
        pass

    def result(self):
        return ProbeResult(self.name, {"none": np.zeros(0)})


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="small", choices=sorted(SHAPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--n-seq", type=int, default=None, help="sequences in the corpus")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--cka-minibatch", type=int, default=512)
    p.add_argument("--cka-tokens", type=int, default=4096, help="N of the standalone GEMM row")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    shape = SHAPES[args.shape]
    batch, seq = args.batch or shape["batch"], args.seq or shape["seq"]
    n_seq = args.n_seq or 2 * batch
    torch.manual_seed(0)
    model = HookedMHC(make_config(args.shape, "mhc")).eval().to(args.device, DTYPES[args.dtype])
    corpus = torch.randint(0, model.cfg.d_vocab, (n_seq, seq))
    n_tokens = corpus.numel()

    def run(*probes):
        return lambda: run_probes(model, list(probes), corpus, batch_size=batch, progress=False)

    rows = {
        "forward": run(FinalStateOnly()),
        "stream_usage": run(StreamUsage()),
        "curvature": run(Curvature()),
        "cka": run(CKA(minibatch_tokens=args.cka_minibatch)),
        "all three": run(StreamUsage(), Curvature(), CKA(minibatch_tokens=args.cka_minibatch)),
    }
    results = {}
    print(f"{model.summary()}\ncorpus {n_seq} x {seq} tokens, batch {batch}")
    print(f"{'row':24s} {'s/run':>9s} {'tokens/s':>12s}")
    for name, fn in rows.items():
        sec = timed(fn, args.device, args.repeats)
        results[name] = {"seconds": sec, "tokens_per_s": n_tokens / sec}
        print(f"{name:24s} {sec:9.3f} {n_tokens / sec:12,.0f}")
    R, N, d = model.cfg.n_layers * model.cfg.n_streams, args.cka_tokens, model.cfg.d_model
    reps = torch.randn(R, N, d, device=args.device, dtype=torch.float64)

    def gemm():
        hsic_matrix(torch.stack([gram_linear(x) for x in reps]), unbiased=True)

    name = f"cka GEMM ({R} x {N})"
    try:
        sec = timed(gemm, args.device, args.repeats)
        results[name] = {"seconds": sec, "R": R, "N": N}
        print(f"{name:24s} {sec:9.3f}")
    except torch.OutOfMemoryError:
        print(f"{name:24s} OOM")
    info = {"shape": args.shape, "device": args.device, "dtype": args.dtype, "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
            "n_seq": n_seq, "seq": seq, "batch": batch, "results": results}
    out = Path(args.out or f"benchmarks/results/probe_throughput-{args.shape}-{args.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
