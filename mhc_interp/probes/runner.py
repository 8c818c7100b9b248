"""Drive one or several probes over a token source, sharing one forward per batch.

    results = run_probes(model, [StreamUsage(), CKA()], tokens, batch_size=8)

Token sources (`iter_batches`):
- a token tensor [n_seq, pos] (or 1-D: cut into `seq_len` windows);
- a `datasets.Dataset` with an `input_ids` column (ragged rows are right-padded and masked) or a
  `text` column (tokenized with the model's tokenizer, cut into `seq_len` windows);
- a list of text files (paths), tokenized on the fly and cut into `seq_len` windows.
A text's (or 1-D tensor's) last, shorter window is kept as a right-padded, masked row, so short
documents are not dropped (a single-token remainder, which no probe can score, is).

Only the hooks the probes ask for are cached, each batch is checked for NaN/inf, and the forward
stops after the last sublayer any probe needs. The position mask excludes position 0 (BOS) by
default and padding always.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from ..data import read_text_file
from ..hooks.names import check_hook_names
from ..timing import PhaseTimer, maybe
from .base import Probe, ProbeResult
from .causal import CausalProbe, position_mask
from .sites import forward_sites, last_sublayer_needed

if TYPE_CHECKING:
    from ..contract import MultiStreamModel

Batch = Tuple[Tensor, Tensor]  # tokens [batch, pos], valid [batch, pos] (False = padding)


MIN_WINDOW = 2  # a shorter remainder has nothing to score once position 0 is masked


def _windows(ids: Sequence[int], seq_len: int) -> List[List[int]]:
    """`ids` cut into consecutive windows of `seq_len`; the last may be shorter (>= MIN_WINDOW)."""
    return [list(ids[i : i + seq_len]) for i in range(0, len(ids), seq_len) if len(ids) - i >= MIN_WINDOW]


def _tokenize(model, text: str) -> List[int]:
    if model.tokenizer is None:
        raise ValueError("text input needs a tokenizer, and this model has none; pass token ids")
    return model.tokenizer.encode(text)


def _pad(rows: List[Sequence[int]], pad_id: int) -> Batch:
    seqs = [torch.as_tensor(list(r), dtype=torch.long) for r in rows]
    tokens = pad_sequence(seqs, batch_first=True, padding_value=pad_id)  # [batch, pos]
    lengths = torch.tensor([len(r) for r in seqs])
    return tokens, torch.arange(tokens.shape[1]) < lengths[:, None]


def iter_batches(
    model, source, batch_size: int, seq_len: Optional[int] = None, pad_id: int = 0
) -> Iterator[Batch]:
    """Yield (tokens [batch, pos], valid [batch, pos]) from any supported token source."""
    seq_len = seq_len or model.cfg.n_ctx
    if isinstance(source, Tensor) and source.ndim == 2:
        for chunk in source.long().split(batch_size):
            yield chunk, torch.ones_like(chunk, dtype=torch.bool)
        return
    if isinstance(source, Tensor):
        if source.ndim != 1:
            raise ValueError(f"a token tensor must be [n_seq, pos] or 1-D, got shape {tuple(source.shape)}")
        rows = _windows(source.tolist(), seq_len)
    elif hasattr(source, "column_names"):  # a datasets.Dataset
        if "input_ids" in source.column_names:
            rows = (r["input_ids"] for r in source)
        elif "text" in source.column_names:
            rows = (w for r in source for w in _windows(_tokenize(model, r["text"]), seq_len))
        else:
            raise ValueError(f"dataset needs an 'input_ids' or 'text' column, has {source.column_names}")
    elif isinstance(source, (list, tuple)) and all(isinstance(p, (str, Path)) for p in source):
        missing = [str(p) for p in source if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"token source: not files: {missing[:5]}")
        rows = (w for p in source for w in _windows(_tokenize(model, read_text_file(Path(p))), seq_len))
    else:
        raise TypeError(
            f"unsupported token source {type(source).__name__}: use a token tensor, a "
            f"datasets.Dataset, or a list of text-file paths"
        )
    rows = iter(rows)
    while batch := list(itertools.islice(rows, batch_size)):
        yield _pad(batch, pad_id)


def within_budget(tokens: Tensor, valid: Tensor, budget: int) -> Batch:
    """The batch cut to its first `budget` valid tokens (row-major): rows past the budget are
    dropped, and the valid positions beyond it in the last row kept are masked."""
    counted = valid.flatten().cumsum(0).view_as(valid)  # [batch, pos]
    if int(counted[-1, -1]) <= budget:
        return tokens, valid
    rows = int((counted[:, 0] - valid[:, 0].long() < budget).sum())  # rows that start within it
    tokens, valid, counted = tokens[:rows], valid[:rows], counted[:rows]
    return tokens, valid & (counted <= budget)


def check_exclude_first(exclude_first) -> int:
    """exclude_first masks positions [0, exclude_first): a non-negative int (a negative one would
    slice from the end and mask nearly everything)."""
    if isinstance(exclude_first, bool) or not isinstance(exclude_first, int) or exclude_first < 0:
        raise ValueError(
            f"exclude_first must be a non-negative int (positions masked from the start), "
            f"got {exclude_first!r}"
        )
    return exclude_first


def iter_activations(
    model: "MultiStreamModel",
    source,
    names: Sequence[str],
    *,
    batch_size: int = 8,
    seq_len: Optional[int] = None,
    pad_id: int = 0,
    exclude_first: int = 1,
    max_tokens: Optional[int] = None,
    timer: Optional[PhaseTimer] = None,
) -> Iterator[Tuple[Tensor, Tensor, int, Dict[str, Tensor]]]:
    """The activation-collection loop: per batch of `source` (`iter_batches`), cut to `max_tokens`
    valid tokens in all, yield (tokens [batch, pos] and mask [batch, pos] on the model's device,
    the batch's valid (unpadded) token count, {name: activation} of `sites.forward_sites`; {}
    when `names` is empty: no forward). mask excludes padding and positions [0, exclude_first)."""
    names = list(names)
    if names:
        check_hook_names(names, model.hook_dict)
    stop = last_sublayer_needed(model, names)
    seen = 0
    for tokens, valid in iter_batches(model, source, batch_size, seq_len, pad_id):
        if max_tokens is not None:
            if seen >= max_tokens:
                return
            tokens, valid = within_budget(tokens, valid, max_tokens - seen)
        tokens = tokens.to(model.device)
        mask = position_mask(valid, exclude_first).to(model.device)
        acts: Dict[str, Tensor] = {}
        if names:
            with maybe(timer, "forward (shared by the observational probes)"):
                acts = forward_sites(model, tokens, names, stop)
        n_valid = int(valid.sum())
        seen += n_valid
        yield tokens, mask, n_valid, acts


RUNNER_OPTIONS = (
    "batch_size",
    "seq_len",
    "max_tokens",
    "exclude_first",
    "pad_id",
    "device",
    "dtype",
    "progress",
)


def split_options(options: Dict, allowed: Sequence[str] = RUNNER_OPTIONS) -> Tuple[Dict, Dict]:
    """A one-call wrapper's keywords -> (the runner's options, the probe's): the `RUNNER_OPTIONS`
    (no progress bar unless asked) and the rest. A runner option outside `allowed` is a TypeError."""
    not_here = sorted(k for k in options if k in RUNNER_OPTIONS and k not in allowed)
    if not_here:
        raise TypeError(f"{not_here} do not apply here: the options are {list(allowed)}")
    runner = {"progress": False, **{k: v for k, v in options.items() if k in RUNNER_OPTIONS}}
    return runner, {k: v for k, v in options.items() if k not in RUNNER_OPTIONS}


def run_probes(
    model: "MultiStreamModel",
    probes: Union[Probe, Sequence[Probe]],
    source,
    *,
    batch_size: int = 8,
    seq_len: Optional[int] = None,
    max_tokens: Optional[int] = None,
    exclude_first: int = 1,
    pad_id: int = 0,
    device=None,
    dtype=None,
    progress: bool = True,
    timer: Optional[PhaseTimer] = None,
    on_result: Optional[Callable[[ProbeResult], None]] = None,
) -> Dict[str, ProbeResult]:
    """Run `probes` over `source`; returns {probe.name: result}.

    exclude_first: positions [0, exclude_first) are masked out (BOS / position 0; 0 keeps all).
    max_tokens: run on exactly the first this many (unpadded) tokens: the last batch is cut to it
        (rows past it dropped, the rest of its last row masked). device / dtype: move the model first.
    timer: a `PhaseTimer` charged with the shared forward, each probe's update / interventions
        and each probe's result.
    on_result: called with each result as soon as it is computed, before the next probe's (the
        report queues its figures meanwhile).
    """
    for name, value in (("batch_size", batch_size), ("max_tokens", max_tokens), ("seq_len", seq_len)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    single = isinstance(probes, Probe)
    probes = [probes] if single else list(probes)
    if len({p.name for p in probes}) != len(probes):
        raise ValueError("two probes share a name; give them distinct `name`s")
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    for probe in probes:
        probe.setup(model)
    causal = [p for p in probes if isinstance(p, CausalProbe)]
    observers = [p for p in probes if not isinstance(p, CausalProbe)]
    wanted = {p.name: list(p.hook_names(model)) for p in observers}
    names = sorted({n for ns in wanted.values() for n in ns})
    seen = 0
    bar = tqdm(
        total=min(source.numel(), max_tokens or source.numel()) if isinstance(source, Tensor) else max_tokens,
        unit="tok",
        desc=", ".join(p.name for p in probes),
        disable=not progress,
    )  # a total: an ETA
    with torch.no_grad():
        for tokens, mask, n_tok, acts in iter_activations(
            model,
            source,
            names,
            batch_size=batch_size,
            seq_len=seq_len,
            pad_id=pad_id,
            exclude_first=exclude_first,
            max_tokens=max_tokens,
            timer=timer,
        ):
            for probe in observers:
                with maybe(timer, f"{probe.name}: update"):
                    probe.update({n: acts[n] for n in wanted[probe.name]}, mask)
            acts.clear()  # the shared activations are not kept while probes run their own forwards
            for probe in observers:
                if type(probe).own_runs is not Probe.own_runs:
                    with maybe(timer, f"{probe.name}: own forwards"):
                        probe.own_runs(model, tokens, mask)
            for probe in causal:
                with maybe(timer, f"{probe.name}: interventions"):
                    probe.intervene(model, tokens, mask)
            seen += n_tok
            bar.update(n_tok)
    bar.close()
    if seen == 0:
        raise ValueError("the token source yielded no tokens")
    results = {}
    for p in probes:
        with maybe(timer, f"{p.name}: result"):
            results[p.name] = p.result()
        results[p.name].meta.setdefault("tokens_seen", seen)
        if on_result is not None:
            on_result(results[p.name])
    return results[probes[0].name] if single else results
