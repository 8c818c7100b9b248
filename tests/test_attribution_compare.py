"""`fidelity`'s correlations against scipy.stats (the reference), with ties, NaNs and a mask."""

import numpy as np
import pytest

from mhc_interp.probes.attribution.compare import average_ranks, fidelity

stats = pytest.importorskip("scipy.stats")


def test_average_ranks_match_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=200).astype(float)  # many ties
    np.testing.assert_array_equal(average_ranks(x), stats.rankdata(x))
    np.testing.assert_array_equal(average_ranks(np.array([3.0, 1.0, 2.0])), [3.0, 1.0, 2.0])


def test_fidelity_matches_scipy():
    rng = np.random.default_rng(1)
    exact = rng.normal(size=(6, 4))
    exact[0] = 0.0  # a row of tied zeros (sublayers a patch does not change)
    estimate = exact + 0.3 * rng.normal(size=exact.shape)
    estimate[1, 2] = np.nan  # dropped
    cells = np.ones_like(exact, dtype=bool)
    cells[5] = False
    f = fidelity(estimate, exact, baseline=0.0, k=5, cells=cells)
    keep = np.isfinite(estimate) & cells
    assert f["cells"] == int(keep.sum()) == 19 and f["k"] == 5
    assert f["pearson"] == pytest.approx(stats.pearsonr(estimate[keep], exact[keep])[0], abs=1e-12)
    assert f["spearman"] == pytest.approx(stats.spearmanr(estimate[keep], exact[keep])[0], abs=1e-12)
    assert fidelity(exact, exact, 0.0)["spearman"] == pytest.approx(1.0)
    assert np.isnan(fidelity(np.ones(5), np.arange(5.0), 0.0)["pearson"])  # a constant map: undefined
    with pytest.raises(ValueError, match="differ in shape"):
        fidelity(np.ones(4), np.ones(5), 0.0)
