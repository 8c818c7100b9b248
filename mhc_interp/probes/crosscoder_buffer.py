"""Activation sources for crosscoder training: (layer, stream) sites and a shuffled, refilled buffer.

A site is a (hook name, stream) pair (`sites.py`); a crosscoder reads and writes S sites at once,
so one training row is a tensor [S, d_model] per token and a batch is [batch, S, d_model].

Two sources share one small interface (`ActivationSource`: `sites`, `n_sites`, `d_model`,
`capacity`, `next_batch(n)`, `peek(n)`):

* `ActivationBuffer(model, tokens, sites)`: collects the sites over a token source through
  `runner.iter_activations` (any source `iter_batches` takes; position 0 (BOS) and padding
  dropped) and stores the rows in bfloat16 in a buffer of `buffer_tokens` rows. Batches are drawn from a random permutation of the buffer; when fewer than
  `refill_fraction * buffer_tokens` unread rows are left (or fewer than a batch), the unread rows
  are kept, the rest is refilled from the model, and the whole buffer is shuffled again, so
  documents are mixed and training on many millions of tokens never holds them all
  (memory: buffer_tokens * S * d_model * 2 bytes). The token source is cycled (`loop=True`) or
  exhausted once (`loop=False`, then `next_batch` raises `StopIteration`).
* `InMemoryActivations(x)`: a tensor [N, S, d] (or [N, n_layers, n_streams, d]) already in
  memory - synthetic data, or activations computed elsewhere - served in shuffled epochs.

The mixing itself is `ShuffleBuffer` (rows pushed in arrival order, unread rows shuffled, batches
read from the front), shared with the CKA probe, which draws its minibatches from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, List, Optional, Sequence

import torch
from torch import Tensor

from .base import masked_rows
from .runner import check_exclude_first, iter_activations
from .sites import Site, SiteSpec, resolve_sites, site_rows

if TYPE_CHECKING:
    from ..contract import MultiStreamModel

__all__ = [
    "Site",
    "resolve_sites",
    "default_sites",
    "grid_sites",
    "ShuffleBuffer",
    "ActivationSource",
    "ActivationBuffer",
    "InMemoryActivations",
]

DEFAULT_LAYERS = 4  # the buffer's default sites: every stream of 4 evenly spaced block outputs


def default_sites(model: "MultiStreamModel", max_layers: int = DEFAULT_LAYERS) -> List[Site]:
    """Every stream at `max_layers` evenly spaced block outputs (`sites.resolve_sites(model, k)`)."""
    return resolve_sites(model, max_layers)


def grid_sites(n_layers: int, n_streams: int, prefix: str = "layer") -> List[Site]:
    """[(f"{prefix}{l}", s) for l, s]: layer-major labels for activations not taken from a model."""
    return [(f"{prefix}{l}", s) for l in range(n_layers) for s in range(n_streams)]


# ------------------------------------------------------------------------------ the mixing
class ShuffleBuffer:
    """A bounded buffer that mixes rows from many sequences: rows come in in arrival order
    (`put`), the unread ones are shuffled (`shuffle`) and read from the front (`take`, `peek`).

    Storage: `capacity` rows of one shape, [capacity, *row_shape] in `dtype` on `device` (by
    default those of the first rows put), allocated on the first `put`; it never grows. The rows
    themselves never move: `order` lists the slots of the unread rows in reading order, `put`
    writes into free slots and appends them to it, `shuffle` permutes it (a seeded CPU
    generator: deterministic given the seed and the calls), `take` / `take_slots` consume it
    from the front. So no call copies more than the rows it is given or returns.
    """

    def __init__(self, capacity: int, seed: int = 0, dtype: Optional[torch.dtype] = None, device=None):
        if int(capacity) < 1:
            raise ValueError(f"a shuffle buffer needs capacity >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.dtype, self.device = dtype, device
        self.storage: Optional[Tensor] = None  # [capacity, *row_shape]
        self._slots = torch.zeros(self.capacity, dtype=torch.long)  # [:unread]: reading order
        self.unread = 0
        self._gen = torch.Generator().manual_seed(seed)

    @property
    def order(self) -> Tensor:
        """The slots of the unread rows [unread], in reading order."""
        return self._slots[: self.unread]

    def put(self, rows: Tensor) -> int:
        """Store up to `capacity - unread` of rows [k, *row_shape]; returns how many were taken."""
        if self.storage is None:
            self.storage = torch.empty(
                self.capacity,
                *rows.shape[1:],
                dtype=self.dtype or rows.dtype,
                device=self.device or rows.device,
            )
        elif rows.shape[1:] != self.storage.shape[1:]:
            raise ValueError(
                f"rows of shape {tuple(rows.shape[1:])} do not fit a buffer of rows "
                f"{tuple(self.storage.shape[1:])}"
            )
        take = min(len(rows), self.capacity - self.unread)
        free = torch.ones(self.capacity, dtype=torch.bool)
        free[self.order] = False
        slots = free.nonzero()[:take, 0]  # [take]
        self.storage.index_copy_(0, slots.to(self.storage.device), rows[:take].to(self.storage))
        self._slots[self.unread : self.unread + take] = slots
        self.unread += take
        return take

    def shuffle(self) -> None:
        """Permute the unread rows (seeded)."""
        self._slots[: self.unread] = self.order[torch.randperm(self.unread, generator=self._gen)]

    def take_slots(self, k: int) -> Tensor:
        """The slots of the next min(k, unread) unread rows, marked read (valid until the next `put`)."""
        k = min(int(k), self.unread)
        out = self._slots[:k].clone()
        self._slots[: self.unread - k] = self._slots[k : self.unread].clone()
        self.unread -= k
        return out

    def rows(self, slots: Tensor) -> Tensor:
        """A copy of the rows at `slots` [k] -> [k, *row_shape]."""
        if self.storage is None:
            raise ValueError("the shuffle buffer is empty (nothing was put)")
        return self.storage[slots.to(self.storage.device)]

    def take(self, k: int) -> Tensor:
        """A copy of the next min(k, unread) unread rows, marked read."""
        return self.rows(self.take_slots(k))

    def peek(self, k: int) -> Tensor:
        """A copy of the next min(k, unread) unread rows, left unread."""
        return self.rows(self.order[: int(k)])


# ----------------------------------------------------------------------------------- sources
class ActivationSource:
    """Interface of what `train_crosscoder` / `analyze_crosscoder` read from."""

    sites: List[Site]
    d_model: int
    capacity: int  # rows that can be held at once (a batch may not be larger)

    @property
    def n_sites(self) -> int:
        return len(self.sites)

    def next_batch(self, n: int) -> Tensor:  # pragma: no cover - abstract
        """The next `n` shuffled rows [n, n_sites, d_model] as float32."""
        raise NotImplementedError

    def peek(self, n: int) -> Tensor:  # pragma: no cover - abstract
        """Up to `n` random rows [<=n, n_sites, d_model] float32 without consuming them (for
        normalisation factors and the decoder-bias init)."""
        raise NotImplementedError

    def check_fits(self, n_sites: int, d_model: int) -> None:
        """Refuse a crosscoder of another shape (n_sites x d_model) than this data."""
        if (self.n_sites, self.d_model) != (n_sites, d_model):
            raise ValueError(
                f"the data has {self.n_sites} sites x d_model {self.d_model}, the crosscoder "
                f"{n_sites} x {d_model}"
            )

    def check_batch_size(self, n: int) -> None:
        if n > self.capacity:
            raise ValueError(
                f"the activation buffer holds {self.capacity} tokens, which is smaller than one "
                f"training batch of {n}; raise buffer_tokens (or lower the batch size)"
            )


class InMemoryActivations(ActivationSource):
    """Activations already in memory, x [N, S, d] (with `sites`) or [N, n_layers, n_streams, d]
    (sites = `grid_sites(n_layers, n_streams)`), served in shuffled epochs (no row is repeated
    within an epoch; a batch may straddle two epochs)."""

    def __init__(self, x: Tensor, sites: Optional[Sequence[Site]] = None, seed: int = 0):
        x = torch.as_tensor(x)
        if x.ndim == 4:
            if sites is not None:
                raise ValueError(
                    "activations [N, n_layers, n_streams, d] name their own sites; "
                    "pass [N, S, d] to give `sites`"
                )
            sites = grid_sites(x.shape[1], x.shape[2])
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        if x.ndim != 3:
            raise ValueError(
                f"activations must be [N, n_sites, d_model] or "
                f"[N, n_layers, n_streams, d_model], got {tuple(x.shape)}"
            )
        self.sites = [
            (str(h), int(s)) for h, s in (grid_sites(x.shape[1], 1, "site") if sites is None else sites)
        ]
        if len(self.sites) != x.shape[1]:
            raise ValueError(f"{len(self.sites)} sites for activations with {x.shape[1]} sites")
        if x.shape[0] == 0:
            raise ValueError("no activations (N = 0)")
        self.x = x
        self.d_model = int(x.shape[-1])
        self.capacity = int(x.shape[0])
        self.tokens_served = 0
        self._gen = torch.Generator().manual_seed(seed)
        self._perm = torch.randperm(self.capacity, generator=self._gen)
        self._pos = 0

    def next_batch(self, n: int) -> Tensor:
        self.check_batch_size(n)
        idx = self._perm[self._pos : self._pos + n]
        self._pos += len(idx)
        if len(idx) < n:  # the epoch ends: the rest of the batch from a new permutation
            self._perm = torch.randperm(self.capacity, generator=self._gen)
            self._pos = n - len(idx)
            idx = torch.cat([idx, self._perm[: self._pos]])
        self.tokens_served += n
        return self.x[idx.to(self.x.device)].float()

    def peek(self, n: int) -> Tensor:
        g = torch.Generator().manual_seed(1234)
        idx = torch.randperm(self.capacity, generator=g)[:n].to(self.x.device)
        return self.x[idx].float()


class ActivationBuffer(ActivationSource):
    """A shuffled, refilled bfloat16 buffer of site activations computed from `model` over a
    token `source` (see the module docstring).

    sites: a site spec (`sites.py`; lists may hold (hook name, stream) pairs); None = every stream
        at 4 evenly spaced block outputs.
    buffer_tokens: rows held at once. model_batch_size / seq_len / pad_id: how the token source
        is cut into forward batches (`iter_batches`). exclude_first: positions [0, exclude_first)
        are dropped (BOS; 0 keeps all); padding is always dropped.
    storage_dtype: bfloat16 by default (halves memory; batches come back as float32).
    device: where the buffer lives (default: the model's device).
    refill_fraction: refill once fewer than this fraction of the rows are unread.
    loop: cycle the token source (else `next_batch` raises StopIteration when it is used up).
    batch_size: optional training batch size, checked against `buffer_tokens` right away.
    Counters: `tokens_read` (rows taken from the model), `tokens_served`, `passes` (completed
    passes over the source), `refills`.
    """

    def __init__(
        self,
        model: "MultiStreamModel",
        source,
        sites: SiteSpec = None,
        *,
        buffer_tokens: int = 65536,
        model_batch_size: int = 8,
        seq_len: Optional[int] = None,
        exclude_first: int = 1,
        pad_id: int = 0,
        storage_dtype: torch.dtype = torch.bfloat16,
        device=None,
        refill_fraction: float = 0.5,
        loop: bool = True,
        seed: int = 0,
        batch_size: Optional[int] = None,
    ):
        if int(buffer_tokens) < 1:
            raise ValueError(f"buffer_tokens must be >= 1, got {buffer_tokens}")
        if not 0.0 <= refill_fraction <= 1.0:
            raise ValueError(f"refill_fraction must lie in [0, 1], got {refill_fraction}")
        if int(model_batch_size) < 1:
            raise ValueError(f"model_batch_size must be >= 1, got {model_batch_size}")
        self.model = model
        self.source = source
        self.sites = resolve_sites(model, DEFAULT_LAYERS if sites is None else sites)
        self.d_model = int(model.cfg.d_model)
        self.capacity = int(buffer_tokens)
        if batch_size is not None:
            self.check_batch_size(int(batch_size))
        self.forward_batches = dict(  # how `iter_activations` cuts the token source
            batch_size=int(model_batch_size),
            seq_len=seq_len,
            pad_id=pad_id,
            exclude_first=check_exclude_first(exclude_first),
        )
        self.refill_fraction = float(refill_fraction)
        self.loop = bool(loop)
        self.device = torch.device(device) if device is not None else model.device
        self.storage_dtype = storage_dtype
        self.hook_names: List[str] = list(dict.fromkeys(h for h, _ in self.sites))  # in first-use order
        self.buffer = ShuffleBuffer(self.capacity, seed=seed, dtype=storage_dtype, device=self.device)
        self._pending: Optional[Tensor] = None  # rows of the last model batch that did not fit
        self._exhausted = False
        self._rows: Optional[Iterator[Tensor]] = None
        self.tokens_read = 0
        self.tokens_served = 0
        self.passes = 0
        self.refills = 0

    # ----------------------------------------------------------------------------- the model
    def _model_rows(self) -> Iterator[Tensor]:
        """Yield [T, S, d] (storage dtype, buffer device) per forward batch, cycling if `loop`."""
        while True:
            got = 0
            for _, mask, _, acts in iter_activations(
                self.model, self.source, self.hook_names, **self.forward_batches
            ):
                rows = masked_rows(mask)
                if len(rows) == 0:
                    continue
                x = site_rows(acts, self.sites, rows)  # [T, S, d]
                got += x.shape[0]
                yield x.to(self.device, self.storage_dtype)
            if got == 0:
                raise ValueError(
                    "the token source yielded no tokens (after dropping the first "
                    f"{self.forward_batches['exclude_first']} position(s) and padding)"
                )
            self.passes += 1
            if not self.loop:
                return

    # ---------------------------------------------------------------------------- the buffer
    def _refill(self) -> None:
        """Keep the unread rows, fill the rest of the buffer from the model, shuffle it all."""
        buf = self.buffer
        if self._rows is None:
            self._rows = self._model_rows()
        while buf.unread < self.capacity and not self._exhausted:
            if self._pending is None or len(self._pending) == 0:
                try:
                    self._pending = next(self._rows)
                except StopIteration:
                    self._exhausted = True
                    break
                self.tokens_read += len(self._pending)
            self._pending = self._pending[buf.put(self._pending) :]
        buf.shuffle()
        self.refills += 1

    def _needs_refill(self, n: int) -> bool:
        unread = self.buffer.unread
        return self._rows is None or (
            not self._exhausted and (unread < n or unread < self.refill_fraction * self.capacity)
        )

    def next_batch(self, n: int) -> Tensor:
        self.check_batch_size(n)
        if self._needs_refill(n):
            self._refill()
        if self.buffer.unread == 0:
            raise StopIteration("the activation buffer is used up (loop=False)")
        out = self.buffer.take(n).float()  # the last batch of a single pass may be partial
        self.tokens_served += len(out)
        return out

    def peek(self, n: int) -> Tensor:
        """Up to n unread rows, not consumed (the buffer is refilled first if fewer are unread)."""
        if self._needs_refill(n):
            self._refill()
        return self.buffer.peek(n).float()

    @property
    def memory_bytes(self) -> int:
        return self.capacity * self.n_sites * self.d_model * self.storage_dtype.itemsize

    def __repr__(self) -> str:
        return (
            f"ActivationBuffer({self.n_sites} sites x d_model {self.d_model}, "
            f"{self.capacity} tokens = {self.memory_bytes / 2**20:.1f} MiB "
            f"{str(self.storage_dtype).replace('torch.', '')}, read {self.tokens_read}, "
            f"served {self.tokens_served}, passes {self.passes})"
        )
