"""How fast does a sparse crosscoder over (layer, stream) sites train?

    python -m benchmarks.crosscoder_throughput --device cpu                      # small shape
    python -m benchmarks.crosscoder_throughput --shape mhc-780m --device cuda --dtype bfloat16

Random-weight `HookedMHC` of `--shape` (see `benchmarks/forward_overhead.py`), random tokens, the
default sites (all streams at up to 4 evenly spaced block outputs: 16 sites at both shapes), a
BatchTopK crosscoder of `--dict-size` latents. Rows (tokens/s = training rows per second):

  buffer fill        `ActivationBuffer` filling `--buffer-tokens` rows from the model (forwards
                     with hooks on the site hooks only, stopped after the last one; BOS dropped;
                     bf16 storage; shuffle)
  train batchtopk    `train_crosscoder` steps on activations already in memory (the crosscoder
                     alone: encoder, BatchTopK over the batch, decoder, aux loss, Adam)
  train l1           the same with the L1 (sum of decoder norms) penalty
  end to end         `train_crosscoder` on an `ActivationBuffer` (model forwards + refills +
                     training): what a real run sustains

Each training row runs `--warmup` untimed steps, then `--steps` timed ones continuing the same
crosscoder (float32 on CPU, bf16 autocast on CUDA; `torch.cuda.synchronize()` around the timing).
JSON goes to `--out` (default benchmarks/results/crosscoder_throughput-<shape>-<device>.json).
No timing asserts. On a shared CPU, `--threads 1` is steadier.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from mhc_interp import HookedMHC
from mhc_interp.probes.crosscoder import CrosscoderConfig, train_crosscoder
from mhc_interp.probes.crosscoder_buffer import ActivationBuffer, InMemoryActivations

from .forward_overhead import DTYPES, SHAPES, make_config

DEFAULTS = {  # dict size, batch, buffer tokens, timed steps
    "small": dict(dict_size=2048, batch=1024, buffer_tokens=16384, steps=5),
    "mhc-780m": dict(dict_size=16384, batch=4096, buffer_tokens=131072, steps=20),
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="small", choices=sorted(SHAPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model weights")
    p.add_argument("--dict-size", type=int, default=None)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=None, help="crosscoder batch (tokens)")
    p.add_argument("--buffer-tokens", type=int, default=None)
    p.add_argument("--model-batch", type=int, default=None, help="sequences per forward")
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape, dflt = SHAPES[args.shape], DEFAULTS[args.shape]
    dict_size = args.dict_size or dflt["dict_size"]
    batch = args.batch or dflt["batch"]
    buffer_tokens = args.buffer_tokens or dflt["buffer_tokens"]
    steps = args.steps or dflt["steps"]
    seq = args.seq or shape["seq"]
    model_batch = args.model_batch or shape["batch"]
    dev = args.device

    torch.manual_seed(0)
    model = HookedMHC(make_config(args.shape, "mhc")).eval().to(dev, DTYPES[args.dtype])
    n_seq = max(2 * model_batch, -(-buffer_tokens // (seq - 1)) + model_batch)
    corpus = torch.randint(0, model.cfg.d_vocab, (n_seq, seq))
    cfg = CrosscoderConfig(dict_size=dict_size, k=args.k, batch_size=batch, lr=1e-4)
    print(f"{model.summary()}\ncorpus {n_seq} x {seq} tokens; crosscoder dict {dict_size}, k {args.k}, "
          f"batch {batch}; buffer {buffer_tokens} tokens; {torch.get_num_threads()} CPU threads")
    results = {}

    def report(name, sec, tokens, **extra):
        results[name] = {"seconds": sec, "tokens": tokens, "tokens_per_s": tokens / sec, **extra}
        print(f"{name:20s} {sec:9.3f} s {tokens:10d} tok {tokens / sec:12,.0f} tok/s")

    # buffer fill
    buf = ActivationBuffer(model, corpus, buffer_tokens=buffer_tokens, model_batch_size=model_batch)
    print(f"sites: {len(buf.sites)} ({buf.hook_names[0]} ... {buf.hook_names[-1]}), "
          f"{buf.memory_bytes / 2 ** 20:.0f} MiB buffer")
    sync(dev)
    t0 = time.perf_counter()
    buf.peek(1)  # the first fill
    sync(dev)
    report("buffer fill", time.perf_counter() - t0, buffer_tokens)

    # training on in-memory activations
    acts = buf.peek(buffer_tokens).to(dev)
    for name, sparsity in (("train batchtopk", "batchtopk"), ("train l1", "l1")):
        c = CrosscoderConfig(**{**cfg.to_dict(), "sparsity": sparsity})
        try:
            cc = train_crosscoder(InMemoryActivations(acts), c, args.warmup, device=dev, progress=False)
            sync(dev)
            t0 = time.perf_counter()
            train_crosscoder(InMemoryActivations(acts), cc, steps, progress=False)
            sync(dev)
            report(name, time.perf_counter() - t0, steps * batch, params=sum(q.numel() for q in cc.parameters()))
        except torch.OutOfMemoryError:
            print(f"{name:20s} OOM")
        del cc
    # end to end through the buffer (refills included)
    buf = ActivationBuffer(model, corpus, buffer_tokens=buffer_tokens, model_batch_size=model_batch)
    cc = train_crosscoder(buf, cfg, args.warmup, device=dev, progress=False)
    read0 = buf.tokens_read
    sync(dev)
    t0 = time.perf_counter()
    train_crosscoder(buf, cc, steps, progress=False)
    sync(dev)
    report("end to end", time.perf_counter() - t0, steps * batch, model_tokens_read=buf.tokens_read - read0)

    info = {"shape": args.shape, "device": dev, "dtype": args.dtype, "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name() if dev.startswith("cuda") else platform.processor(),
            "threads": torch.get_num_threads(), "n_sites": len(buf.sites), "d_model": model.cfg.d_model,
            "dict_size": dict_size, "k": args.k, "batch": batch, "buffer_tokens": buffer_tokens,
            "steps": steps, "warmup": args.warmup, "seq": seq, "model_batch": model_batch,
            "results": results}
    out = Path(args.out or f"benchmarks/results/crosscoder_throughput-{args.shape}-{dev.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=2))
    print(f"wrote {out}")
    return info


if __name__ == "__main__":
    main()
