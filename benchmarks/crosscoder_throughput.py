"""How fast does a sparse crosscoder over (layer, stream) sites train?

    python -m benchmarks.crosscoder_throughput --device cpu                      # small shape
    python -m benchmarks.crosscoder_throughput --shape mhc-780m --device cuda --dtype bfloat16

Random-weight `HookedMHC` of `--shape` (see `benchmarks/common.py`), random tokens, the
default sites (all streams at up to 4 evenly spaced block outputs: 16 sites at small and mhc-780m), a
BatchTopK crosscoder of `--dict-size` latents. Rows (tokens/s = training rows per second):

  buffer fill        `ActivationBuffer` filling `--buffer-tokens` rows from the model (forwards
                     with hooks on the site hooks only, stopped after the last one; BOS dropped;
                     bf16 storage; shuffle)
  train batchtopk    `train_crosscoder` steps on activations already in memory (the crosscoder
                     alone: encoder, BatchTopK over the batch, decoder, aux loss, Adam)
  train l1           the same with the L1 (sum of decoder norms) penalty
  end to end         `train_crosscoder` on an `ActivationBuffer` (model forwards + refills +
                     training): what a real run sustains

Each training row runs `--warmup-steps` untimed steps, then `--steps` timed ones continuing the same
crosscoder (float32 on CPU, bf16 autocast on CUDA; `torch.cuda.synchronize()` around the timing;
peak GPU MiB per row). `--batch` / `--seq` set the model forwards that fill the buffer.
JSON goes to `--out` (default benchmarks/results/crosscoder_throughput-<shape>-<device>.json).
No timing asserts. On a shared CPU, `--threads 1` is steadier.
"""

from __future__ import annotations

import argparse

import torch

from mhc_interp.probes.crosscoder import CrosscoderConfig, train_crosscoder
from mhc_interp.probes.crosscoder_buffer import ActivationBuffer, InMemoryActivations

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

DEFAULTS = {  # dict size, crosscoder batch (tokens), buffer tokens, timed steps
    "tiny": dict(dict_size=256, cc_batch=128, buffer_tokens=1024, steps=3),
    "small": dict(dict_size=2048, cc_batch=1024, buffer_tokens=16384, steps=5),
    "mhc-780m": dict(dict_size=16384, cc_batch=4096, buffer_tokens=131072, steps=20),
}


def main(argv=None):
    p = add_common_args(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter),
        repeats=1,
    )
    p.add_argument("--dict-size", type=int, default=None)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--cc-batch", type=int, default=None, help="crosscoder batch (tokens per step)")
    p.add_argument("--buffer-tokens", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed training steps per row")
    p.add_argument("--warmup-steps", type=int, default=2)
    args = p.parse_args(argv)
    device = prepare(args)
    dflt = DEFAULTS[args.shape]
    dict_size = args.dict_size or dflt["dict_size"]
    cc_batch = args.cc_batch or dflt["cc_batch"]
    buffer_tokens = args.buffer_tokens or dflt["buffer_tokens"]
    steps = args.steps or dflt["steps"]
    seq, model_batch = args.seq, args.batch
    dev = str(device)

    model = build_model(args, device)
    n_seq = max(2 * model_batch, -(-buffer_tokens // (seq - 1)) + model_batch)
    corpus = random_tokens(model, n_seq, seq).cpu()
    cfg = CrosscoderConfig(dict_size=dict_size, k=args.k, batch_size=cc_batch, lr=1e-4)
    print(
        f"{model.summary()}\ncorpus {n_seq} x {seq} tokens; crosscoder dict {dict_size}, k {args.k}, "
        f"batch {cc_batch}; buffer {buffer_tokens} tokens; {torch.get_num_threads()} CPU threads"
    )
    rows = {}

    def row(name, fn, tokens, **extra):
        r = timed(fn, device, repeats=1, warmup=0)  # stateful (training continues): timed once
        if not r["oom"]:
            r.update(tokens=tokens, tokens_per_s=tokens / r["seconds"], **extra)
        rows[name] = r

    with torch.no_grad():  # warm: the timed fill must not pay CUDA start-up or compilation
        model(corpus[:model_batch].to(device), return_type=None)
    buf = ActivationBuffer(model, corpus, buffer_tokens=buffer_tokens, model_batch_size=model_batch)
    print(
        f"sites: {len(buf.sites)} ({buf.hook_names[0]} ... {buf.hook_names[-1]}), "
        f"{buf.memory_bytes / 2**20:.0f} MiB buffer"
    )
    row("buffer fill", lambda: buf.peek(1), buffer_tokens)  # the first fill
    acts = buf.peek(buffer_tokens).to(dev)
    for name, sparsity in (("train batchtopk", "batchtopk"), ("train l1", "l1")):
        c = CrosscoderConfig(**{**cfg.to_dict(), "sparsity": sparsity})
        cc = train_crosscoder(InMemoryActivations(acts), c, args.warmup_steps, device=dev, progress=False)
        row(
            name,
            lambda: train_crosscoder(InMemoryActivations(acts), cc, steps, progress=False),
            steps * cc_batch,
            params=sum(q.numel() for q in cc.parameters()),
        )
        del cc
    # end to end through the buffer (refills included)
    buf = ActivationBuffer(model, corpus, buffer_tokens=buffer_tokens, model_batch_size=model_batch)
    cc = train_crosscoder(buf, cfg, args.warmup_steps, device=dev, progress=False)
    read0 = buf.tokens_read
    row("end to end", lambda: train_crosscoder(buf, cc, steps, progress=False), steps * cc_batch)
    if not rows["end to end"]["oom"]:
        rows["end to end"]["model_tokens_read"] = buf.tokens_read - read0
    print_table(
        rows,
        [
            ("seconds", "seconds", ".3f"),
            ("tokens", "tokens", "d"),
            ("tokens/s", "tokens_per_s", ",.0f"),
            ("peak MiB", "peak_mib", ".0f"),
        ],
    )
    result = dict(
        n_sites=len(buf.sites),
        d_model=model.cfg.d_model,
        dict_size=dict_size,
        k=args.k,
        cc_batch=cc_batch,
        buffer_tokens=buffer_tokens,
        steps=steps,
        warmup_steps=args.warmup_steps,
        rows=rows,
    )
    write_result("crosscoder_throughput", args, device, result)
    return result


if __name__ == "__main__":
    cli(main)
