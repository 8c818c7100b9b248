"""Corrupted prompts by symmetric token replacement: swap one word for another single-token word
of the same kind (noun for noun, verb for verb, adjective for adjective), so clean and corrupted
prompts align position by position (STR, the recommended corruption for activation patching)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

DEFAULT_WORD_GROUPS: Dict[str, List[str]] = {
    "noun": [" cat", " dog", " house", " car", " tree", " book", " man", " woman", " city", " door"],
    "verb": [" ran", " walked", " ate", " saw", " said", " took", " made", " gave"],
    "adjective": [" big", " small", " red", " happy", " old", " new", " good", " bad"],
}


class SymmetricReplacement:
    """`corrupt(tokens [B, pos]) -> corrupted [B, pos]`: in every prompt, the last token that
    belongs to a word group is replaced by the next token of the same group (cyclically).

    groups: {kind: [words]} tokenized with `tokenizer` (words that are not one token are
    dropped), or {kind: [token ids]} with no tokenizer. A prompt with no replaceable token is an
    error, not a silent uncorrupted pair.
    """

    def __init__(self, tokenizer=None, groups: Optional[Dict[str, Sequence]] = None):
        groups = DEFAULT_WORD_GROUPS if groups is None else groups
        self.successor: Dict[int, int] = {}
        for kind, words in groups.items():
            ids = [i for w in words if (i := self._single_token(tokenizer, w)) is not None]
            if len(ids) < 2:
                raise ValueError(f"word group {kind!r} has fewer than two single-token words")
            self.successor.update(zip(ids, ids[1:] + ids[:1]))

    @staticmethod
    def _single_token(tokenizer, word) -> Optional[int]:
        if isinstance(word, int):
            return word
        if tokenizer is None:
            raise ValueError("word groups given as text need a tokenizer; pass token ids instead")
        ids = tokenizer.encode(word)
        return ids[0] if len(ids) == 1 else None

    def __call__(self, tokens: Tensor) -> Tensor:
        return self.corrupt_with_positions(tokens)[0]

    def corrupt_with_positions(self, tokens: Tensor) -> Tuple[Tensor, Tensor]:
        """(corrupted tokens, replaced position per prompt [B])."""
        corrupted = tokens.clone()
        positions = torch.full((tokens.shape[0],), -1, dtype=torch.long)
        for b, row in enumerate(tokens.tolist()):
            for p in range(len(row) - 1, -1, -1):
                if row[p] in self.successor:
                    corrupted[b, p] = self.successor[row[p]]
                    positions[b] = p
                    break
        missing = (positions < 0).nonzero().flatten().tolist()
        if missing:
            raise ValueError(f"prompts {missing} contain no token from the word groups to replace")
        return corrupted, positions
