"""The corpus mean of every sublayer's input streams, for mean ablation that does not depend on
the batch size.

    mu[l, s] = (1 / N) sum_{(b, t) in mask} x_l[b, t, s]        [n_sublayers, n_streams, d_model]

over the N masked tokens of the whole corpus (position 0 and padding excluded, as the runner
masks), x_l the state entering sublayer l. The sums are accumulated online in float64 in one
streaming pass (`run_probes`), so the mean is the same whatever the batch size or order; the
batch-mean ablation (`ablation="mean"`) averages over each batch's tokens instead, and its
damage moves with the batch size.
"""

from __future__ import annotations

from typing import List, Union

import numpy as np
import torch
from torch import Tensor

from .base import Probe, ProbeResult, masked_rows, take_rows


class CorpusMean(Probe):
    """Observational probe: the mean of `{sublayer}.hook_streams_in` over every masked token.
    Result arrays: mean [n_sublayers, n_streams, d_model] (float64), tokens (the count N)."""

    name = "corpus_mean"

    def setup(self, model) -> None:
        self.sites: List[str] = [f"{s}.hook_streams_in" for s in model.sublayer_names]
        self.total: Union[int, Tensor] = 0  # [n_sublayers, n, d] float64 running sums
        self.count = 0

    def hook_names(self, model) -> List[str]:
        return self.sites

    def update(self, acts, mask) -> None:
        first = acts[self.sites[0]]
        rows = masked_rows(mask, first.device)  # [N]
        acc = torch.device("cpu") if first.device.type == "mps" else first.device  # MPS has no float64
        sums = torch.stack([take_rows(acts[s], rows).to(acc, torch.float64).sum(0) for s in self.sites])
        self.total = self.total + sums
        self.count += int(rows.numel())

    def result(self) -> ProbeResult:
        if not self.count:
            raise ValueError("corpus mean: no token was left after masking (every position excluded)")
        mean = (self.total / self.count).cpu().numpy()
        return ProbeResult(
            self.name,
            {"mean": mean, "tokens": np.array(self.count)},
            {"sites": self.sites, "tokens": self.count, "layout": "[sublayer, stream, d_model], float64"},
        )


def corpus_mean(model, source, **runner_options) -> Tensor:
    """mu [n_sublayers, n_streams, d_model] float64 (CPU): the mean of every sublayer's input
    stream over all masked tokens of `source` (any token source of `run_probes`, with its options
    - batch_size, seq_len, max_tokens, exclude_first, pad_id, device, dtype, progress (default
    False here) - and its mask), ready to pass as `AblateRescue(ablation=mu)`.
    `corpus_mean_with_count` returns the token count N too."""
    return corpus_mean_with_count(model, source, **{"progress": False, **runner_options})[0]


def corpus_mean_with_count(model, source, **runner_options):
    """(mu [n_sublayers, n_streams, d_model] float64, N tokens averaged); see `corpus_mean`."""
    from .runner import run_probes

    result = run_probes(model, CorpusMean(), source, **runner_options)
    return torch.from_numpy(result["mean"]), int(result["tokens"])
