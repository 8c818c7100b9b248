"""Text corpora and tokenizers for training small models: read text files or a `datasets`
dataset, train a small byte-level BPE tokenizer with `tokenizers`, and cut token streams into
train / validation tensors."""

from __future__ import annotations

from itertools import chain
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

PathLike = Union[str, Path]


def read_texts(paths: Sequence[PathLike]) -> List[str]:
    """The contents of UTF-8 text files; a folder stands for its *.txt files (sorted). A file that
    is not text (a NUL byte, or bytes that are not UTF-8) is refused with its name: read with
    replacement characters it would give a report on garbage."""
    files: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.txt"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"corpus path {p} does not exist")
    if not files:
        raise FileNotFoundError(f"no text files under {[str(p) for p in paths]}")
    return [read_text_file(f) for f in files]


def read_text_file(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data:
        raise ValueError(
            f"corpus file {path} is not text (it holds NUL bytes at offset {data.index(0)}): "
            f"pass UTF-8 text files"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"corpus file {path} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}): "
            f"convert it to UTF-8 (e.g. iconv -t utf-8)"
        ) from None


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2):
    """A byte-level BPE tokenizer (GPT-2 style pre-tokenisation) trained on `texts`, wrapped as a
    `transformers.PreTrainedTokenizerFast` (so `save_pretrained` / `AutoTokenizer` work)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def encode_texts(tokenizer, texts: Iterable[str]) -> Tensor:
    """One long token stream: each text's tokens followed by the end-of-text token if any."""
    eos = getattr(tokenizer, "eos_token_id", None)
    end = [] if eos is None else [eos]
    return torch.tensor(list(chain.from_iterable(tokenizer.encode(t) + end for t in texts)), dtype=torch.long)


def split_stream(ids: Tensor, val_fraction: float = 0.05) -> Tuple[Tensor, Tensor]:
    """Train on the first (1 - val_fraction) of the stream, validate on the rest."""
    cut = int(len(ids) * (1 - val_fraction))
    return ids[:cut], ids[cut:]


def random_windows(
    ids: Tensor, batch: int, seq_len: int, generator: Optional[torch.Generator] = None
) -> Tuple[Tensor, Tensor]:
    """A batch of random (input, target) windows [batch, seq_len] from a token stream."""
    if len(ids) < seq_len + 2:
        raise ValueError(f"token stream of {len(ids)} tokens is too short for windows of {seq_len}")
    start = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=generator)
    windows = ids[start[:, None] + torch.arange(seq_len + 1)]  # [batch, seq_len + 1]
    return windows[:, :-1], windows[:, 1:]
