"""What the report's attribution section runs: the position-resolved attribution map with mixer
attribution, the stream edges, and a table of how well the [sublayer, stream] estimates track the
exact activation-patching sweep already computed on the same prompts."""

from __future__ import annotations

from typing import Dict, List, Tuple

from torch import Tensor

from ..base import ProbeResult
from .compare import fidelity
from .edges import edge_attribution
from .probe import attribution_patching


def report_results(
    model, clean: Tensor, corrupted: Tensor, patching: ProbeResult, steps: int = 2
) -> Tuple[List[ProbeResult], Dict]:
    """(results to save and plot, a table {"title", "header", "rows"}) for aligned prompts [B, pos]
    and `patching`, the exact `activation_patching` result (denoise, KL) on the same prompts.
    Costs a constant number of passes: AtP per position (with mixers), IG [sublayer, stream] for
    each mixing the exact result has, and the stream edges."""
    per_position = attribution_patching(
        model, clean, corrupted, mixing="both", positions="each", method="atp", mixers=True
    )
    per_position.probe = "attribution_positions"
    rows = []
    base = float(patching["baseline_corrupted"])
    graded = [model.sublayer_names.index(s) for s in patching.meta["sublayers"]]  # the exact sweep's rows
    for mixing in patching.meta["mixing"]:
        exact = patching[f"kl_{mixing}"]
        ig = attribution_patching(model, clean, corrupted, mixing=mixing, method="ig", steps=steps)
        atp = base + per_position[f"effect_{mixing}"].sum(-1)  # first order: the effects add over positions
        for label, est in (
            ("AtP (per position, summed effects)", atp),
            (f"IG ({steps} steps)", ig["attribution"]),
        ):
            f = fidelity(est[graded], exact, base)
            rows.append(
                [label, mixing, f"{f['pearson']:.3f}", f"{f['spearman']:.3f}", f"{f['top_k']}/{f['k']}"]
            )
    table = {
        "title": "attribution vs exact activation patching on these prompts ([sublayer, stream])",
        "header": ["method", "mixing", "Pearson", "Spearman", "top-10 overlap"],
        "rows": rows,
    }
    return [per_position, edge_attribution(model, clean, corrupted)], table
