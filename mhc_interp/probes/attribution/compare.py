"""How far an attribution map can be trusted: agreement with the exact map it estimates."""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np


def top_k(effect: np.ndarray, k: int) -> set:
    """Flat indices of the k cells with the largest |effect| (the most important patches)."""
    flat = np.abs(np.nan_to_num(np.ravel(effect), nan=0.0))
    return set(np.argsort(-flat, kind="stable")[:k].tolist())


def fidelity(
    estimate: np.ndarray, exact: np.ndarray, baseline: float, k: int = 10, cells: Optional[np.ndarray] = None
) -> Dict[str, float]:
    """Pearson and Spearman correlation of an estimated map with the exact one, and the overlap of
    their top-k cells by |effect| (effect = value - baseline, the unpatched base run's metric).
    cells: optional bool mask of the cells to compare (e.g. positions a patch can change)."""
    from scipy.stats import pearsonr, spearmanr

    est, ex = np.ravel(estimate), np.ravel(exact)
    if est.shape != ex.shape:
        raise ValueError(f"estimate {np.shape(estimate)} and exact {np.shape(exact)} maps differ in shape")
    keep = np.isfinite(est) & np.isfinite(ex)
    if cells is not None:
        keep &= np.ravel(cells)
    est, ex = est[keep], ex[keep]
    k = min(k, len(ex))
    return {
        "pearson": float(pearsonr(est, ex)[0]),
        "spearman": float(spearmanr(est, ex)[0]),
        "top_k": len(top_k(est - baseline, k) & top_k(ex - baseline, k)),
        "k": k,
        "cells": int(len(ex)),
    }
