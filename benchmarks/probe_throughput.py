"""How fast do the observational probes run?

    python -m benchmarks.probe_throughput --shape small --device cpu
    python -m benchmarks.probe_throughput --shape mhc-780m --device cuda --dtype bfloat16

Rows (each the median of `--repeats` runs after `--warmup` ones, random weights and tokens):
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
Columns: seconds per run, tokens/s over the corpus, peak GPU MiB (cuda). JSON goes to `--out`.
No timing asserts.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from mhc_interp.probes import CKA, Curvature, Probe, ProbeResult, StreamUsage, run_probes
from mhc_interp.probes.cka import gram_linear, hsic_matrix

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


class FinalStateOnly(Probe):
    """Needs only the last stream state: measures the runner + forward alone."""

    name = "forward"

    def hook_names(self, model):
        return [f"{model.sublayer_names[-1]}.hook_streams_out"]

    def update(self, acts, mask):
        pass

    def result(self):
        return ProbeResult(self.name, {"none": np.zeros(0)})


def main(argv=None):
    p = add_common_args(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    )
    p.add_argument("--n-seq", type=int, default=None, help="sequences in the corpus (default 2 x --batch)")
    p.add_argument("--cka-minibatch", type=int, default=512)
    p.add_argument(
        "--cka-tokens",
        type=int,
        default=None,
        help="N of the standalone GEMM row (default 4096; 256 at the tiny shape)",
    )
    args = p.parse_args(argv)
    device = prepare(args)
    batch, seq = args.batch, args.seq
    n_seq = args.n_seq or 2 * batch
    model = build_model(args, device)
    corpus = random_tokens(model, n_seq, seq).cpu()
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
    print(f"{model.summary()}\ncorpus {n_seq} x {seq} tokens, batch {batch}")
    results = {name: timed(fn, device, args.repeats, args.warmup) for name, fn in rows.items()}
    R, d = model.cfg.n_layers * model.cfg.n_streams, model.cfg.d_model
    N = args.cka_tokens or (256 if args.shape == "tiny" else 4096)
    reps = torch.randn(R, N, d, device=device, dtype=torch.float64)
    gemm_row = f"cka GEMM ({R} x {N})"
    results[gemm_row] = timed(
        lambda: hsic_matrix(torch.stack([gram_linear(x) for x in reps]), unbiased=True),
        device,
        args.repeats,
        args.warmup,
    )
    for name, r in results.items():
        if not r["oom"] and name != gemm_row:
            r["tokens_per_s"] = n_tokens / r["seconds"]
    print_table(
        results,
        [("s/run", "seconds", ".3f"), ("tokens/s", "tokens_per_s", ",.0f"), ("peak MiB", "peak_mib", ".0f")],
    )
    result = dict(n_seq=n_seq, cka_gemm=dict(R=R, N=N), rows=results)
    write_result("probe_throughput", args, device, result)
    return result


if __name__ == "__main__":
    cli(main)
