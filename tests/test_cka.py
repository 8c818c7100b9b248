"""CKA probe: maths against a slow numpy reference, planted cases, the probe through the runner,
bounded memory, bad input, save/load and plots."""

import numpy as np
import pytest
import torch

from mhc_interp.probes.base import ProbeResult
from mhc_interp.probes.cka import (
    CKA,
    CKAResult,
    center_gram,
    cka_from_hsic,
    gram_linear,
    gram_rbf,
    hsic_matrix,
)
from mhc_interp.probes.runner import run_probes

from .conftest import perturbed_model, tiny_config


# ------------------------------------------------------- slow, obvious numpy reference (Kornblith)
def ref_gram_linear(x):
    return x.dot(x.T)


def ref_gram_rbf(x, threshold=1.0):
    dot_products = x.dot(x.T)
    sq_norms = np.diag(dot_products)
    sq_distances = -2 * dot_products + sq_norms[:, None] + sq_norms[None, :]
    sq_median_distance = np.median(sq_distances)
    return np.exp(-sq_distances / (2 * threshold**2 * sq_median_distance))


def ref_center_gram(gram, unbiased=False):
    gram = gram.copy()
    if unbiased:
        n = gram.shape[0]
        np.fill_diagonal(gram, 0)
        means = np.sum(gram, 0, dtype=np.float64) / (n - 2)
        means -= np.sum(means) / (2 * (n - 1))
        gram -= means[:, None]
        gram -= means[None, :]
        np.fill_diagonal(gram, 0)
    else:
        means = np.mean(gram, 0, dtype=np.float64)
        means -= np.mean(means) / 2
        gram -= means[:, None]
        gram -= means[None, :]
    return gram


def ref_cka(gram_x, gram_y, debiased=False):
    gram_x = ref_center_gram(gram_x, unbiased=debiased)
    gram_y = ref_center_gram(gram_y, unbiased=debiased)
    scaled_hsic = gram_x.ravel().dot(gram_y.ravel())
    return scaled_hsic / (np.linalg.norm(gram_x) * np.linalg.norm(gram_y))


def ref_feature_space_linear_cka(x, y, debiased=False):
    """Feature-space form; debiased = the helper in the methods notes (Kornblith)."""
    x = x - np.mean(x, 0, keepdims=True)
    y = y - np.mean(y, 0, keepdims=True)
    xty = np.linalg.norm(x.T.dot(y)) ** 2
    xtx = np.linalg.norm(x.T.dot(x))
    yty = np.linalg.norm(y.T.dot(y))
    if not debiased:
        return xty / (xtx * yty)
    n = x.shape[0]

    def helper(xty_, rx, ry, nx, ny):
        return xty_ - n / (n - 2.0) * rx.dot(ry) + nx * ny / ((n - 1) * (n - 2))

    rx, ry = np.sum(x**2, 1), np.sum(y**2, 1)
    nx, ny = np.sum(rx), np.sum(ry)
    return helper(xty, rx, ry, nx, ny) / (
        np.sqrt(helper(xtx**2, rx, rx, nx, nx)) * np.sqrt(helper(yty**2, ry, ry, ny, ny))
    )


def ref_hsic_song(K, L):
    """Unbiased HSIC_1, Song et al. 2012 eq. 5, written out literally."""
    n = K.shape[0]
    Kt, Lt = K.copy(), L.copy()
    np.fill_diagonal(Kt, 0)
    np.fill_diagonal(Lt, 0)
    one = np.ones(n)
    return (
        np.trace(Kt @ Lt)
        + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * one @ Kt @ Lt @ one
    ) / (n * (n - 3))


def ref_hsic_biased(K, L):
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return np.trace(K @ H @ L @ H) / (n - 1) ** 2


def ref_cka_matrix(reps, kernel="linear", debiased=True, threshold=1.0):
    """reps: list of [N, p] arrays -> [R, R] CKA, one pair at a time."""
    gram = ref_gram_linear if kernel == "linear" else (lambda x: ref_gram_rbf(x, threshold))
    grams = [gram(np.asarray(r, dtype=np.float64)) for r in reps]
    if len(grams) <= 6:
        return np.array([[ref_cka(gx, gy, debiased) for gy in grams] for gx in grams])
    # the same sum, written without one BLAS call per pair (slow when threads are contended)
    c = np.stack([ref_center_gram(g, unbiased=debiased).ravel() for g in grams])
    norms = np.sqrt((c * c).sum(1))
    return np.array([[(a * b).sum() / (na * nb) for b, nb in zip(c, norms)] for a, na in zip(c, norms)])


def shuffled_minibatches(n_tok, minibatch, shuffle_tokens=None, seed=0):
    """The probe's minibatches as lists of token indices (arrival order 0..n_tok-1), written out
    from its documented procedure: a buffer of C = shuffle_tokens (default 8 minibatches) rows,
    shuffled when full, C // (2 minibatch) minibatches taken from its front each time; at the
    end the rest is shuffled (generator seed + 1) and split into ceil(rest / minibatch)
    near-equal minibatches."""
    C = shuffle_tokens or 8 * minibatch
    g = torch.Generator().manual_seed(seed)
    buf, out = [], []
    for i in range(n_tok):
        buf.append(i)
        if len(buf) == C:
            buf = [buf[p] for p in torch.randperm(C, generator=g).tolist()]
            for _ in range(max(1, C // (2 * minibatch))):
                out.append(buf[:minibatch])
                buf = buf[minibatch:]
    left = len(buf)
    if left >= 4:
        buf = [
            buf[p] for p in torch.randperm(left, generator=torch.Generator().manual_seed(seed + 1)).tolist()
        ]
        n_groups = min(-(-left // minibatch), left // 4)
        sizes = [left // n_groups + (i < left % n_groups) for i in range(n_groups)]
        for size in sizes:
            out.append(buf[:size])
            buf = buf[size:]
    return out


def ref_minibatch_cka(reps, batches, debiased=True):
    """Nguyen et al. eq. 3: average HSIC over the minibatches `batches` (lists of token indices),
    then the ratio. reps: list of [N, p] arrays."""
    hsic = ref_hsic_song if debiased else ref_hsic_biased
    R = len(reps)
    M = np.zeros((R, R))
    for idx in batches:
        grams = [ref_gram_linear(np.asarray(r[idx], dtype=np.float64)) for r in reps]
        for i in range(R):
            for j in range(i, R):
                M[i, j] += hsic(grams[i], grams[j])
                M[j, i] = M[i, j]
    M /= len(batches)
    d = np.sqrt(np.diag(M))
    return M / np.outer(d, d)


def _cka(reps, kernel="linear", debiased=True, threshold=1.0):
    gram = gram_linear if kernel == "linear" else (lambda x: gram_rbf(x, threshold))
    grams = torch.stack([gram(torch.as_tensor(r)) for r in reps])
    return cka_from_hsic(hsic_matrix(grams, unbiased=debiased)).numpy()


# ------------------------------------------------------------------------------------ 1. maths
def _random_reps(rng, N=40, p=12):
    base = rng.standard_normal((N, p))
    reps = [
        base + 5.0,  # offset: centring matters
        base @ rng.standard_normal((p, p)) + rng.standard_normal(p) * 3,
        rng.standard_normal((N, p)) * 2.0 - 1.0,
        np.tanh(base) + 0.3 * rng.standard_normal((N, p)),
        rng.standard_normal((N, p)) * np.linspace(0.1, 10, p),
    ]  # anisotropic
    return reps


@pytest.mark.parametrize("debiased", [True, False])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_matches_numpy_reference(kernel, debiased):
    rng = np.random.default_rng(0)
    reps = _random_reps(rng)
    for threshold in [1.0] if kernel == "linear" else [0.5, 1.0, 2.0]:
        ours = _cka(reps, kernel, debiased, threshold)
        ref = ref_cka_matrix(reps, kernel, debiased, threshold)
        assert ours.dtype == np.float64
        np.testing.assert_allclose(ours, ref, atol=1e-10, rtol=0)
        assert abs(ours[0, 2]) < 0.99  # not trivially all ones
    if kernel == "linear":  # feature-space form (the notes' debiased helper)
        feat = np.array([[ref_feature_space_linear_cka(a, b, debiased) for b in reps] for a in reps])
        np.testing.assert_allclose(_cka(reps, kernel, debiased), feat, atol=1e-10, rtol=0)


def test_hsic_values_and_grams_match_reference():
    rng = np.random.default_rng(1)
    reps = _random_reps(rng, N=23, p=7)
    for gram, ref_gram in [
        (gram_linear, ref_gram_linear),
        (lambda x: gram_rbf(x, 0.7), lambda x: ref_gram_rbf(x, 0.7)),
    ]:
        ours = torch.stack([gram(torch.as_tensor(r)) for r in reps])
        if gram is not gram_linear:  # RBF Grams are identical; linear ones differ by centring
            np.testing.assert_allclose(
                ours.numpy(), np.stack([ref_gram(r) for r in reps]), atol=1e-12, rtol=0
            )
        refs = [ref_gram(r) for r in reps]
        hu, hb = hsic_matrix(ours, unbiased=True).numpy(), hsic_matrix(ours, unbiased=False).numpy()
        for i in range(len(reps)):
            for j in range(len(reps)):
                assert hu[i, j] == pytest.approx(ref_hsic_song(refs[i], refs[j]), abs=1e-10, rel=1e-10)
                assert hb[i, j] == pytest.approx(ref_hsic_biased(refs[i], refs[j]), abs=1e-10, rel=1e-10)
        # U-centring and H K H centring against the verbatim reference
        K = refs[1]
        np.testing.assert_allclose(
            center_gram(torch.as_tensor(K), True).numpy(), ref_center_gram(K, True), atol=1e-10
        )
        np.testing.assert_allclose(
            center_gram(torch.as_tensor(K), False).numpy(), ref_center_gram(K, False), atol=1e-10
        )


def test_float64_everywhere():
    X = torch.randn(10, 5, dtype=torch.float32)
    assert gram_linear(X).dtype == torch.float64
    assert gram_rbf(X).dtype == torch.float64
    assert center_gram(gram_linear(X), True).dtype == torch.float64
    assert hsic_matrix(gram_linear(X)[None].float()).dtype == torch.float64


# ------------------------------------------------------------------------------------ 2. planted
def test_identical_representations_give_one():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((30, 9))
    for kernel in ["linear", "rbf"]:
        for debiased in [True, False]:
            np.testing.assert_allclose(_cka([X, X.copy()], kernel, debiased), 1.0, atol=1e-12)


def test_biased_inflated_debiased_not_when_p_much_larger_than_n():
    rng = np.random.default_rng(3)
    X, Y = rng.standard_normal((50, 2000)), rng.standard_normal((50, 2000))
    biased = _cka([X, Y], debiased=False)[0, 1]
    debiased = _cka([X, Y], debiased=True)[0, 1]
    assert biased > 0.8, biased
    assert abs(debiased) < 0.05, debiased


def test_orthogonal_and_isotropic_scaling_invariance():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((60, 10))
    Y = np.tanh(X @ rng.standard_normal((10, 8))) + 0.2 * rng.standard_normal((60, 8))
    Q, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    Xt = 3.7 * X @ Q + 11.0
    for kernel in ["linear", "rbf"]:
        for debiased in [True, False]:
            a = _cka([X, Y, Xt], kernel, debiased)
            assert a[0, 2] == pytest.approx(1.0, abs=1e-10)
            assert a[0, 1] == pytest.approx(a[2, 1], abs=1e-10)
    # ... but not invariant to anisotropic scaling
    Xa = X * np.linspace(0.05, 5, 10)
    assert _cka([X, Xa])[0, 1] < 0.95


def test_too_few_tokens_for_debiased():
    with pytest.raises(ValueError, match="at least 4 tokens"):
        hsic_matrix(gram_linear(torch.randn(3, 5))[None], unbiased=True)
    hsic_matrix(gram_linear(torch.randn(3, 5))[None], unbiased=False)  # biased is defined


# --------------------------------------------------------------------------- 3. probe vs runner
N_SEQ, SEQ = 10, 12


@pytest.fixture(scope="module")
def probe_setup():
    model = perturbed_model(tiny_config("mhc"), seed=5)
    tokens = torch.randint(0, model.cfg.d_vocab, (N_SEQ, SEQ), generator=torch.Generator().manual_seed(7))
    return model, tokens


def _reps_from_cache(model, tokens, sites, batch_size=None):
    """[R] list of [tokens, d] arrays (site-major, stream-minor), position 0 excluded, cached in
    chunks of `batch_size` sequences (the runner's split: same shapes, same float32 forward)."""
    batch_size = batch_size or len(tokens)
    caches = [
        model.run_with_cache(tokens[i : i + batch_size], names_filter=sites)[1]
        for i in range(0, len(tokens), batch_size)
    ]
    reps = []
    for s in sites:
        act = torch.cat([c[s] for c in caches])[:, 1:]  # [seq, pos-1, n, d]
        act = act.reshape(-1, act.shape[-2], act.shape[-1]).double().numpy()
        reps += [act[:, k] for k in range(act.shape[1])]
    return reps


def _run(model, tokens, batch_size, **kw):
    return run_probes(model, CKA(**kw), tokens, batch_size=batch_size, progress=False)


def test_probe_equals_full_cache_reference(probe_setup):
    model, tokens = probe_setup
    sites = ["hook_streams_init"] + [f"{s}.hook_streams_out" for s in model.sublayer_names]
    reps = _reps_from_cache(model, tokens, sites)
    n_tok = N_SEQ * (SEQ - 1)
    for debiased in [True, False]:
        res = _run(model, tokens, N_SEQ, sites="sublayers", minibatch_tokens=512, debiased=debiased)
        ref = ref_cka_matrix(reps, debiased=debiased)
        np.testing.assert_allclose(res["cka"], ref, atol=1e-8, rtol=0)
        np.testing.assert_allclose(res["cka_debiased" if debiased else "cka_biased"], ref, atol=1e-8, rtol=0)
        assert res.meta["tokens_used"] == n_tok and res.meta["n_minibatches"] == 1
        assert res.meta["tokens_dropped"] == 0
        assert res["cka"].shape == (len(sites) * 4,) * 2
    assert not np.allclose(res["cka_debiased"], res["cka_biased"], atol=1e-3)
    assert res.meta["labels"][:6] == [
        "embed/s0",
        "embed/s1",
        "embed/s2",
        "embed/s3",
        "blocks.0.attn/s0",
        "blocks.0.attn/s1",
    ]
    np.testing.assert_allclose(res.intra("blocks.1.attn"), res["cka"][12:16, 12:16])
    np.testing.assert_allclose(res.intra_all(), res["intra"])
    np.testing.assert_allclose(res["intra"][3], res.intra(3))


@pytest.mark.parametrize("minibatch,shuffle_tokens", [(512, None), (7, None), (9, 20)])
def test_probe_minibatches_match_reference_for_every_runner_split(probe_setup, minibatch, shuffle_tokens):
    """The runner's batch split must not change the answer; minibatches follow Nguyen eq. 3,
    drawn from the documented token shuffle. (The reference is cached with the same split: the
    float32 mHC mixer makes the forward itself differ at ~1e-6 between batch shapes, which is not
    the probe's doing.)"""
    model, tokens = probe_setup
    sites = ["hook_streams_init"] + [f"blocks.{l}.mlp.hook_streams_out" for l in range(model.cfg.n_layers)]
    n_tok = N_SEQ * (SEQ - 1)
    batches = shuffled_minibatches(n_tok, minibatch, shuffle_tokens)
    assert sorted(i for b in batches for i in b) == list(range(n_tok))  # every token, once
    for bs in [1, 2, 5]:
        reps = _reps_from_cache(model, tokens, sites, batch_size=bs)
        for debiased in [True, False]:
            res = _run(
                model,
                tokens,
                bs,
                sites="layers",
                minibatch_tokens=minibatch,
                debiased=debiased,
                shuffle_tokens=shuffle_tokens,
            )
            np.testing.assert_allclose(
                res["cka"], ref_minibatch_cka(reps, batches, debiased), atol=1e-10, rtol=0
            )
        assert res.meta["site_names"] == sites
        assert res.meta["n_minibatches"] == len(batches)
        assert res.meta["tokens_dropped"] == 0 and res.meta["tokens_used"] == n_tok
    if minibatch < n_tok:  # the minibatches mix sequences: none is a run of consecutive tokens
        assert all(np.ptp(b) >= SEQ for b in batches)


@pytest.mark.parametrize("minibatch", [512, 7])
def test_online_aggregation_independent_of_batch_split(probe_setup, minibatch):
    """Same activations, fed in batches of 1, 2, 5 sequences: identical to 1e-12."""
    model, tokens = probe_setup
    probe = CKA(minibatch_tokens=minibatch)
    probe.setup(model)
    names = probe.hook_names(model)
    _, cache = model.run_with_cache(tokens, names_filter=names)
    mask = torch.ones(tokens.shape, dtype=torch.bool)
    mask[:, 0] = False
    out = []
    for bs in [1, 2, 5]:
        probe.setup(model)
        for i in range(0, N_SEQ, bs):
            probe.update({n: cache[n][i : i + bs] for n in names}, mask[i : i + bs])
        out.append(probe.result())
    for r in out[1:]:
        for k in ["cka", "cka_debiased", "cka_biased"]:
            np.testing.assert_allclose(r[k], out[0][k], atol=1e-12, rtol=0)
    # result() is repeatable and the buffer state survives it
    np.testing.assert_array_equal(probe.result()["cka"], out[-1]["cka"])


def test_runner_batch_sizes_identical_when_forward_is_batch_invariant():
    """End to end through run_probes with a multi-stream model whose forward gives the same
    activations whatever the batch shape ('hc' mixer); checked first so a failure is attributed."""
    model = perturbed_model(tiny_config("hc"), seed=3)
    tokens = torch.randint(0, model.cfg.d_vocab, (N_SEQ, SEQ), generator=torch.Generator().manual_seed(8))
    sites = [f"{s}.hook_streams_out" for s in model.sublayer_names]
    base = _reps_from_cache(model, tokens, sites)
    for bs in [1, 2, 5]:
        other = _reps_from_cache(model, tokens, sites, batch_size=bs)
        if any(not np.array_equal(a, b) for a, b in zip(base, other)):
            pytest.skip("this platform's forward is not batch-shape invariant")
    for minibatch in [512, 7]:
        res = [_run(model, tokens, bs, minibatch_tokens=minibatch)["cka"] for bs in [1, 2, 5]]
        for r in res[1:]:
            np.testing.assert_allclose(r, res[0], atol=1e-12, rtol=0)


def test_rbf_and_standardize_options(probe_setup):
    model, tokens = probe_setup
    sites = ["blocks.1.mlp.hook_streams_out"]
    reps = _reps_from_cache(model, tokens, sites)
    res = _run(model, tokens, N_SEQ, sites=sites, kernel="rbf", rbf_threshold=0.5)
    np.testing.assert_allclose(res["cka"], ref_cka_matrix(reps, "rbf", True, 0.5), atol=1e-8)
    res = _run(model, tokens, N_SEQ, sites=sites, standardize=True)
    z = [(r - r.mean(0)) / r.std(0) for r in reps]
    np.testing.assert_allclose(res["cka"], ref_cka_matrix(z), atol=1e-8)
    assert res.meta["standardize"] is True and res.meta["kernel"] == "linear"


# ------------------------------------------------------------------------------ 4. bounded memory
def _state_nbytes(obj):
    """Bytes of the tensors an object holds, looking into the objects it holds (its buffer)."""
    total = 0
    for v in vars(obj).values():
        items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else [v]
        total += sum(t.numel() * t.element_size() for t in items if isinstance(t, torch.Tensor))
        total += sum(
            _state_nbytes(t) for t in items if hasattr(t, "__dict__") and not isinstance(t, torch.Tensor)
        )
    return total


def test_state_size_constant():
    model = perturbed_model(tiny_config("mhc"), seed=1)
    probe = CKA(minibatch_tokens=64)
    probe.setup(model)
    names = probe.hook_names(model)
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[:, 0] = False
    sizes = []
    for step in range(60):  # 60 * 27 tokens = 25 minibatches
        acts = {n: torch.randn(3, 10, 4, 16, generator=g) for n in names}
        probe.update(acts, mask)
        if probe._n_minibatches >= 1:
            sizes.append(_state_nbytes(probe))
    # a buffer of 8 * 64 float32 rows, full at 512, 768, ..., 1536 tokens: 4 minibatches each time
    assert probe._n_minibatches == 5 * 4
    R = len(names) * 4
    assert len(set(sizes)) == 1, sizes
    assert sizes[0] == 8 * 64 * R * 16 * 4 + 2 * R * R * 8 + 8 * 64 * 8  # rows, HSIC sums, row order
    # the 1620 - 20 * 64 = 340 tokens left are flushed as 6 minibatches of 56-57
    meta = probe.result().meta
    assert (meta["n_minibatches"], meta["tokens_used"], meta["tokens_dropped"]) == (26, 1620, 0)
    assert _state_nbytes(probe) == sizes[0]


# ------------------------------------------------------------------------------------ 5. bad input
def test_too_few_tokens_raises(probe_setup):
    model, _ = probe_setup
    tokens = torch.randint(0, 40, (1, 4))  # position 0 masked -> 3 tokens
    with pytest.raises(ValueError, match=r"at least 4 tokens.*only 3 token"):
        _run(model, tokens, 1)
    with pytest.raises(ValueError, match="minibatch_tokens"):
        CKA(minibatch_tokens=3)


def test_every_token_is_used(probe_setup):
    """The buffer is flushed at the end: 10 tokens with minibatches of 8 make two minibatches of
    5 (arrival-order filling used 8 and dropped 2)."""
    model, tokens = probe_setup
    res = _run(model, tokens[:2, :6], 1, minibatch_tokens=8)
    assert (res.meta["tokens_used"], res.meta["tokens_dropped"], res.meta["n_minibatches"]) == (10, 0, 2)
    with pytest.raises(ValueError, match="shuffle_tokens must be >= 2 \\* minibatch_tokens = 16"):
        CKA(minibatch_tokens=8, shuffle_tokens=15)


def test_single_stream_model_rejected():
    model = perturbed_model(tiny_config("none", n_streams=1), seed=0)
    with pytest.raises(ValueError, match="no meaning"):
        _run(model, torch.randint(0, 40, (2, 8)), 2)


def test_bad_sites(probe_setup):
    model, tokens = probe_setup
    with pytest.raises(KeyError, match="Did you mean"):
        _run(model, tokens, 5, sites=["blocks.0.mlp.hook_streams_oot"])
    with pytest.raises(ValueError, match="stream states"):
        _run(model, tokens, 5, sites=["blocks.0.mlp.hook_read"])
    with pytest.raises(ValueError, match="kernel"):
        CKA(kernel="cosine")
    with pytest.raises(ValueError, match="sites"):
        CKA(sites="everything")


# ------------------------------------------------------------------------------ 6. save/load, plot
def test_save_load_and_plot(probe_setup, tmp_path):
    model, tokens = probe_setup
    res = _run(model, tokens, 4, minibatch_tokens=30, debiased=False)
    path = res.save(tmp_path / "cka")
    back = ProbeResult.load(path)
    assert isinstance(back, CKAResult)
    assert back.meta == res.meta
    assert set(back.arrays) == set(res.arrays) >= {"cka", "cka_debiased", "cka_biased", "intra"}
    for k in res.arrays:
        np.testing.assert_array_equal(back[k], res[k])
    np.testing.assert_array_equal(back["cka"], back["cka_biased"])
    np.testing.assert_array_equal(back.intra("blocks.0.mlp.hook_streams_out"), res.intra(1))
    figs = back.plot()
    assert set(figs) == {"cka_intra", "cka_inter"}
    import matplotlib.pyplot as plt

    for name, fig in figs.items():
        fig.savefig(tmp_path / f"{name}.png")
        plt.close(fig)
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    paths = back.save_figures(tmp_path / "figs")
    assert len(paths) == 2 and all(p.is_file() for p in paths)


@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_one_gemm_hsic_equals_centring_both_ways(offset):
    """The probe's single-GEMM HSIC (diagonal, row sums and sums instead of centred copies) equals
    centring the Grams (U-centring / H K H) and taking their inner products - also for features with
    a large common offset, where the uncentred sums cancel."""
    from mhc_interp.probes.cka import _hsic_both, gram_linear, gram_rbf, hsic_matrix

    g = torch.Generator().manual_seed(3)
    X = torch.randn(5, 40, 8, generator=g, dtype=torch.float64) + offset
    X[1] = 2 * X[0] + 0.1 * X[1]  # a related pair
    for grams in (gram_linear(X), gram_rbf(X, 1.0)):
        unbiased, biased = _hsic_both(grams.clone())
        torch.testing.assert_close(unbiased, hsic_matrix(grams, unbiased=True), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(biased, hsic_matrix(grams, unbiased=False), rtol=1e-9, atol=1e-12)
