"""Sparse autoencoders on single residual streams, trained and evaluated by SAELens.

End to end, on the shipped demo model and the shipped corpus (a held-out Hamlet excerpt), on CPU:

1. the corpus is tokenized into windows (the last 10% held out for evaluation);
2. SAELens's own training runner trains one TopK SAE per stream of one stream-state hook (default
   `blocks.2.attn.hook_streams_in`, streams 0..n-1, from one shared forward per batch:
   `MultiSAETrainingRunner`), or with `--stream S` one SAE on stream S only
   (`LanguageModelSAETrainingRunner`); the stream is chosen through the adapter's site name
   `HOOK[S]`, never flattened; each SAE is written in SAELens's own format under `OUT/saes/`;
3. every SAE is loaded back with `sae_lens.SAE.load_from_disk`, checked to splice into its own
   stream (`splice_sae`), and evaluated with SAELens's `run_evals` on the held-out windows:
   reconstruction MSE, explained variance, L0, and the KL of the spliced model against the clean
   one next to the KL with that stream zero-ablated at the same hook;
4. the `SAEFeatures` probe reads where the features of one SAE (`--stream`, default 1) fire: at
   every sublayer's hook of the same kind and every stream.

Writes OUT/saes/<site>/ (SAELens format), OUT/metrics.json, OUT/metrics.md, OUT/sae_streams.png,
OUT/sae_features.{json,npz,png}.

    python examples/saelens_stream_sae.py [--model NAME_OR_PATH] [--hook blocks.2.attn.hook_streams_in]
        [--stream S] [--out saelens-out] [--tokens 120000] [--d-sae 512] [--k 16] [--fast]

Needs the SAELens extra, which pins transformer-lens<4: in its own environment,
`pip install torch==2.13.0 -e ".[saelens]"` (see docs/saelens.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def parse(argv=None):
    p = argparse.ArgumentParser(
        prog="saelens_stream_sae.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", default=None, help="shipped model name, folder, .pt or hub id (default: the demo model)"
    )
    p.add_argument("--hook", default="blocks.2.attn.hook_streams_in", help="a stream-state hook")
    p.add_argument(
        "--stream",
        type=int,
        default=None,
        help="train on this stream only (default: one SAE per stream, to compare them)",
    )
    p.add_argument(
        "--features-stream",
        type=int,
        default=None,
        help="the SAE whose features SAEFeatures reads (default: --stream, else 1)",
    )
    p.add_argument("--out", default="saelens-out")
    p.add_argument("--corpus", nargs="*", default=None, help="text files (default: the shipped corpus)")
    p.add_argument("--context", type=int, default=128, help="window length in tokens")
    p.add_argument("--tokens", type=int, default=120_000, help="training tokens per SAE")
    p.add_argument("--d-sae", type=int, default=512)
    p.add_argument("--k", type=int, default=16, help="TopK: active features per token")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-batches", type=int, default=4, help="evaluation batches of 8 held-out windows")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the demo model's ops are small, and one thread is "
        "several times faster than two on a busy CPU)",
    )
    p.add_argument("--fast", action="store_true", help="a smoke run of seconds (few tokens, small SAEs)")
    return p.parse_args(argv)


def main(argv=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from mhc_interp.interop.sae_features import SAEFeatures
    from mhc_interp.interop.saelens import (
        check_site,
        corpus_windows,
        evaluate_sae,
        require_saelens,
        sae_folder_name,
        splice_sae,
        stream_site,
        token_datasets,
        train_stream_sae,
        train_stream_saes,
    )
    from mhc_interp.probes import run_probes
    from mhc_interp.shipped import default_corpus, load

    args = parse(argv)
    if args.fast:
        args.tokens, args.d_sae, args.k, args.eval_batches = min(args.tokens, 8_000), 128, 8, 1
    torch.set_num_threads(args.threads)
    SAE = require_saelens().SAE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    model = load(args.model, args.device, "float32").eval()
    n = model.cfg.n_streams
    streams = list(range(n)) if args.stream is None else [args.stream]
    sites = [stream_site(args.hook, s) for s in streams]
    for site in sites:
        check_site(model, site)  # a clear error before any work
    context = min(args.context, model.cfg.n_ctx)
    windows = corpus_windows(model, args.corpus or default_corpus(), context)  # [n_windows, context]
    train, held_out = token_datasets(windows, eval_fraction=0.1)
    held_out_tokens = windows[-len(held_out) :]  # [n_eval, context]
    print(
        f"{len(train)} training / {len(held_out)} held-out windows of {context} tokens; "
        f"training {len(sites)} SAE(s) on {', '.join(sites)} for {args.tokens} tokens each"
    )

    # 2. train with SAELens's own runner, write in SAELens's format
    options = dict(
        d_sae=args.d_sae,
        k=args.k,
        context_size=context,
        training_tokens=args.tokens,
        lr=args.lr,
        model_name=str(args.model or "demo-mhc"),
    )
    saes_dir = out / "saes"
    if len(sites) == 1:
        train_stream_sae(model, sites[0], train, out=saes_dir / sae_folder_name(sites[0]), **options)
    else:
        train_stream_saes(model, sites, train, out=saes_dir, **options)
    t_train = time.time() - t0
    print(f"trained in {t_train:.0f} s")

    # 3. load back, splice, evaluate (SAELens's run_evals through the adapter)
    tokens = held_out_tokens[:8]
    metrics = {}
    for site in sites:
        sae = SAE.load_from_disk(saes_dir / sae_folder_name(site), device=args.device)
        with torch.no_grad():
            clean = model(tokens)
            with splice_sae(model, sae):  # the SAE's reconstruction in place of its stream
                spliced = model(tokens)
        assert not torch.equal(clean, spliced)
        metrics[site] = evaluate_sae(model, sae, held_out, n_batches=args.eval_batches, batch_size_prompts=8)
        m = metrics[site]
        print(
            f"{site}: MSE {m['mse']:.3g}  EV {m['explained_variance']:.3f}  L0 {m['l0']:.1f}  "
            f"KL spliced {m['kl_div_with_sae']:.4f} vs zero-ablated {m['kl_div_with_ablation']:.4f}  "
            f"CE {m['ce_loss_without_sae']:.3f} -> {m['ce_loss_with_sae']:.3f}"
        )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    rows = [
        "| site | MSE | explained var. | L0 | KL spliced | KL zero-ablated | KL score | CE clean -> spliced |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows += [
        f"| `{s}` | {m['mse']:.3g} | {m['explained_variance']:.3f} | {m['l0']:.1f} | {m['kl_div_with_sae']:.4f} "
        f"| {m['kl_div_with_ablation']:.4f} | {m['kl_div_score']:.3f} | {m['ce_loss_without_sae']:.3f} -> "
        f"{m['ce_loss_with_sae']:.3f} |"
        for s, m in metrics.items()
    ]
    (out / "metrics.md").write_text("\n".join(rows) + "\n")

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    x = np.arange(len(sites))
    labels = [f"stream {s}" for s in streams]
    axes[0].bar(x, [metrics[s]["explained_variance"] for s in sites])
    axes[0].set_title("explained variance")
    axes[1].bar(x, [metrics[s]["mse"] for s in sites])
    axes[1].set_title("reconstruction MSE (sum over d_model)")
    axes[2].bar(x - 0.2, [metrics[s]["kl_div_with_sae"] for s in sites], 0.4, label="SAE spliced")
    axes[2].bar(x + 0.2, [metrics[s]["kl_div_with_ablation"] for s in sites], 0.4, label="stream zeroed")
    axes[2].set_title("KL(clean || edited), nats/token")
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(labels)
    fig.suptitle(
        f"TopK SAEs (k={args.k}, d_sae={args.d_sae}) on {args.hook}, one per stream; held-out tokens"
    )
    fig.tight_layout()
    fig.savefig(out / "sae_streams.png", dpi=120)
    plt.close(fig)

    # 4. where one SAE's features fire: every sublayer's hook of this kind, every stream
    feature_stream = (
        args.features_stream
        if args.features_stream is not None
        else (args.stream if args.stream is not None else min(1, n - 1))
    )
    feature_site = stream_site(args.hook, feature_stream)
    if feature_site not in sites:
        raise SystemExit(f"--features-stream {feature_stream}: no SAE was trained on {feature_site}")
    probe = SAEFeatures(str(saes_dir / sae_folder_name(feature_site)), sites="sublayers")
    features = run_probes(model, probe, held_out_tokens, batch_size=8, progress=False)
    features.save(out / "sae_features")
    features.save_figures(out)
    summary = features.summary()
    print(
        f"SAEFeatures ({feature_site}): {summary['dead']:.1%} of features dead on the held-out text; at "
        f"{args.hook}, {summary.get('home_stream_top', float('nan')):.1%} of the live ones fire most often in "
        f"stream {feature_stream}; {summary['off_home']:.1%} fire most often at another sublayer or stream"
    )
    print(f"done in {time.time() - t0:.0f} s; wrote {out}/")
    return {"metrics": metrics, "features": features, "train_seconds": t_train}


if __name__ == "__main__":
    main()
