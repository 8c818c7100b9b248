"""Exact mixer patching: the oracle that mixer attribution estimates.

For sublayer l and one coefficient tensor C in (H_pre, H_post, H_res), run the base run with C at
sublayer l replaced by the source run's C (every position), all other coefficients recomputed
(mixing="recomputed") or frozen to the base run's (mixing="frozen"), and score it with the
patching metric. Mixer attribution estimates this as M_base + sum (C* - C) . dM/dC.
Cost: 3 x (number of sublayers) resumed forwards per prompt batch.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..causal import clean_run
from ..patching import ActivationPatching
from .core import mixing_context

PARTS = ("h_pre", "h_post", "h_res")  # the coefficient tensors, as mixer attribution orders them


def exact_mixer_patching(
    model,
    clean: Tensor,
    corrupted: Tensor,
    *,
    mixing: str = "recomputed",
    direction: str = "denoise",
    metric: str = "kl",
    answers: Optional[Tensor] = None,
    temperature: float = 1.0,
    sublayers: Optional[Sequence[int]] = None,
    mask: Optional[Tensor] = None,
) -> np.ndarray:
    """Per-prompt metric with one coefficient tensor patched: [sublayer, 3 (h_pre, h_post, h_res), B]
    (float64), for one batch of aligned prompts [B, pos]; the metric and its checks are
    `ActivationPatching`'s (mixing "recomputed" or "frozen")."""
    if mixing not in ("recomputed", "frozen"):
        raise ValueError(f"mixing must be 'recomputed' or 'frozen', got {mixing!r}")
    spec = ActivationPatching(
        direction=direction,
        mixing=mixing,
        metric=metric,
        answers=answers,
        temperature=temperature,
        sublayers=sublayers,
    )
    spec.setup(model)
    clean, corrupted = clean.to(model.device), corrupted.to(model.device)
    mask, rows = spec._scored(model, clean, corrupted, mask)
    b = clean.shape[0]
    clean_logits, clean_states, clean_cache = clean_run(model, clean)
    _, corr_states, corr_cache = clean_run(model, corrupted)
    base_tokens, base_states, base_cache, source_cache = (
        (corrupted, corr_states, corr_cache, clean_cache)
        if direction == "denoise"
        else (clean, clean_states, clean_cache, corr_cache)
    )
    score = spec._metric(clean_logits, mask, rows)
    out = torch.empty(len(spec.layers), len(PARTS), b, dtype=torch.float64)
    with torch.no_grad(), mixing_context(model, base_cache if mixing == "frozen" else None):
        for i, l in enumerate(spec.layers):
            name = model.sublayer_names[l]
            for j, part in enumerate(PARTS):
                hook_name = f"{name}.hook_{part}"

                def replace(h, hook, value=source_cache[hook_name]):
                    return value.to(h.device, h.dtype).clone()

                with model.hooks(fwd_hooks=[(hook_name, replace)]):
                    logits = model(base_states[l], start_at_sublayer=l, tokens=base_tokens)
                out[i, j] = score(logits[None])[0].double().cpu()
    return out.numpy()
