"""Crosscoder feature assignment: which stream does each feature live in?

Reproduces the crosscoder figure of "Analyzing Stream Collapse in Hyper-Connections": a sparse
crosscoder (BatchTopK, per-site normalisation) trained on every stream at a few layers; each
feature's decoder-norm share per stream decides its stream (share > tau) or "shared". With n
streams the largest share is at least 1/n, so tau is swept relative to that even split,
tau = 1/n + rho (1 - 1/n) (rho = 0.1 ... 0.9; the main tau has rho = 1/3, 0.5 for 4 streams).
The paper finds interpretable features concentrating in a dominant stream.

    python examples/crosscoder_assignment.py [--model NAME_OR_PATH] [--out DIR] [--fast]
                                             [--dict-size 1024] [--k 16] [--train-tokens 200000]
"""

from __future__ import annotations

import os
import sys

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # run as a file or via runpy
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Example  # noqa: E402


def add_arguments(parser):
    parser.add_argument("--dict-size", type=int, default=1024)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--train-tokens", type=int, default=200_000)


def main(argv=None):
    from mhc_interp.probes import ActivationBuffer, CrosscoderConfig, analyze_crosscoder, train_crosscoder

    ex = Example("crosscoder_assignment", __doc__, argv, add_arguments=add_arguments)
    ex.require_streams()
    a = ex.args
    dict_size, k, n_tokens = (128, 4, 4096) if a.fast else (a.dict_size, a.k, a.train_tokens)
    tokens = ex.tokens()
    buffer = ActivationBuffer(
        ex.model, tokens, buffer_tokens=min(16384, tokens.numel()), model_batch_size=ex.cfg.batch_size
    )
    crosscoder = train_crosscoder(
        buffer,
        CrosscoderConfig(dict_size=dict_size, k=k, batch_size=256),
        n_tokens=n_tokens,
        progress=ex.cfg.progress,
    )
    crosscoder.save(ex.out / "crosscoder")
    result = analyze_crosscoder(crosscoder, buffer)
    ex.save_result(result)
    ex.save_text("assignment_table.md", result.table())
    captions = {
        "stream_share": "Each alive feature's decoder-norm share per stream (features sorted by their top stream).",
        "assignment_counts": "Features assigned to each stream (share above the threshold tau) or 'shared', per "
        "threshold; tau = 1/n + rho (1 - 1/n) is swept above the even split 1/n.",
        "layer_profile": "Decoder-norm share per layer of the features assigned to each stream.",
        "explained_variance": "Explained variance of the crosscoder's reconstruction per (layer, stream) site.",
        "firing": "Firing frequency of the latents (dead latents never fire).",
    }
    for stem, fig in result.plot().items():
        ex.save_figure(fig, f"crosscoder_{stem}", captions.get(stem, stem))
    counts = result.meta["counts_at_threshold"]
    return ex.finish(
        f"{dict_size} latents trained on {n_tokens:,} tokens; features per stream at "
        f"tau={result.meta['threshold']:.3g} (rho={result.meta['threshold_relative']:.2f}): {counts}; "
        f"explained variance "
        f"{result.meta['explained_variance_total']:.2f}",
        counts=counts,
    )


if __name__ == "__main__":
    main()
