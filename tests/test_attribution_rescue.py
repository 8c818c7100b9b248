"""Approximate ablation-and-rescue (mhc_interp.probes.attribution.rescue): the machinery is right
where it can be checked exactly - the readout estimate equals the exact map where the ablated
streams reach no later read, the linearised-logit KL equals the exact one-shot map on a model
whose logits are affine in the state, the Fisher draws' projections equal float64 finite
differences of the sampled score, their mean converges to the Gauss-Newton quadratic form, and
site IG converges to the exact map - and every bad input gets one clear error. How well the
estimates track the exact map on trained models is measured by
`examples/attribution_vs_patching.py --rescue` (docs/attribution.md), not here."""

import numpy as np
import pytest
import torch

from mhc_interp.probes import ablate_and_rescue
from mhc_interp.probes.attribution import ApproxAblateRescue, approximate_rescue, rescue_fidelity
from mhc_interp.probes.attribution.rescue import fisher_projections
from mhc_interp.probes.causal import clean_run, log_probs, position_mask

from .conftest import perturbed_model, planted_reader_model, tiny_config
from .test_attribution import lin, linear_model, mhc64  # noqa: F401  (fixtures)


def _tokens(vocab, b=3, p=8, seed=0):
    return torch.randint(0, vocab, (b, p), generator=torch.Generator().manual_seed(seed))


def _same_layout(est, exact):
    for key in (
        "kl_ablated",
        "kl_rescued",
        "rescue",
        "low_damage",
        "global_rescue",
        "global_rescue_weighted",
    ):
        assert est[key].shape == exact[key].shape, key
    np.testing.assert_array_equal(np.isnan(est["kl_ablated"]), np.isnan(exact["kl_ablated"]))


def test_readout_is_exact_where_the_ablated_streams_reach_no_read():
    """Every sublayer reads only stream 0 and H_res keeps the streams apart (stream 1 is dropped):
    ablating streams 1-3 changes no write, so carrying the change along H_res to the readout is the
    whole effect - equal to the exact map there; stream 1's ablation reaches nothing (damage 0)."""
    model = planted_reader_model(reader=0, dropped=1).double()
    tokens = _tokens(model.cfg.d_vocab)
    exact = ablate_and_rescue(model, tokens, min_kl=0.0)
    est = approximate_rescue(model, tokens, method="readout", min_kl=0.0)
    _same_layout(est, exact)
    assert est.meta["passes"] == {"forwards": 2.0, "backwards": 0.0, "readouts": 4.0 * (4 + 6)}
    for i, j in [(1, 2), (1, 3), (2, 3)]:
        np.testing.assert_allclose(
            est["kl_ablated"][:, i, j], exact["kl_ablated"][:, i, j], rtol=1e-9, atol=1e-12
        )
    for a in (1, 2, 3):
        np.testing.assert_allclose(
            est["kl_rescued"][:, a, 0], exact["kl_rescued"][:, a, 0], rtol=1e-9, atol=1e-12
        )
    np.testing.assert_allclose(exact["kl_rescued"][:, 1, 0], 0, atol=1e-12)
    assert exact["kl_ablated"][:, 2, 3].min() > 1e-4
    # stream 0 is read: there the estimate leaves the changed writes out (it is not exact)
    assert not np.allclose(est["kl_ablated"][:, 0, 2], exact["kl_ablated"][:, 0, 2], rtol=1e-3)
    # readout_fisher adds the indirect part, which is exactly 0 for the unread streams
    rf = approximate_rescue(model, tokens, method="readout_fisher", samples=3, min_kl=0.0)
    assert rf.meta["passes"] == {"forwards": 3.0, "backwards": 3.0, "readouts": 40.0}
    np.testing.assert_allclose(
        rf["kl_ablated"][:, 1:, 1:], est["kl_ablated"][:, 1:, 1:], rtol=1e-9, atol=1e-12
    )
    assert (rf["kl_ablated"][:, 0, 1:] != est["kl_ablated"][:, 0, 1:]).all()


def test_linearised_equals_the_exact_map_when_the_logits_are_affine(lin):
    """Frozen mixing + no LayerNorm / linear MLP / constant attention: dz = J delta is exact, so the
    KL of the linearised logits is the exact damage (pairs, singles, rescue, global rescue)."""
    tokens = _tokens(lin.cfg.d_vocab)
    exact = ablate_and_rescue(lin, tokens, min_kl=0.0)
    est = approximate_rescue(lin, tokens, method="linearised", min_kl=0.0)
    _same_layout(est, exact)
    for key in ("kl_ablated", "kl_rescued", "rescue", "global_rescue", "global_rescue_weighted"):
        np.testing.assert_allclose(est[key], exact[key], rtol=1e-7, atol=1e-10, err_msg=key)
    assert np.nanmax(exact["kl_ablated"]) > 1e-3  # not a trivially small case
    f = rescue_fidelity(est, exact)
    assert f["damage_pairs"]["spearman"] > 0.999 and f["damage_pairs"]["top_k"] == 10


def test_fisher_draws_are_directional_derivatives_of_the_sampled_score(mhc64):
    """(g^k . delta_s) from one backward equals the float64 central difference of
    sum_q sqrt(w_q) log p_q(y_q) along delta_s (mixing frozen), for every sublayer and stream."""
    model, tokens = mhc64, _tokens(mhc64.cfg.d_vocab)
    mask = position_mask(torch.ones_like(tokens, dtype=torch.bool), 1)
    logits, states, cache = clean_run(model, tokens)
    deltas = {l: -states[l] for l in range(model.cfg.n_sublayers)}
    proj = fisher_projections(
        model, tokens, mask, deltas, samples=1, generator=torch.Generator().manual_seed(5)
    )
    y = torch.multinomial(
        log_probs(logits).exp().flatten(0, 1).float(), 1, generator=torch.Generator().manual_seed(5)
    ).view(tokens.shape)
    w = (mask.double() / mask.double().sum(-1, keepdim=True)).sqrt()

    def score(l, x):
        with torch.no_grad(), model.frozen_mixing(cache):
            lp = log_probs(model(x, start_at_sublayer=l))
        return (lp.gather(-1, y[..., None])[..., 0] * w).sum(-1)  # [B]

    eps = 1e-5
    for l, d in deltas.items():
        for s in range(model.cfg.n_streams):
            step = torch.zeros_like(d)
            step[:, :, s] = eps * d[:, :, s]
            fd = (score(l, states[l] + step) - score(l, states[l] - step)) / (2 * eps)
            torch.testing.assert_close(proj[0, l, :, s], fd, rtol=1e-6, atol=1e-9)


def test_fisher_mean_converges_to_the_gauss_newton_form(mhc64):
    tokens = _tokens(mhc64.cfg.d_vocab, b=2)
    gn = approximate_rescue(mhc64, tokens, method="gauss_newton", min_kl=0.0)
    mc = approximate_rescue(mhc64, tokens, method="fisher", samples=400, seed=1, min_kl=0.0)
    assert mc.meta["passes"] == {"forwards": 2.0, "backwards": 400.0, "readouts": 0.0}
    ratio = mc["kl_ablated"] / gn["kl_ablated"]
    off = ~np.isnan(ratio)
    assert abs(np.median(ratio[off]) - 1) < 0.1
    assert np.corrcoef(mc["kl_ablated"][off], gn["kl_ablated"][off])[0, 1] > 0.97


def test_site_ig_converges_to_the_exact_map(mhc64):
    tokens = _tokens(mhc64.cfg.d_vocab, b=2)
    exact = ablate_and_rescue(mhc64, tokens, min_kl=0.0)
    err = {}
    for steps in (4, 32):  # the midpoint rule: error ~ 1 / steps^2
        ig = approximate_rescue(mhc64, tokens, method="ig_site", steps=steps, min_kl=0.0)
        _same_layout(ig, exact)
        err[steps] = max(np.nanmax(np.abs(ig[k] / exact[k] - 1)) for k in ("kl_ablated", "kl_rescued"))
    assert err[32] < 3e-3 and err[32] < err[4] / 20, err


def test_probe_uses_the_exact_probes_options_and_masks(mhc64):
    """min_kl flagging, sublayers=, temperature and exclude_first go through the exact probe's code."""
    tokens = _tokens(mhc64.cfg.d_vocab)
    options = dict(method="fisher", samples=4, sublayers=[1, 2], min_kl=1e9, temperature=2.0, exclude_first=2)
    est = approximate_rescue(mhc64, tokens, **options)
    assert approximate_rescue(mhc64, tokens, sublayers=[1, 2]).meta["method"] == "readout"  # the default
    assert est["kl_ablated"].shape == (2, 4, 4) and est["low_damage"].all() and np.isnan(est["rescue"]).all()
    assert est.meta["sublayers"] == [mhc64.sublayer_names[1], mhc64.sublayer_names[2]]
    assert est.meta["method"] == "fisher" and est.meta["samples"] == 4
    again = approximate_rescue(mhc64, tokens, **options)
    np.testing.assert_array_equal(est["kl_ablated"], again["kl_ablated"])  # seeded
    for method in ("fisher", "readout_fisher", "readout"):  # rows follow `sublayers`
        fwd, rev = (
            approximate_rescue(mhc64, tokens, method=method, samples=2, sublayers=s, min_kl=0.0)
            for s in ([0, 2], [2, 0])
        )
        np.testing.assert_allclose(rev["kl_ablated"], fwd["kl_ablated"][::-1], rtol=1e-10, err_msg=method)


def test_bad_input(mhc64):
    tokens = _tokens(mhc64.cfg.d_vocab)
    with pytest.raises(ValueError, match="unknown method"):
        ApproxAblateRescue(method="atp")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="samples must be a positive int"):
            ApproxAblateRescue(samples=bad)
        with pytest.raises(ValueError, match="steps must be a positive int"):
            ApproxAblateRescue(method="ig_site", steps=bad)
    with pytest.raises(ValueError, match="mode='one_shot' only"):
        ApproxAblateRescue(mode="persistent")
    with pytest.raises(ValueError, match="pairs= is not supported"):
        ApproxAblateRescue(pairs=[(0, 1)])
    with pytest.raises(ValueError, match="needs frozen=True"):
        approximate_rescue(mhc64, tokens, method="readout", frozen=False)
    with pytest.raises(ValueError, match="unknown ablation"):
        ApproxAblateRescue(ablation="median")
    one = perturbed_model(tiny_config("mhc", n_streams=1), seed=0)
    with pytest.raises(ValueError, match="compares residual streams"):
        approximate_rescue(one, tokens)
    with pytest.raises(IndexError, match="out of range"):
        approximate_rescue(mhc64, tokens, sublayers=[99])
