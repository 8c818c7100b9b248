"""Per-stream addressing: read or replace stream `s` of any stream-valued hook without slicing
by hand. Stream-valued hooks (`names.STREAM_VALUED`) carry the stream axis at dim 2:
[batch, pos, n_streams, d_model] states and [batch, pos, n_streams] read/write weights."""

from __future__ import annotations

from typing import Any, Callable, List, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..contract import MultiStreamModel
from .names import STREAM_VALUED, check_hook_names, suffix

Streams = Union[int, Sequence[int]]


def check_streams(model: MultiStreamModel, name: str, streams: Streams) -> List[int]:
    """Validate a hook name as stream-valued and the stream indices as in range."""
    check_hook_names([name], model.hook_dict)
    if suffix(name) not in STREAM_VALUED:
        raise ValueError(
            f"{name!r} has no stream axis; per-stream addressing works on hooks ending in "
            f"{', '.join(STREAM_VALUED)}"
        )
    idx = [streams] if isinstance(streams, int) else list(streams)
    n = model.cfg.n_streams
    bad = [s for s in idx if not isinstance(s, int) or not 0 <= s < n]
    if bad or not idx:
        raise IndexError(f"stream index {bad or idx} out of range: the model has {n} streams (0..{n - 1})")
    return idx


def select_streams(act: Tensor, streams: List[int]) -> Tensor:
    """act[:, :, streams] (a single int keeps no stream axis)."""
    return act[:, :, streams[0]] if len(streams) == 1 else act[:, :, streams]


def stream_hook(model: MultiStreamModel, name: str, streams: Streams, value: Any) -> Tuple[str, Callable]:
    """A `(name, hook)` pair for `run_with_hooks` / `hooks()` that replaces the given stream(s).

    value: a number (e.g. 0.0 for zero ablation), a tensor broadcastable to the selected
    streams' slice (e.g. [d_model], [pos, d_model], [batch, pos, d_model] or a cached
    [batch, pos, n_sel, d_model]), or a callable `f(slice, hook) -> new slice`.
    The activation is cloned before editing, so cached or shared tensors are never mutated.
    """
    idx = check_streams(model, name, streams)

    def hook(act: Tensor, hook) -> Tensor:
        act = act.clone()
        selected = select_streams(act, idx)  # [batch, pos, (n_sel,) ...]
        new = value(selected, hook) if callable(value) else value
        new = torch.as_tensor(new, dtype=act.dtype, device=act.device)
        if len(idx) == 1:
            act[:, :, idx[0]] = new
        else:
            # a value without a stream axis ([pos, d_model], [batch, pos, d_model], ...) is the same
            # for every selected stream: put the stream axis where it belongs, after its pos axis
            trailing = selected.ndim - 3  # axes after [batch, pos, n_sel]
            at = new.ndim - trailing
            if new.ndim < selected.ndim and at >= 1:
                new = new.unsqueeze(at)
            act[:, :, idx] = torch.broadcast_to(new, selected.shape)
        return act

    return name, hook
