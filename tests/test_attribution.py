"""Attribution patching: exact on a model where the metric is linear in the patched state, equal to
float64 finite differences elsewhere, the same conventions as activation_patching (mean / s.e.m.
over prompts, masks, directions, layouts), mixer attribution exact where the metric is linear in
the coefficients, and one clear error per bad input. Fidelity on trained models is measured by
examples/attribution_vs_patching.py, not here."""

import numpy as np
import pytest
import torch
from torch import nn

from mhc_interp import HookedMHC
from mhc_interp.probes import PROBES, activation_patching
from mhc_interp.probes.attribution import (
    AttributionPatching,
    AttributionResult,
    atp_gradients,
    attribution_patching,
)
from mhc_interp.probes.attribution.mixers import exact_mixer_patching
from mhc_interp.probes.causal import clean_run

from .conftest import FIXTURES, perturbed_model, tiny_config


def _prompts(vocab, b=3, p=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (b, p), generator=g)
    corrupted = clean.clone()
    corrupted[:, 3] = (corrupted[:, 3] + 1 + torch.arange(b)) % vocab  # one token per prompt
    corrupted[0, 5] = (corrupted[0, 5] + 7) % vocab
    return clean, corrupted


def linear_model(seed=0) -> HookedMHC:
    """float64 hc model whose logits are affine in every stream state once the mixing is frozen:
    no LayerNorms, linear MLPs, and attention with zero queries and keys (uniform causal pattern,
    linear in the values). The metric logit_diff is then affine in any patched state and in any
    one sublayer's coefficient tensor, so first-order estimates must be exact."""
    model = perturbed_model(tiny_config("hc"), seed=seed).double()
    d = model.cfg.d_model
    with torch.no_grad():
        for sub in model.sublayers:
            sub.ln = nn.Identity()
            if hasattr(sub, "c_attn"):
                sub.c_attn.weight[: 2 * d] = 0
                if sub.c_attn.bias is not None:
                    sub.c_attn.bias[: 2 * d] = 0
            else:
                sub.branch = (lambda s: lambda h: s.c_proj(s.c_fc(h)))(sub)
    model.ln_final = nn.Identity()
    return model


@pytest.fixture(scope="module")
def lin():
    return linear_model()


@pytest.fixture(scope="module")
def mhc64():
    return perturbed_model(tiny_config("mhc"), seed=3).double()


@pytest.mark.parametrize(
    "direction, positions, sublayers",
    [("denoise", None, None), ("noise", None, None), ("denoise", "each", None), ("noise", [3, 5], [1, 3])],
)
def test_atp_and_ig_exact_when_the_metric_is_linear(lin, direction, positions, sublayers):
    clean, corrupted = _prompts(lin.cfg.d_vocab)
    answers = torch.tensor([[1, 2], [3, 4], [5, 6]])
    kw = dict(
        mixing="frozen",
        metric="logit_diff",
        answers=answers,
        direction=direction,
        positions=positions,
        sublayers=sublayers,
    )
    exact = activation_patching(lin, clean, corrupted, **kw)
    for method in ("atp", "ig"):
        est = attribution_patching(lin, clean, corrupted, method=method, steps=2, **kw)
        # the oracle scores in float32 (values ~1e2 here): equal to its rounding
        np.testing.assert_allclose(est["attribution"], exact["logit_diff_frozen"], atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(
            est["attribution_sem"], exact["logit_diff_frozen_sem"], atol=1e-5, rtol=1e-5
        )
        for k in ("baseline_clean", "baseline_corrupted"):
            np.testing.assert_allclose(est[k], exact[k], atol=1e-9)
    assert est["attribution"].shape == exact["logit_diff_frozen"].shape
    assert est.meta["layout"] == exact.meta["layout"] and est.meta["sublayers"] == exact.meta["sublayers"]


def test_atp_equals_float64_patches_of_a_linear_model(lin):
    """The same in float64 end to end (own patched runs, no float32 scoring): to 1e-9."""
    clean, corrupted = _prompts(lin.cfg.d_vocab)
    answers = torch.tensor([[1, 2], [3, 4], [5, 6]])

    def logit_diff(logits):  # [k, B, pos, vocab], float64
        last = logits[:, :, -1]
        return last[:, torch.arange(3), answers[:, 0]] - last[:, torch.arange(3), answers[:, 1]]

    _, clean_states, _ = clean_run(lin, clean)
    _, corr_states, corr_cache = clean_run(lin, corrupted)
    layers = list(range(lin.cfg.n_sublayers))
    g = atp_gradients(lin, corrupted, logit_diff, layers, frozen=True)
    with torch.no_grad(), lin.frozen_mixing(corr_cache):
        base = logit_diff(lin(corrupted)[None])[0]
        for l in layers:
            for s in range(lin.cfg.n_streams):
                hook = lin.stream_hook(
                    f"{lin.sublayer_names[l]}.hook_streams_in", s, clean_states[l][:, :, s]
                )
                exact = logit_diff(lin.run_with_hooks(corrupted, fwd_hooks=[hook])[None])[0]
                est = base + ((clean_states[l] - corr_states[l]) * g.state_grads[l])[:, :, s].sum((1, 2))
                torch.testing.assert_close(est, exact, atol=1e-9, rtol=1e-12)


def test_mixer_attribution_exact_when_the_metric_is_linear_in_the_coefficients(lin):
    clean, corrupted = _prompts(lin.cfg.d_vocab)
    answers = torch.tensor([3, 4, 5])
    est = attribution_patching(
        lin, clean, corrupted, mixing="frozen", metric="logprob", answers=answers, mixers=True
    )
    exact = exact_mixer_patching(lin, clean, corrupted, mixing="frozen", metric="logprob", answers=answers)
    assert est["mixer_frozen"].shape == (lin.cfg.n_sublayers, 3)
    # logprob is not linear in the logits: grade the linear logit_diff exactly, logprob loosely
    answers2 = torch.tensor([[1, 2], [3, 4], [5, 6]])
    est2 = attribution_patching(
        lin, clean, corrupted, mixing="frozen", metric="logit_diff", answers=answers2, mixers=True
    )
    exact2 = exact_mixer_patching(
        lin, clean, corrupted, mixing="frozen", metric="logit_diff", answers=answers2
    )
    np.testing.assert_allclose(est2["mixer_frozen"], exact2.mean(-1), atol=1e-6, rtol=0)
    # per-entry effects add up to the per-tensor estimate
    parts = [
        est2[f"mixer_{p}_effect_frozen"].reshape(lin.cfg.n_sublayers, -1).sum(-1)
        for p in ("h_pre", "h_post", "h_res")
    ]
    np.testing.assert_allclose(
        np.stack(parts, 1) + est2["baseline_corrupted"], est2["mixer_frozen"], atol=1e-9
    )
    assert np.corrcoef(est["mixer_frozen"].ravel(), exact.mean(-1).ravel())[0, 1] > 0.9


def test_gradients_equal_float64_finite_differences(mhc64):
    """dM/dx . delta at the base run equals the central difference of patches x + eps delta of
    every (sublayer, stream) in float64 (recomputed mixing through Sinkhorn, a float64 KL)."""
    clean, corrupted = _prompts(mhc64.cfg.d_vocab, b=2)
    with torch.no_grad():
        ref = torch.log_softmax(mhc64(clean), -1)  # [B, pos, vocab]

    def kl(logits):  # [k, B, pos, vocab] -> [k, B]
        return (ref.exp() * (ref - torch.log_softmax(logits, -1))).sum(-1)[..., 1:].mean(-1)

    _, clean_states, _ = clean_run(mhc64, clean)
    _, corr_states, _ = clean_run(mhc64, corrupted)
    layers = list(range(mhc64.cfg.n_sublayers))
    g = atp_gradients(mhc64, corrupted, kl, layers, frozen=False)
    eps = 1e-6
    for l in layers:
        for s in range(mhc64.cfg.n_streams):
            delta = torch.zeros_like(corr_states[l])
            delta[:, :, s] = clean_states[l][:, :, s] - corr_states[l][:, :, s]
            with torch.no_grad():
                up, down = (
                    kl(mhc64(corr_states[l] + sign * eps * delta, start_at_sublayer=l)[None])[0]
                    for sign in (1, -1)
                )
            fd = (up - down) / (2 * eps)
            atp = (delta * g.state_grads[l]).sum((1, 2, 3))
            torch.testing.assert_close(atp, fd, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("name", ["mhc_n4", "mhc_lite_n4", "mhc_lite_lss_n4", "hc_n4", "mhc_n2"])
def test_every_variant(tokens, name):
    model = HookedMHC.from_pretrained(FIXTURES / f"{name}.pt")
    clean = tokens[:2, :8]
    corrupted = clean.clone()
    corrupted[:, 4] = (corrupted[:, 4] + 1) % model.cfg.d_vocab
    exact = activation_patching(model, clean, corrupted, mixing="both")
    est = attribution_patching(model, clean, corrupted, mixing="both")
    for mixing in ("recomputed", "frozen"):
        a, e = est[f"attribution_{mixing}"], exact[f"kl_{mixing}"]
        assert a.shape == e.shape == (model.cfg.n_sublayers, model.cfg.n_streams)
        assert np.isfinite(a).all() and np.isfinite(est[f"mixer_{mixing}"]).all()
        np.testing.assert_allclose(a - est[f"effect_{mixing}"], est["baseline_corrupted"], atol=1e-6)
    np.testing.assert_allclose(est["baseline_corrupted"], exact["baseline_corrupted"], rtol=1e-5)
    ig = attribution_patching(
        model, clean, corrupted, method="ig", steps=2, positions="each", mixing="frozen"
    )
    assert ig["attribution"].shape == (model.cfg.n_sublayers, model.cfg.n_streams, 8)
    assert ig.meta["forward_passes"] == 4 and ig.meta["backward_passes"] == 2


def test_probe_contract(mhc_model, tokens, tmp_path):
    """Registered, runs from the corpus runner with a corruption function, saves, loads and plots;
    prompts with nothing to score are left out exactly as activation_patching leaves them out."""
    from mhc_interp.probes import run_probes

    assert PROBES["attribution_patching"] is AttributionPatching
    clean = torch.cat([tokens[:, :8], tokens[:, 8:16]])  # 4 prompts

    def corrupt(t):
        out = t.clone()
        out[:, 5] = (out[:, 5] + 1) % mhc_model.cfg.d_vocab
        return out

    calls = []
    probe = AttributionPatching(mixing="both")
    probe.setup(mhc_model)
    probe.patch(mhc_model, clean[:2], corrupt(clean[:2]), progress=calls.append)
    assert sum(calls) == probe.n_runs(8) == 2
    res = run_probes(mhc_model, AttributionPatching(corrupt=corrupt, mixing="both"), clean, batch_size=2)
    assert isinstance(res, AttributionResult) and res.meta["prompts"] == 4
    assert res.meta["forward_passes"] == 2 * 3 and res.meta["backward_passes"] == 2 * 2
    np.testing.assert_allclose(
        res["attribution_routing"], res["attribution_recomputed"] - res["attribution_frozen"]
    )
    res.save(tmp_path / "attr")
    back = AttributionResult.load(tmp_path / "attr")
    assert isinstance(back, AttributionResult)
    assert set(back.save_figures(tmp_path / "fig")) >= {tmp_path / "fig" / "attribution_frozen.png"}
    # score_positions="from_corruption": positions before each prompt's corruption are not scored
    c2 = clean.clone()
    c2[:, 2] = (c2[:, 2] + 1) % mhc_model.cfg.d_vocab
    kw = dict(score_positions="from_corruption", mixing="frozen")
    a = attribution_patching(mhc_model, clean, c2, **kw)
    e = activation_patching(mhc_model, clean, c2, **kw)
    np.testing.assert_allclose(a["baseline_corrupted"], e["baseline_corrupted"], rtol=1e-5)


def test_bad_input(mhc_model, tokens):
    clean = tokens[:2, :8]
    corrupted = clean.clone()
    corrupted[:, 3] = (corrupted[:, 3] + 1) % mhc_model.cfg.d_vocab
    with pytest.raises(ValueError, match="differ in shape"):
        attribution_patching(mhc_model, clean, corrupted[:, :7])
    with pytest.raises(ValueError, match="identical"):
        attribution_patching(mhc_model, clean, torch.cat([corrupted[:1], clean[1:]]))
    with pytest.raises(ValueError, match="needs answers"):
        attribution_patching(mhc_model, clean, corrupted, metric="logit_diff")
    for steps in (0, -1, 2.5):
        with pytest.raises(ValueError, match="steps must be"):
            attribution_patching(mhc_model, clean, corrupted, method="ig", steps=steps)
    with pytest.raises(ValueError, match="method must be"):
        attribution_patching(mhc_model, clean, corrupted, method="atp**")
    with pytest.raises(ValueError, match="not provided"):
        attribution_patching(mhc_model, clean, corrupted, method="atp*")
    with pytest.raises(ValueError, match="first-order degenerate"):
        attribution_patching(mhc_model, clean, corrupted, direction="noise")
    one = HookedMHC.from_pretrained(FIXTURES / "residual.pt")
    with pytest.raises(ValueError, match="1 stream"):
        attribution_patching(one, clean % one.cfg.d_vocab, corrupted % one.cfg.d_vocab)
    # no hook stays attached after an error inside the gradient pass
    with pytest.raises((ValueError, IndexError, RuntimeError)):
        attribution_patching(mhc_model, clean, corrupted, metric="logprob", answers=torch.tensor([10**6, 0]))
    assert not any(h.fwd_hooks or h.bwd_hooks for h in mhc_model.hook_dict.values())


def test_noise_kl_with_ig_is_not_degenerate(mhc_model, tokens):
    clean = tokens[:2, :8]
    corrupted = clean.clone()
    corrupted[:, 3] = (corrupted[:, 3] + 1) % mhc_model.cfg.d_vocab
    est = attribution_patching(mhc_model, clean, corrupted, direction="noise", method="ig", steps=4)
    exact = activation_patching(mhc_model, clean, corrupted, direction="noise")
    assert np.abs(est["effect_recomputed"]).max() > 0
    assert np.corrcoef(est["attribution"].ravel(), exact["kl_recomputed"].ravel())[0, 1] > 0.5


def test_stream_edges_exact_when_linear_and_path_patching_checks(lin, mhc_model, tokens):
    from mhc_interp.probes.attribution.edges import EdgeResult, edge_attribution, exact_edge_patching

    clean, corrupted = _prompts(lin.cfg.d_vocab)
    answers = torch.tensor([[1, 2], [3, 4], [5, 6]])
    est = edge_attribution(lin, clean, corrupted, metric="logit_diff", answers=answers)
    n_sub = lin.cfg.n_sublayers
    edges = [(u, v, s) for u in range(n_sub) for v in range(u + 1, n_sub) for s in (0, 3)]
    exact = exact_edge_patching(lin, clean, corrupted, edges, metric="logit_diff", answers=answers).mean(-1)
    np.testing.assert_allclose([est["edge"][e] for e in edges], exact, atol=1e-6, rtol=0)
    assert np.isnan(est["edge"][1, 0]).all() and np.isnan(est["edge"][2, 2]).all()  # u >= v: no edge
    assert isinstance(est, EdgeResult) and len(est.top_edges(3)) == 3
    # bad edges and the degenerate direction fail clearly
    c2 = tokens[:, :8]
    k2 = c2.clone()
    k2[:, 4] = (k2[:, 4] + 1) % mhc_model.cfg.d_vocab
    with pytest.raises(IndexError, match="edge"):
        exact_edge_patching(mhc_model, c2, k2, [(2, 1, 0)])
    with pytest.raises(ValueError, match="degenerate"):
        edge_attribution(mhc_model, c2, k2, direction="noise")


def test_report_section_results(mhc_model, tokens, tmp_path):
    from mhc_interp.probes.attribution.section import report_results

    clean = tokens[:, :10]
    corrupted = clean.clone()
    corrupted[:, 5] = (corrupted[:, 5] + 1) % mhc_model.cfg.d_vocab
    patching = activation_patching(mhc_model, clean, corrupted, mixing="both")
    results, table = report_results(mhc_model, clean, corrupted, patching)
    assert [r.probe for r in results] == ["attribution_positions", "stream_edges"]
    assert results[0]["attribution_recomputed"].shape == (
        mhc_model.cfg.n_sublayers,
        mhc_model.cfg.n_streams,
        10,
    )
    assert len(table["rows"]) == 4 and all(len(r) == len(table["header"]) for r in table["rows"])
    names = {p.name for r in results for p in r.save_figures(tmp_path / r.probe)}
    assert {
        "attribution_positions_recomputed.png",
        "mixer_attribution_frozen.png",
        "stream_edges.png",
    } <= names


def test_a_prompt_with_nothing_to_score_is_left_out(mhc64):
    """Its NaN metric reaches only its own rows of the backward: the other prompts' estimates are
    the ones they get alone (as activation_patching leaves such prompts out); float64."""
    clean, corrupted = _prompts(mhc64.cfg.d_vocab)
    mask = torch.ones(clean.shape, dtype=torch.bool)
    mask[:, 0] = False
    mask[0] = False
    both = AttributionPatching(mixing="frozen")
    both.setup(mhc64)
    both.patch(mhc64, clean, corrupted, mask)
    alone = attribution_patching(mhc64, clean[1:], corrupted[1:], mixing="frozen")
    np.testing.assert_allclose(both.result()["attribution"], alone["attribution"], rtol=1e-9)
