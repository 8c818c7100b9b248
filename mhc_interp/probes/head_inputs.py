"""What the attention-head detectors check and score on: the model / head checks, the ablation
hook, the repeated random sequences, the ordinal sequences and the successor score.

    successor   on ordinal sequences (e.g. " Monday", " Tuesday", ...; token ids in order,
                distinct within a sequence): for each element k but the last, the head's output
                if it attended only to position k, o = W_O^h v_k, read through the final
                LayerNorm's weight (centred, no scale or bias: a direct-logit readout) and W_U
                restricted to that sequence's tokens; score = fraction of elements whose top
                token is the next element (chance 1 / len(sequence)). Gould et al. 2023's
                succession score, with the in-context value instead of an effective embedding.
                Needs sequences: pass token-id lists, or words if the model has a tokenizer;
                otherwise it is skipped (NaN, with the reason in `meta["skipped"]`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..model.attention import AttentionSublayer

if TYPE_CHECKING:
    from .heads import HeadScores

HEAD_SCORES = ("previous_token", "duplicate_token", "induction", "successor", "copy_suppression")

DEFAULT_ORDINAL_WORDS: Dict[str, List[str]] = {  # each word with its leading space, as tokenized mid-text
    name: [f" {word}" for word in words.split()]
    for name, words in {
        "days": "Monday Tuesday Wednesday Thursday Friday Saturday Sunday",
        "months": "January February March April May June July August September October November December",
        "number_words": "one two three four five six seven eight nine ten",
        "digits": "1 2 3 4 5 6 7 8 9",
    }.items()
}


# ------------------------------------------------------------------------------ validation
def check_attention_model(model) -> None:
    """Raise TypeError unless every block has a multi-head attention sublayer (`blocks.{l}.attn`
    an `AttentionSublayer`: c_attn / c_proj, hook_pattern, hook_z)."""
    blocks, cfg = getattr(model, "blocks", None), getattr(model, "cfg", None)
    if blocks is None or cfg is None or not hasattr(model, "hook_dict"):
        raise TypeError(
            f"head detectors need a HookedMHC (blocks.{{l}}.attn multi-head attention), "
            f"got {type(model).__name__}"
        )
    if len(blocks) == 0:
        raise TypeError("head detectors: the model has no blocks, hence no attention heads")
    for l, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, AttentionSublayer):
            raise TypeError(
                f"head detectors need multi-head attention at blocks.{l}.attn (an AttentionSublayer "
                f"with hook_pattern, hook_z and c_proj); found {type(attn).__name__}"
            )
    if getattr(cfg, "n_heads", 0) < 1:
        raise TypeError(f"head detectors: the model has n_heads={getattr(cfg, 'n_heads', None)}")


def _check_head(model, layer: int, head: int) -> Tuple[int, int]:
    for v, what, n in ((layer, "layer", model.cfg.n_layers), (head, "head", model.cfg.n_heads)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{what} index must be an int, got {v!r}")
        if not 0 <= v < n:
            raise IndexError(f"{what} index {v} out of range: the model has {n} {what}s (0..{n - 1})")
    return int(layer), int(head)


def _check_heads(model, heads) -> Dict[int, List[int]]:
    """None = every head; else a list of (layer, head) -> {layer: sorted heads}."""
    if heads is None:
        return {l: list(range(model.cfg.n_heads)) for l in range(model.cfg.n_layers)}
    pairs = list(heads)
    if not pairs:
        raise ValueError("heads is an empty list; pass None for every head")
    out: Dict[int, set] = {}
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"heads must be (layer, head) pairs, got {pair!r}")
        l, h = _check_head(model, *pair)
        out.setdefault(l, set()).add(h)
    return {l: sorted(hs) for l, hs in sorted(out.items())}


def head_ablation_hook(model, layer: int, head: int):
    """(hook name, hook) zeroing head `head`'s slice of the input to c_proj at layer `layer`
    (hook_z[:, :, head] = 0): the head's output is removed, nothing else."""
    check_attention_model(model)
    layer, head = _check_head(model, layer, head)

    def ablate(z: Tensor, hook) -> Tensor:
        z = z.clone()
        z[:, :, head] = 0
        return z

    return f"blocks.{layer}.attn.hook_z", ablate


# ------------------------------------------------------------------------------ token sets
def repeated_random_tokens(model, n_seq: int = 32, half_len: Optional[int] = None, seed: int = 0) -> Tensor:
    """[n_seq, 1 + 2 half_len] long: [bos, r_1..r_m, r_1..r_m], the bos and r drawn without
    replacement (distinct) when the vocabulary allows. half_len defaults to min(64, (n_ctx-1)//2)."""
    cfg = model.cfg
    max_half = (cfg.n_ctx - 1) // 2
    half_len = min(64, max_half) if half_len is None else int(half_len)
    if not 2 <= half_len <= max_half:
        raise ValueError(f"half_len must be in [2, {max_half}] for n_ctx={cfg.n_ctx}, got {half_len}")
    if n_seq < 1:
        raise ValueError(f"n_seq must be >= 1, got {n_seq}")
    g = torch.Generator().manual_seed(seed)
    draws = [  # bos, r_1..r_m
        torch.randperm(cfg.d_vocab, generator=g)[: half_len + 1]
        if cfg.d_vocab >= half_len + 1
        else torch.randint(0, cfg.d_vocab, (half_len + 1,), generator=g)
        for _ in range(n_seq)
    ]
    return torch.stack([torch.cat([r, r[1:]]) for r in draws])  # bos, r_1..r_m, r_1..r_m


def _ordinal_ids(model, sequences) -> List[List[int]]:
    """Token-id sequences from ids or words (words need the model's tokenizer, one token each)."""
    out = []
    for seq in sequences:
        seq = list(seq)
        if seq and all(isinstance(t, str) for t in seq):
            if model.tokenizer is None:
                raise ValueError(
                    "ordinal sequences given as words need a tokenizer, and this model "
                    "has none; pass token-id sequences"
                )
            encoded = [model.tokenizer.encode(word) for word in seq]
            for word, enc in zip(seq, encoded):
                if len(enc) != 1:
                    raise ValueError(
                        f"ordinal word {word!r} is {len(enc)} tokens; successor scoring "
                        f"needs single-token words"
                    )
            seq = [enc[0] for enc in encoded]
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in seq):
            raise TypeError(f"an ordinal sequence must be token ids (ints) or words, got {seq!r}")
        if len(seq) < 3:
            raise ValueError(f"an ordinal sequence needs >= 3 elements, got {seq}")
        if len(set(seq)) != len(seq):
            raise ValueError(f"ordinal sequence {seq} repeats a token")
        bad = [t for t in seq if not 0 <= t < model.cfg.d_vocab]
        if bad:
            raise ValueError(f"token ids {bad} outside the vocabulary [0, {model.cfg.d_vocab})")
        out.append([int(t) for t in seq])
    if not out:
        raise ValueError("no ordinal sequences given")
    return out


def _ordinal_runs(model) -> List[Tuple[List[str], List[int]]]:
    """Per built-in ordinal list, its longest run of consecutive words that are single, distinct
    tokens, as (words, ids): a word that splits into several tokens ends a run, so no sequence
    skips a step (" one two three ten" is not ordinal)."""
    out = []
    for words in DEFAULT_ORDINAL_WORDS.values():
        run, best = [], []  # [(word, id)]
        for w in words:
            ids = model.tokenizer.encode(w)
            single = len(ids) == 1 and 0 <= ids[0] < model.cfg.d_vocab
            run = (run if single and ids[0] not in [i for _, i in run] else []) + (
                [(w, ids[0])] if single else []
            )
            best = run if len(run) > len(best) else best
        out.append(([w for w, _ in best], [i for _, i in best]))
    return out


def _default_ordinal_ids(model) -> List[List[int]]:
    """The ids of every `_ordinal_runs` run of >= 3 words."""
    return [ids for _, ids in _ordinal_runs(model) if len(ids) >= 3]


def add_whole_list_successor(model, heads: "HeadScores") -> None:
    """The report's successor scores (its corpus run has no ordinal sequences): on the built-in
    lists that are single tokens in full in this tokenizer, or, on `heads.meta["skipped"]` (and so
    its empty panel), why none could be scored."""
    skipped = heads.meta.setdefault("skipped", {})
    if model.tokenizer is None:
        skipped["successor"] = (
            "the model has no tokenizer, so there are no ordinal words (days, months, "
            "numbers) to score; detect_heads(model, ordinal_sequences=[[id, ...]]) takes ids"
        )
        return
    runs = _ordinal_runs(model)
    whole = [
        ids for (words, ids), listed in zip(runs, DEFAULT_ORDINAL_WORDS.values()) if len(ids) == len(listed)
    ]
    if not whole:
        longest = max((words for words, _ in runs), key=len)
        have = f"longest run: {''.join(longest).strip()!r}" if longest else "none is"
        skipped["successor"] = (
            f"no ordinal word list (days, months, number words, digits) is single tokens "
            f"in this tokenizer ({have}), so no successor sequence to score"
        )
        return
    _score_successor(model, heads, whole)


def _score_successor(model, heads: "HeadScores", sequences) -> None:
    """`successor_scores` on `sequences` into `heads` (scores, count, source; no longer skipped)."""
    heads.arrays["successor"], count = successor_scores(model, sequences)
    heads.meta.setdefault("counts", {})["successor"] = int(count)
    heads.meta.setdefault("sources", {})["successor"] = "ordinal"
    heads.meta.setdefault("skipped", {}).pop("successor", None)


@torch.no_grad()
def successor_scores(model, sequences) -> Tuple[np.ndarray, int]:
    """Succession score [n_layers, n_heads] on ordinal `sequences` (token ids, or words with a
    tokenizer) and the number of scored elements; see the module docstring."""
    check_attention_model(model)
    seqs = _ordinal_ids(model, sequences)
    cfg = model.cfg
    L, H, dh = cfg.n_layers, cfg.n_heads, cfg.d_head
    hits = torch.zeros(L, H, dtype=torch.float64)
    count = 0
    names = [f"blocks.{l}.attn.hook_v" for l in range(L)]
    ln_w = model.ln_final.weight.detach().float()
    W_U = model.W_U.detach().float()
    for seq in seqs:
        ids = torch.tensor(seq, device=model.device)[None]
        _, cache = model.run_with_cache(ids, names_filter=names)
        target = torch.arange(1, len(seq), device=model.device)  # next element's index
        for l in range(L):
            v = cache[names[l]][0, :-1].float()  # [k, H, dh]
            W = model.blocks[l].attn.c_proj.weight.detach().float()  # [d_out, d_in]
            W_O = W.T.reshape(H, dh, -1)  # [H, dh, d]
            o = torch.einsum("khe,hed->khd", v, W_O)  # [k, H, d]
            o = (o - o.mean(-1, keepdim=True)) * ln_w
            readout = o @ W_U[:, ids[0]]  # [k, H, len(seq)]
            hits[l] += (readout.argmax(-1) == target[:, None]).double().sum(0).cpu()
        count += len(seq) - 1
    return (hits / count).numpy(), count


def add_successor(model, heads: "HeadScores", ordinal_sequences=None) -> None:
    """`detect_heads`' successor scores into `heads`: on `ordinal_sequences`, else on the built-in
    runs of >= 3 single-token words (`_ordinal_runs`), else NaN with the reason in
    `heads.meta["skipped"]`."""
    if ordinal_sequences is None and model.tokenizer is not None:
        ordinal_sequences = _default_ordinal_ids(model) or None
    if ordinal_sequences is not None:
        return _score_successor(model, heads, ordinal_sequences)
    heads.arrays["successor"] = np.full((model.cfg.n_layers, model.cfg.n_heads), np.nan)
    why = (
        "this model has no tokenizer"
        if model.tokenizer is None
        else "no built-in ordinal list (days, months, number words, digits) has 3 consecutive words that "
        "are single tokens of this model's tokenizer"
    )
    heads.meta["skipped"]["successor"] = (
        f"successor scores need ordinal sequences and {why}: "
        "pass ordinal_sequences=[[id, id, ...], ...] (token ids in ordinal order)"
    )
    heads.meta["sources"]["successor"] = "skipped"
