"""What causal probes share: the contract (they run their own interventions per batch instead of
reading cached activations), the metrics they score logits with, and an online mean / s.e.m.
over prompts.

A causal probe implements `intervene(model, tokens, mask)` (one batch) and `result()`; the
runner (`run_probes`) hands it every batch of the token source.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from ..contract import MultiStreamModel
from ..hooks.freeze import is_mixing_hook
from .base import Probe


class CausalProbe(Probe):
    """Base class of probes that intervene: `intervene(model, tokens [B, pos], mask [B, pos])`."""

    def hook_names(self, model: MultiStreamModel) -> List[str]:
        return []

    def update(self, acts, mask) -> None:  # pragma: no cover - causal probes use intervene
        raise TypeError(f"{self.name} is a causal probe: the runner calls intervene(), not update()")

    def intervene(self, model: MultiStreamModel, tokens: Tensor, mask: Tensor) -> None:  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def sublayer_indices(model: MultiStreamModel, sublayers: Optional[Sequence[int]]) -> List[int]:
        """The sublayers a sweep covers: all (None) or the given indices, checked against the model."""
        n_sub = model.cfg.n_sublayers
        chosen = list(range(n_sub)) if sublayers is None else list(sublayers)
        bad = [s for s in chosen if not 0 <= s < n_sub]
        if bad:
            raise IndexError(f"sublayer {bad} out of range: the model has {n_sub} sublayers (0..{n_sub - 1})")
        return chosen


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the metrics score in: float64 for a float64 model (verification to ~1e-12),
    float32 otherwise (bf16 / fp16 / fp32 logits are upcast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / T) over the vocabulary, in `score_dtype(logits.dtype)`."""
    return F.log_softmax(logits.to(score_dtype(logits.dtype)) / temperature, dim=-1)


def kl_metric(reference_logits: Tensor, mask: Tensor, temperature: float = 1.0):
    """Metric: sum_pos w_pos KL(P_ref || P)_pos, w = mask / sum(mask) (the mean over masked
    positions), per replica and prompt, in `score_dtype` of the reference logits.

    reference_logits [B, pos, vocab]; mask [B, pos]; returns f(logits [k, B, pos, vocab]) -> [k, B].
    A prompt with no masked-in position scores NaN (not 0), and `PromptStats` leaves it out.
    """
    ref_lp = log_probs(reference_logits, temperature)  # [B, pos, vocab]
    ref_p = ref_lp.exp()
    m = mask.to(ref_lp.device, ref_lp.dtype)
    weights = m / m.sum(-1, keepdim=True)  # [B, pos]; 0/0 = NaN: nothing to score

    def metric(logits: Tensor) -> Tensor:
        kl = (ref_p * (ref_lp - log_probs(logits, temperature))).sum(-1)  # [k, B, pos]
        return (kl * weights).sum(-1)

    return metric


def logit_diff_metric(answers: Tensor, position: int = -1):
    """Metric: logit[correct] - logit[wrong] at `position`; answers [B, 2] (correct, wrong)."""

    def metric(logits: Tensor) -> Tensor:  # [k, B, pos, vocab]
        last = logits[:, :, position].to(score_dtype(logits.dtype))  # [k, B, vocab]
        idx = answers.to(logits.device)[None].expand(last.shape[0], -1, -1)
        picked = last.gather(-1, idx)
        return picked[..., 0] - picked[..., 1]

    return metric


def logprob_metric(targets: Tensor, position: int = -1, temperature: float = 1.0):
    """Metric: log P(target) at `position`; targets [B]."""

    def metric(logits: Tensor) -> Tensor:
        lp = log_probs(logits[:, :, position], temperature)  # [k, B, vocab]
        idx = targets.to(logits.device)[None, :, None].expand(lp.shape[0], -1, 1)
        return lp.gather(-1, idx)[..., 0]

    return metric


def position_mask(valid: Tensor, exclude_first: int = 1) -> Tensor:
    """[B, pos] bool, the positions a probe scores: `valid` (False = padding) minus positions
    [0, exclude_first) - BOS / position 0 by default, whose massive activations and
    near-constant prediction would dominate an average; exclude_first=0 keeps every position."""
    from .runner import check_exclude_first

    check_exclude_first(exclude_first)
    mask = valid.to(torch.bool).clone()
    mask[:, :exclude_first] = False
    return mask


def check_finite(logits: Tensor, run: str) -> None:
    """Raise the runner's FloatingPointError if `logits` [B, pos, vocab] hold NaN/inf (one
    host-device sync): a causal probe would otherwise return all-NaN arrays and figures."""
    finite = torch.isfinite(logits).flatten(1).all(-1)  # [B]
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise FloatingPointError(
            f"non-finite values (NaN/inf) in the {run} run's logits (prompts {bad[:8]} "
            f"of the batch): check the model's weights and dtype"
        )


class PromptStats:
    """Online mean and standard error over prompts of a [*shape] statistic (float64). A prompt whose
    value is NaN (nothing to score) is left out of that entry's mean and s.e.m.; the s.e.m. of an
    entry with fewer than two prompts is NaN (undefined), not 0."""

    def __init__(self) -> None:
        self.total: Union[int, Tensor] = 0  # [*shape] sums over prompts, once one was added
        self.total_sq: Union[int, Tensor] = 0
        self.scored: Union[int, Tensor] = 0  # [*shape] prompts that entered each entry
        self.count = 0  # prompts seen

    def add(self, per_prompt: Tensor) -> None:
        """per_prompt [..., B]: one value per prompt in the last axis."""
        v = per_prompt.detach().double().cpu()
        ok = ~v.isnan()
        v = v.masked_fill(~ok, 0)
        self.total = self.total + v.sum(-1)
        self.total_sq = self.total_sq + (v**2).sum(-1)
        self.scored = self.scored + ok.sum(-1).double()
        self.count += v.shape[-1]

    def mean_sem(self) -> Tuple[np.ndarray, np.ndarray]:
        if not self.count:
            raise ValueError("no prompts were processed")
        n = self.scored
        mean = self.total / n  # NaN where no prompt scored
        var = (self.total_sq / n - mean**2).clamp_min(0) * n / (n - 1)  # NaN / inf where n < 2
        sem = (var / n).sqrt().masked_fill(n < 2, float("nan"))
        return mean.numpy(), sem.numpy()


def t_half_width(scored: np.ndarray, sem: np.ndarray, level: float = 0.95) -> np.ndarray:
    """Half-width of the two-sided `level` Student-t interval over `scored` prompts:
    t_{(1+level)/2, n-1} x s.e.m. (NaN where n < 2)."""
    from scipy.special import stdtrit  # the t quantile; scipy.stats' import costs ~0.7 s more

    return stdtrit(np.maximum(scored - 1, 1), 0.5 + level / 2) * np.where(scored >= 2, sem, np.nan)


def stats_arrays(prefix: str, stats: PromptStats, index=...) -> Dict[str, np.ndarray]:
    """{prefix: mean over prompts, prefix_sem: s.e.m., prefix_ci_low / _high: the 95% Student-t
    interval mean -/+ t_{0.975, n-1} s.e.m. (NaN with fewer than two prompts)}, of the statistic's
    entries at `index` (default: all)."""
    mean, sem = (a[index] for a in stats.mean_sem())
    half = t_half_width(stats.scored.numpy()[index], sem)
    return {
        prefix: mean,
        f"{prefix}_sem": sem,
        f"{prefix}_ci_low": mean - half,
        f"{prefix}_ci_high": mean + half,
    }


def clean_run(model: MultiStreamModel, tokens: Tensor, run: str = "clean"):
    """One forward caching every sublayer's input state and the mixing coefficients - those of
    a learned readout too, if the model has one (`is_mixing_hook`), so `model.frozen_mixing(cache)`
    freezes it. Returns (logits [B, pos, vocab], {sublayer index: state [B, pos, n, d]}, cache);
    raises FloatingPointError if the logits are not finite (`run` names the run in the message)."""
    inputs = {f"{s}.hook_streams_in" for s in model.sublayer_names}
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in inputs or is_mixing_hook(n))
    check_finite(logits, run)
    states = {k: cache[f"{s}.hook_streams_in"] for k, s in enumerate(model.sublayer_names)}
    return logits, states, cache
