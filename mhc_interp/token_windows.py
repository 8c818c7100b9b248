"""The tokens the probes run on: a corpus cut into windows under a budget (`TokenBudget`,
`corpus_tokens`), and the clean / corrupted prompt pairs of the causal probes
(`patching_prompts`). Shared by the report, `mhc-interp probe` and the example scripts."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Sequence

import torch
from torch import Tensor


@dataclass
class TokenBudget:
    """How many tokens each kind of probe sees (and how they are batched)."""

    max_tokens: int = 16384  # corpus tokens for the observational probes
    seq_len: int = 128  # corpus window length (capped at the model's context)
    batch_size: int = 8  # windows per forward
    causal_prompts: int = 8  # prompts for the interventions
    causal_seq_len: int = 64  # tokens per prompt
    cka_minibatch: int = 256  # CKA's minibatch, tokens
    predictability_tokens: int = 2048  # tokens the ridge fits of CrossStreamPredictability keep
    # share of the corpus tokens the logit lens scores (a seeded sample; 1: all), its standard errors
    # reported: its vocabulary-sized rows are the main job's largest cost (25%: |z| <= 1.8 vs all)
    lens_token_fraction: float = 0.25
    progress: bool = True  # progress bars

    def fast(self, **overrides):
        """A smoke run of a few seconds on the tiny models (`--fast`): a copy with small budgets."""
        return replace(
            self,
            **{
                **dict(
                    max_tokens=1024,
                    seq_len=64,
                    causal_prompts=4,
                    causal_seq_len=32,
                    predictability_tokens=256,
                ),
                **overrides,
            },
        )


def corpus_tokens(model, texts: Sequence[str], budget: TokenBudget) -> Tensor:
    """[n_seq, seq_len] windows of the tokenized corpus, up to max_tokens; random token ids when
    the model has no tokenizer (said in the report)."""
    seq_len = min(budget.seq_len, model.cfg.n_ctx)
    n_seq = max(1, budget.max_tokens // seq_len)
    if model.tokenizer is None:
        return torch.randint(
            0, model.cfg.d_vocab, (n_seq, seq_len), generator=torch.Generator().manual_seed(0)
        )
    ids: List[int] = []
    for t in texts:
        ids += model.tokenizer.encode(t)
        if len(ids) >= n_seq * seq_len:
            break
    n_full = len(ids) // seq_len
    if n_full < 2:
        raise ValueError(f"the corpus has {len(ids)} tokens: too short for windows of {seq_len} tokens")
    return torch.tensor(ids[: min(n_seq, n_full) * seq_len]).view(-1, seq_len)


def patching_prompts(model, tokens: Tensor, budget: TokenBudget):
    """(clean [causal_prompts, causal_seq_len], corrupted, how) for activation patching: corpus
    windows `tokens` [n_seq, seq_len] in which a noun, verb or adjective of the default word lists
    can be swapped (symmetric token replacement); without a tokenizer (or a listed word), one
    mid-sequence token is replaced by the next token id."""
    from .probes.corruption import SymmetricReplacement

    windows = tokens[:, : budget.causal_seq_len]
    if model.tokenizer is not None:
        try:
            corrupt = SymmetricReplacement(model.tokenizer)
        except ValueError:  # the tokenizer splits the listed words: fall back below
            corrupt = SymmetricReplacement(groups={"none": [-1, -2]})
        keep = [i for i, row in enumerate(windows.tolist()) if any(t in corrupt.successor for t in row[1:])]
        if keep:
            clean = windows[keep[: budget.causal_prompts]]
            return clean, corrupt(clean), "symmetric token replacement (default word lists)"
    clean = windows[: budget.causal_prompts]
    corrupted = clean.clone()
    mid = clean.shape[1] // 2
    corrupted[:, mid] = (corrupted[:, mid] + 1) % model.cfg.d_vocab
    return clean, corrupted, f"token {mid} replaced by the next token id (no tokenizer / no listed word)"
