"""Causal sweeps split over processes with torch.distributed, merged into the single-process result.

The rescue matrix and the patching sweep are independent per sublayer, so the sweep is split by
sublayer: rank r of W runs the probe on sublayers[r::W] (round robin, which also balances the
persistent mode, whose early sublayers cost more) over the *same* prompts, and the per-sublayer
arrays are gathered (`all_gather_object`) and merged in sublayer order; the global rescue
matrices are recomputed from the merged per-sublayer ones exactly as `AblateRescue.result` does.
Every rank returns the merged result. No scheduler of our own: the processes and the process
group come from the launcher.

    # torchrun --nproc_per_node 4 sweep.py      (or: accelerate launch --num_processes 4 sweep.py)
    import torch, torch.distributed as dist
    from mhc_interp.adapters import HookedHFMHC
    from mhc_interp.probes.distributed import distributed_ablate_and_rescue
    dist.init_process_group("nccl")                      # "gloo" on CPU
    rank = dist.get_rank(); torch.cuda.set_device(rank % torch.cuda.device_count())
    model = HookedHFMHC.from_pretrained(path, device_map={"": torch.cuda.current_device()})
    result = distributed_ablate_and_rescue(model, tokens, mode="one_shot")
    if rank == 0:
        result.save("rescue")

Each process holds its own copy of the model (or, with `device_map`, its own shard group of GPUs:
e.g. 8 GPUs, 2 processes, device_map="auto" with max_memory limited to the process's 4 GPUs).
Without an initialised process group the functions run the whole sweep in-process. Results
agree with the single-process run to float rounding (batch composition differs), not bit for bit.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .base import ProbeResult
from .causal import CausalProbe
from .patching import activation_patching
from .rescue import ablate_and_rescue, global_rescue

__all__ = [
    "split_sublayers",
    "merge_sublayer_results",
    "distributed_ablate_and_rescue",
    "distributed_activation_patching",
]

# arrays that are not per sublayer (everything else has the sublayer as axis 0)
_GLOBAL_KEYS = {
    "ablate_rescue": ("global_rescue", "global_rescue_weighted"),
    "activation_patching": ("baseline_clean", "baseline_corrupted"),
}


def split_sublayers(sublayers: Sequence[int], rank: int, world_size: int) -> List[int]:
    """The sublayers rank `rank` of `world_size` runs: round robin."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    return list(sublayers)[rank::world_size]


def _rank_world(group=None) -> Tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def merge_sublayer_results(
    parts: Sequence[Tuple[Sequence[int], ProbeResult]], sublayers: Sequence[int]
) -> ProbeResult:
    """Merge results of one sweep run on disjoint sublayer subsets into the result over
    `sublayers` (in that order). parts: (the sublayers a part ran, its result) per part."""
    parts = [(list(ls), r) for ls, r in parts if r is not None and len(ls)]
    if not parts:
        raise ValueError("no partial results to merge")
    first = parts[0][1]
    probe = first.probe
    if probe not in _GLOBAL_KEYS:
        raise ValueError(f"merging is defined for {sorted(_GLOBAL_KEYS)} results, got {probe!r}")
    if any(r.probe != probe for _, r in parts):
        raise ValueError(f"cannot merge results of different probes: {[r.probe for _, r in parts]}")
    where: Dict[int, Tuple[ProbeResult, int]] = {}  # sublayer -> (the part's result, its index there)
    for ls, r in parts:
        for i, l in enumerate(ls):
            if l in where:
                raise ValueError(f"sublayer {l} appears in two partial results")
            where[l] = (r, i)
    missing = [l for l in sublayers if l not in where]
    if missing:
        raise ValueError(f"no partial result covers sublayers {missing}")
    prompts = {r.meta.get("prompts") for _, r in parts}
    if len(prompts) > 1:
        raise ValueError(
            f"the partial results saw different numbers of prompts {sorted(prompts)}: "
            f"every rank must run the same prompts"
        )
    picked = [where[l] for l in sublayers]
    arrays = {
        key: value if key in _GLOBAL_KEYS[probe] else np.stack([r.arrays[key][i] for r, i in picked])
        for key, value in first.arrays.items()
    }
    names = [r.meta["sublayers"][i] for r, i in picked]
    if probe == "ablate_rescue":
        arrays.update(
            global_rescue(arrays["rescue"], arrays["kl_ablated"], arrays["kl_rescued"], arrays["low_damage"])
        )
    meta = dict(first.meta, sublayers=names)
    return type(first)(probe, arrays, meta)


def _gather(payload: Any, world: int, group=None) -> List[Any]:
    import torch.distributed as dist

    if world == 1:
        return [payload]
    out: List[Any] = [None] * world
    dist.all_gather_object(out, payload, group=group)
    return out


def _token_signature(*tensors: Tensor) -> tuple:
    flat = [torch.as_tensor(t).detach().cpu().long() for t in tensors]
    return tuple(
        (tuple(t.shape), int(t.sum()), int((t.flatten() * torch.arange(t.numel())).sum())) for t in flat
    )


def _sweep(model, run, sublayers, group, signature) -> ProbeResult:
    rank, world = _rank_world(group)
    layers = CausalProbe.sublayer_indices(model, None if sublayers is None else [int(s) for s in sublayers])
    mine = split_sublayers(layers, rank, world)
    try:
        part = run(mine) if mine else None
        payload = ("ok", signature, mine, part)
    except Exception as exc:  # report on every rank instead of leaving the others in a collective
        payload = ("error", signature, mine, f"{type(exc).__name__}: {exc}")
    gathered = _gather(payload, world, group)
    errors = [f"rank {r}: {p[3]}" for r, p in enumerate(gathered) if p[0] == "error"]
    if errors:
        raise RuntimeError("distributed sweep failed on " + "; ".join(errors))
    if len({p[1] for p in gathered}) > 1:
        raise ValueError("the ranks were given different prompts: every rank must pass the same tokens")
    return merge_sublayer_results([(p[2], p[3]) for p in gathered], layers)


def distributed_ablate_and_rescue(
    model,
    tokens: Tensor,
    *,
    sublayers: Optional[Sequence[int]] = None,
    group=None,
    **kwargs,
) -> ProbeResult:
    """`ablate_and_rescue(model, tokens, **kwargs)` with the sublayers split over the ranks of
    `group` (the default process group); every rank gets the merged `RescueResult`."""

    def run(mine):
        return ablate_and_rescue(model, tokens, sublayers=mine, **kwargs)

    return _sweep(model, run, sublayers, group, _token_signature(tokens))


def distributed_activation_patching(
    model,
    clean: Tensor,
    corrupted: Tensor,
    *,
    sublayers: Optional[Sequence[int]] = None,
    group=None,
    **kwargs,
) -> ProbeResult:
    """`activation_patching(model, clean, corrupted, **kwargs)` split over the ranks by sublayer."""

    def run(mine):
        return activation_patching(model, clean, corrupted, sublayers=mine, **kwargs)

    return _sweep(model, run, sublayers, group, _token_signature(clean, corrupted))
