"""How far an attribution map can be trusted: agreement with the exact map it estimates."""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np


def top_k(effect: np.ndarray, k: int) -> set:
    """Flat indices of the k cells with the largest |effect| (the most important patches)."""
    flat = np.abs(np.nan_to_num(np.ravel(effect), nan=0.0))
    return set(np.argsort(-flat, kind="stable")[:k].tolist())


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x [N], ties sharing their mean rank (scipy.stats.rankdata's "average",
    here because importing scipy.stats costs ~0.8 s, a sixth of the report's attribution section)."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])  # where each run of equal values begins
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)  # mean of ranks start+1 .. end
    return ranks


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's r of two [N] samples (NaN where either is constant)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.corrcoef(a, b)[0, 1])


def fidelity(
    estimate: np.ndarray, exact: np.ndarray, baseline: float, k: int = 10, cells: Optional[np.ndarray] = None
) -> Dict[str, float]:
    """Pearson and Spearman (Pearson of the average ranks) correlation of an estimated map with the
    exact one, and the overlap of their top-k cells by |effect| (effect = value - baseline, the
    unpatched base run's metric).
    cells: optional bool mask of the cells to compare (e.g. positions a patch can change)."""
    est, ex = np.ravel(estimate), np.ravel(exact)
    if est.shape != ex.shape:
        raise ValueError(f"estimate {np.shape(estimate)} and exact {np.shape(exact)} maps differ in shape")
    keep = np.isfinite(est) & np.isfinite(ex)
    if cells is not None:
        keep &= np.ravel(cells)
    est, ex = est[keep], ex[keep]
    k = min(k, len(ex))
    return {
        "pearson": pearson(est, ex),
        "spearman": pearson(average_ranks(est), average_ranks(ex)),  # Spearman's rho
        "top_k": len(top_k(est - baseline, k) & top_k(ex - baseline, k)),
        "k": k,
        "cells": int(len(ex)),
    }
