"""Frozen mixing: run with every sublayer's (H_pre, H_post, H_res) taken from a cache instead of
computed from the (possibly intervened) stream state.

This is the path-specific intervention of "Ablate and Rescue": with all coefficients frozen to
a clean run, the residual path is linear in the stream state and an ablation's effect cannot be
re-routed by the mixers. It does not freeze attention patterns or LayerNorm scales inside the
branches. Freezing lives in one place, `HyperConnectedSublayer.coefficients`; this module only
fills and clears its `frozen` slot, exception-safely.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping, Optional, Union

from torch import Tensor

from ..contract import MixingCoefficients
from .names import MIXING_SUFFIXES

if TYPE_CHECKING:
    from .root import StreamHookedRoot


def is_mixing_hook(name: str) -> bool:
    """names_filter selecting exactly the hooks a frozen run needs."""
    return name.endswith(MIXING_SUFFIXES)


def _select_sublayers(model: StreamHookedRoot, sublayers: Optional[Iterable[Union[int, str]]]):
    subs = model.sublayers
    if sublayers is None:
        return subs
    by_name = {s.name: s for s in subs}
    chosen = []
    for key in sublayers:
        if isinstance(key, int):
            if not 0 <= key < len(subs):
                raise IndexError(f"sublayer index {key} out of range (0..{len(subs) - 1})")
            chosen.append(subs[key])
        elif key in by_name:
            chosen.append(by_name[key])
        else:
            raise KeyError(f"unknown sublayer {key!r}; sublayers are named like {subs[0].name!r}")
    return chosen


@contextmanager
def frozen_mixing(
    model: StreamHookedRoot,
    source: Mapping[str, Tensor],
    sublayers: Optional[Iterable[Union[int, str]]] = None,
) -> Iterator[None]:
    """Inside the context, the chosen sublayers (all by default; or indices 0..2L-1 / names like
    "blocks.3.mlp") use the coefficients cached in `source` under
    `{sublayer}.hook_h_pre|hook_h_post|hook_h_res` (e.g. from
    `model.run_with_cache(tokens, names_filter=is_mixing_hook)`).

    A run of batch k*B may use a cache of batch B: the cache is repeated for each replica.
    """
    chosen = _select_sublayers(model, sublayers)
    frozen = {}
    for sub in chosen:
        missing = [f"{sub.name}.{s}" for s in MIXING_SUFFIXES if f"{sub.name}.{s}" not in source]
        if missing:
            raise KeyError(f"cannot freeze {sub.name}: the cache lacks {missing}")
        frozen[sub] = MixingCoefficients(
            *(source[f"{sub.name}.{s}"].to(model.device) for s in MIXING_SUFFIXES)
        )
    previous = {sub: sub.frozen for sub in chosen}
    try:
        for sub, coeffs in frozen.items():
            sub.frozen = coeffs
        yield
    finally:
        for sub, prev in previous.items():
            sub.frozen = prev
