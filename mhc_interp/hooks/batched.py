"""Batched stream interventions: many edits in the batch axis of one forward, each run resuming
from the cached state at its first edited sublayer.

An `Edit` is data: at each of its sublayers, at the stream state entering it
(`hook_streams_in`), set the streams in `ablate` to the ablation value, then copy the streams in
`restore` from a source run's state (optionally only at some positions). Patching, ablation and
rescue are all lists of edits:

    ablate {i, j} at sublayer l, one-shot        Edit((l,), ablate=(i, j))
    ... and rescue i (persistent, from l on)     Edit(tuple(range(l, L2)), ablate=(i, j), restore=(i,))
    patch stream s of the source run at l        Edit((l,), restore=(s,))

`run_edits` groups edits by their first sublayer, starts every group from the base run's
cached state there (the unchanged prefix is never recomputed), stacks `k` replicas along the
batch axis (replica-major: rows [r*B, (r+1)*B) are replica r), optionally freezes the mixing to
a cache (which `frozen_mixing` repeats for the replicas), and reduces each replica's logits with
a metric, chunk by chunk, so only one chunk's logits exist at a time.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

Metric = Callable[[Tensor], Tensor]  # logits [k, B, pos, vocab] -> per-replica values [k, B]


@dataclass(frozen=True)
class Edit:
    sublayers: Tuple[int, ...]  # where the edit applies (indices into model.sublayers)
    ablate: Tuple[int, ...] = ()  # streams set to the ablation value
    restore: Tuple[int, ...] = ()  # streams copied from the source states (after ablation)
    positions: Optional[Tuple[int, ...]] = None  # None = every position

    @property
    def start(self) -> int:
        return min(self.sublayers)

    def is_identity(self, source_is_base: bool) -> bool:
        """An edit that changes nothing: no streams touched, or - when the restore source is the
        base run itself - every ablated stream restored."""
        return not (self.ablate or self.restore) or (source_is_base and set(self.ablate) <= set(self.restore))


def validate_edit(edit: Edit, n_sublayers: int, n_streams: int, n_pos: int) -> None:
    bad_sub = [s for s in edit.sublayers if not 0 <= s < n_sublayers]
    if bad_sub or not edit.sublayers:
        raise IndexError(f"sublayer index {bad_sub or 'none'} out of range (0..{n_sublayers - 1})")
    bad = [s for s in (*edit.ablate, *edit.restore) if not 0 <= s < n_streams]
    if bad:
        raise IndexError(f"stream index {bad} out of range: the model has {n_streams} streams")
    badp = [p for p in edit.positions or () if not 0 <= p < n_pos]
    if badp:
        raise IndexError(f"position {badp} out of range for sequences of length {n_pos}")


CPU_TOKENS_PER_FORWARD = 4096


def rows_per_forward(model, batch: int, pos: int, max_rows: Optional[int] = None) -> int:
    """How many batch rows (replicas x prompts) one forward may hold: `max_rows` if given; on
    CUDA from free memory (state copies, MLP activations and float32 logits per row); else
    about 4096 tokens (on a CPU, larger stacks fall out of cache and run slower per token)."""
    if max_rows is not None:
        return max(batch, max_rows)
    if model.device.type != "cuda":
        return max(batch, CPU_TOKENS_PER_FORWARD // max(pos, 1))
    cfg = model.cfg
    width = model.dtype.itemsize
    per_row = pos * (cfg.n_streams * cfg.d_model * width * 8 + cfg.d_mlp * width * 2 + cfg.d_vocab * 4 * 3)
    free = torch.cuda.mem_get_info(model.device)[0]
    return max(batch, int(0.6 * free // per_row))


def _to_device(mask: Tensor, device: torch.device) -> Tensor:
    """A host-built mask on `device`; to a GPU from pinned memory, asynchronously, so building the
    next chunk's hooks does not wait for the GPU to finish the previous chunk."""
    if device.type == "cuda":
        return mask.pin_memory().to(device, non_blocking=True)
    return mask.to(device)


def _edit_hooks(
    model,
    chunk: Sequence[Edit],
    n_pos: int,
    ablation_values: Mapping[int, Tensor],
    source_states: Mapping[int, Tensor],
) -> List[Tuple[str, Callable]]:
    """(name, hook) for `hook_streams_in` of every sublayer where an edit of `chunk` (replica r =
    chunk[r]) applies: each hook applies every replica's edit there."""
    hooks = []
    for sublayer in range(min(e.start for e in chunk), max(max(e.sublayers) for e in chunk) + 1):
        # [ablate/restore, k, pos, n]
        masks = torch.zeros(2, len(chunk), n_pos, model.cfg.n_streams, dtype=torch.bool)
        for r, e in enumerate(chunk):
            if sublayer not in e.sublayers:
                continue
            pos = slice(None) if e.positions is None else list(e.positions)
            for mask, streams in zip(masks, (e.ablate, e.restore)):
                for s in streams:
                    mask[r, pos, s] = True
        if masks.any():
            ablate, restore = _to_device(masks[:, :, None, :, :, None], model.device)  # [k, 1, pos, n, 1]
            hook = partial(
                _apply_edits, ablate, restore, ablation_values.get(sublayer), source_states.get(sublayer)
            )
            hooks.append((f"{model.sublayer_names[sublayer]}.hook_streams_in", hook))
    return hooks


def _apply_edits(
    ablate: Tensor, restore: Tensor, ablation: Optional[Tensor], source: Optional[Tensor], x: Tensor, hook
) -> Tensor:
    """The `hook_streams_in` hook (its masks and values bound by `partial`): the state x [k*B, pos,
    n, d] set to `ablation` where `ablate`, then to `source` where `restore` (masks [k, 1, pos, n,
    1], one per replica of the replica-major rows); on the device the hook fires on."""
    x = x.view(len(ablate), -1, *x.shape[1:])
    if ablation is not None:
        x = torch.where(ablate.to(x.device), ablation.to(x.device, x.dtype), x)
    if source is not None:
        x = torch.where(restore.to(x.device), source.to(x.device, x.dtype), x)
    return x.flatten(0, 1)


def check_edit_inputs(
    edits: Sequence[Edit],
    base_states: Mapping[int, Tensor],
    source_states: Optional[Mapping[int, Tensor]],
    ablation_values: Optional[Mapping[int, Tensor]],
) -> None:
    """Every edit has its start state, and a value wherever it ablates or restores: a missing one
    would silently leave that part of the edit out."""
    for e in edits:
        needs = [("base_states", base_states, [e.start])]
        if set(e.ablate) - set(e.restore):  # a stream ablated and restored needs no value
            needs.append(("ablation_values", ablation_values, e.sublayers))
        if e.restore:
            needs.append(("source_states", source_states, e.sublayers))
        for what, given, sublayers in needs:
            missing = [s for s in sublayers if given is None or s not in given]
            if missing:
                raise ValueError(
                    f"{e} needs {what} at sublayer(s) {missing}, which "
                    f"{'were not given' if given is None else 'it lacks'}"
                )


def run_edits(
    model,
    edits: Sequence[Edit],
    base_states: Mapping[int, Tensor],
    metric: Metric,
    *,
    source_states: Optional[Mapping[int, Tensor]] = None,
    ablation_values: Optional[Mapping[int, Tensor]] = None,
    frozen: Optional[Mapping[str, Tensor]] = None,
    source_is_base: bool = False,
    tokens: Optional[Tensor] = None,
    max_rows: Optional[int] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> Tensor:
    """Run every edit; returns the metric per edit and prompt [n_edits, batch] (float32; float64 for a float64 model).

    base_states[s]: state entering sublayer s in the run being edited [B, pos, n, d] (needed
        for every edit's start sublayer).
    source_states[s]: the states `restore` copies from (e.g. the clean run when rescuing, the
        other run when patching), for every sublayer an edit restores at.
    ablation_values[s]: value the ablated streams get at sublayer s, broadcastable to
        [B, pos, n, d] (zeros, a mean [n, d], ...).
    frozen: a cache with every sublayer's H_pre/H_post/H_res (batch B) to freeze the mixing to.
    source_is_base: the restore source is the base run itself (rescue), so an edit restoring
        every stream it ablates is the identity.
    tokens: the base run's token ids [B, pos], passed to every resumed forward (a model whose
        layers route by token id, e.g. a hash-routed MoE, needs them).
    Identity edits are not run: their metric is the metric of the unedited base run, computed
    once. Duplicate edits are run once.
    """
    cfg = model.cfg
    batch, n_pos = next(iter(base_states.values())).shape[:2]
    unique = dict.fromkeys(edits)  # each distinct edit once, in order
    for e in unique:
        validate_edit(e, cfg.n_sublayers, cfg.n_streams, n_pos)
    identity = {e for e in unique if e.is_identity(source_is_base)}
    to_run = [e for e in unique if e not in identity]
    check_edit_inputs(to_run, base_states, source_states, ablation_values)
    groups: Dict[int, List[Edit]] = defaultdict(list)
    for e in to_run:
        groups[e.start].append(e)
    k_max = max(1, rows_per_forward(model, batch, n_pos, max_rows) // batch)
    # the model's own method: a model may freeze more than its sublayers (e.g. an HF hc_head)
    freeze = model.frozen_mixing(frozen) if frozen is not None else contextlib.nullcontext()
    values: Dict[Edit, Tensor] = {}
    with torch.no_grad(), freeze:
        if identity:  # the unedited base run, once
            s0 = min(base_states)
            base = metric(_run_chunk(model, base_states[s0], s0, 1, [], tokens).unsqueeze(0))[0]
            values = dict.fromkeys(identity, base)
        for start, todo in sorted(groups.items()):
            for c in range(0, len(todo), k_max):
                chunk = todo[c : c + k_max]
                hooks = _edit_hooks(model, chunk, n_pos, ablation_values or {}, source_states or {})
                logits = _run_chunk(model, base_states[start], start, len(chunk), hooks, tokens)
                out = metric(logits.view(len(chunk), batch, *logits.shape[1:]))
                values.update(zip(chunk, out))
                if progress is not None:
                    progress(len(chunk))
    out = torch.stack([values[e] for e in edits])  # [n_edits, batch]
    return out.to(torch.promote_types(out.dtype, torch.float32))  # a float64 model's scores stay float64


def _run_chunk(model, state: Tensor, start: int, k: int, hooks, tokens: Optional[Tensor]) -> Tensor:
    """Logits [k*B, pos, vocab] of `k` replicas of `state` [B, pos, n, d] resumed at sublayer
    `start`; `tokens` [B, pos] (or None) are repeated the same way."""
    x = state.repeat(k, 1, 1, 1) if k > 1 else state
    ids = None if tokens is None else tokens.repeat(k, 1)
    with model.hooks(fwd_hooks=hooks):
        return model(x, start_at_sublayer=start, tokens=ids)
