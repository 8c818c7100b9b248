"""Cross-stream predictability: identical streams R^2 ~1, independent ~0, a linear map ~1, on
held-out tokens; the bounded token sample (reservoir / first-N); the real model's copied
embedding streams; bad input; results."""

import numpy as np
import pytest
import torch

from mhc_interp.probes import ProbeResult, run_probes
from mhc_interp.probes.predictability import CrossStreamPredictability, PredictabilityResult, ridge_r2_matrix

from .conftest import perturbed_model, tiny_config

SITE = "hook_streams_init"


@pytest.fixture(scope="module")
def model():
    return perturbed_model(tiny_config("mhc"), seed=4)


def feed(probe, x, batch=8):
    """x [tokens, n, d] -> update() in [batch, pos=4] pieces, every position unmasked."""
    x = x.reshape(-1, 4, *x.shape[1:])
    for i in range(0, len(x), batch):
        chunk = x[i : i + batch]
        probe.update({SITE: chunk}, torch.ones(chunk.shape[:2], dtype=torch.bool))


def test_identical_independent_and_linear_streams(model):
    """Streams 0 = 1 (identical), 2 = a random linear map of 0 plus 1% noise, 3 independent."""
    g = torch.Generator().manual_seed(0)
    N, d = 800, 16
    base = torch.randn(N, d, generator=g) * 3 + 1
    A = torch.randn(d, d, generator=g)
    x = torch.stack(
        [base, base, base @ A + 0.01 * torch.randn(N, d, generator=g), torch.randn(N, d, generator=g)], dim=1
    )
    probe = CrossStreamPredictability(sites=[SITE], max_tokens=N)
    probe.setup(model)
    feed(probe, x)
    r = probe.result()["r2"][0]
    assert r.shape == (4, 4)
    assert r[0, 1] > 0.999 and r[1, 0] > 0.999  # identical
    assert r[0, 2] > 0.99 and r[2, 0] > 0.99  # invertible linear map (+ noise)
    assert np.all(np.abs(r[3, :3]) < 0.05) and np.all(np.abs(r[:3, 3]) < 0.05)  # independent
    assert np.all(np.diag(r) > 0.999)
    # the same numbers straight from the fitting function with the probe's split
    res = probe.result()
    assert res.meta["n_test"] == 200 and res.meta["n_train"] == 600


def test_held_out_not_in_sample():
    """With more features than training tokens, in-sample R^2 of noise would be ~1; held out it
    stays <= ~0 (regularisation chosen by leave-one-out)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 2, 64))
    r = ridge_r2_matrix(x, np.arange(40), np.arange(40, 60))
    assert r[0, 1] < 0.05 and r[1, 0] < 0.05
    assert r[0, 0] < 0.9  # even a stream predicting itself: 40 tokens cannot fix a 64-d map


def test_bounded_sample_reservoir_and_first(model):
    N, cap = 4000, 300
    ids = torch.arange(N, dtype=torch.float32)
    x = ids[:, None, None].expand(N, 4, 16).clone()  # every feature = the token's index
    for sampling in ("reservoir", "first"):
        kept = []
        for batch in (8, 3, 50, 250):  # 250: reservoir picks land in slots the same batch fills
            probe = CrossStreamPredictability(sites=[SITE], max_tokens=cap, sampling=sampling, seed=5)
            probe.setup(model)
            feed(probe, x, batch=batch)
            assert probe.sample.shape == (cap, 1, 4, 16) and probe.seen == N and probe.filled == cap
            got = probe.sample[:, 0, 0, 0].long()
            assert len(set(got.tolist())) == cap  # no token twice
            kept.append(got)
        assert all(torch.equal(kept[0], k) for k in kept)  # independent of the batch split
        if sampling == "first":
            assert torch.equal(kept[0], torch.arange(cap))
        else:  # uniform over the whole stream
            assert abs(kept[0].float().mean().item() - N / 2) < 0.1 * N
            assert (kept[0] >= N // 2).float().mean().item() == pytest.approx(0.5, abs=0.1)


def test_real_model_sites_and_results(model, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    torch.manual_seed(0)
    corpus = torch.randint(0, 40, (40, 12))
    r = run_probes(model, CrossStreamPredictability(max_tokens=300), corpus, batch_size=16, progress=False)
    assert r["r2"].shape == (3, 4, 4) and r.meta["site_labels"] == ["embed", "blocks.0.mlp", "blocks.1.mlp"]
    assert r["r2"][0].min() > 0.999  # mHC streams start as copies
    assert r["mean_offdiag"].shape == (3,) and np.all(r["r2"][1:] < 1.0)
    assert r.meta["tokens_sampled"] == 300 and r.meta["sample_bytes"] == 300 * 3 * 4 * 16 * 4
    lss = perturbed_model(tiny_config("mhc_lite_lss"), seed=1)  # scaled copies: still linear
    r2 = run_probes(lss, CrossStreamPredictability(sites="sublayers", max_tokens=200), corpus, progress=False)
    assert r2["r2"].shape == (5, 4, 4) and r2["r2"][0].min() > 0.99
    back = ProbeResult.load(r.save(tmp_path / "pred"))
    assert isinstance(back, PredictabilityResult)
    np.testing.assert_array_equal(back["r2"], r["r2"])
    paths = back.save_figures(tmp_path / "png")
    assert {p.stem for p in paths} == {"matrices", "trend"} and all(p.stat().st_size > 0 for p in paths)


def test_bad_input(model):
    corpus = torch.randint(0, 40, (2, 6))
    with pytest.raises(ValueError, match="only 10 tokens sampled"):
        run_probes(model, CrossStreamPredictability(), corpus, progress=False)
    residual = perturbed_model(tiny_config("none", n_streams=1), seed=0)
    with pytest.raises(ValueError, match="compares residual streams"):
        run_probes(residual, CrossStreamPredictability(), corpus, progress=False)
    with pytest.raises(ValueError, match="stream states"):
        CrossStreamPredictability(sites=["blocks.0.attn.hook_write"]).setup(model)
    with pytest.raises(ValueError, match="sampling"):
        CrossStreamPredictability(sampling="random")
    with pytest.raises(ValueError, match="test_fraction"):
        CrossStreamPredictability(test_fraction=1.0)
    with pytest.raises(ValueError, match="below min_tokens"):
        CrossStreamPredictability(max_tokens=5)


@pytest.mark.parametrize("tokens,d", [(90, 6), (30, 12)])  # more tokens than features, and fewer
def test_ridge_equals_scikit_learn_ridgecv(tokens, d):
    """The torch ridge (one SVD per source, leave-one-out alpha per target) against the obvious
    reference: scikit-learn's RidgeCV on the same standardised features, R^2 pooled per stream."""
    from sklearn.linear_model import RidgeCV

    g = np.random.default_rng(4)
    x = g.normal(size=(tokens, 3, d))
    x[:, 1] = x[:, 0] @ g.normal(size=(d, d)) + 0.3 * g.normal(size=(tokens, d))  # 1 ~ linear in 0
    x[:, 2, 0] = 5.0  # a constant feature
    perm = g.permutation(tokens)
    test, train = np.sort(perm[: tokens // 4]), np.sort(perm[tokens // 4 :])
    alphas = (1e-2, 1.0, 100.0)
    Y = x.reshape(tokens, -1)
    Y_train, Y_test = Y[train] - Y[train].mean(0), Y[test] - Y[train].mean(0)
    expected = np.zeros((3, 3))
    for i in range(3):
        X = x[:, i]
        mu, sd = X[train].mean(0), X[train].std(0)
        sd = np.where(sd > 1e-12 * max(1.0, np.abs(X).max()), sd, np.inf)
        fit = RidgeCV(alphas=alphas, alpha_per_target=True, fit_intercept=False).fit(
            (X[train] - mu) / sd, Y_train
        )
        err = ((Y_test - fit.predict((X[test] - mu) / sd)) ** 2).reshape(len(test), 3, d).sum((0, 2))
        expected[i] = 1 - err / ((Y_test - Y_test.mean(0)) ** 2).reshape(len(test), 3, d).sum((0, 2))
    np.testing.assert_allclose(ridge_r2_matrix(x, train, test, alphas), expected, rtol=1e-8, atol=1e-10)


def test_ridge_alpha_batches_agree(monkeypatch):
    """The leave-one-out residuals of several alphas in one batched GEMM, or one alpha at a time
    (a small memory budget), choose the same alphas: the same R^2 to float rounding."""
    import mhc_interp.probes.predictability as pred

    g = np.random.default_rng(7)
    x = g.normal(size=(80, 3, 5))
    x[:, 1] = 0.5 * x[:, 0] + 0.2 * g.normal(size=(80, 5))
    train, test = np.arange(60), np.arange(60, 80)
    alphas = (1e-3, 0.1, 1.0, 10.0, 1e3)
    whole = ridge_r2_matrix(x, train, test, alphas)
    for budget in (1, 2 * 60 * 15 * 8 * 2):  # one alpha per GEMM; two per GEMM (a ragged last one)
        monkeypatch.setattr(pred, "_LOO_BYTES", budget)
        np.testing.assert_allclose(ridge_r2_matrix(x, train, test, alphas), whole, rtol=1e-12, atol=1e-12)
