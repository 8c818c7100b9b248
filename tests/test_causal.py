"""Causal probes: batched, prefix-reusing interventions equal a naive loop (one run_with_hooks
forward per intervention), planted stream roles give the expected rescue, and bad input fails."""

import itertools

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from mhc_interp.hooks import is_mixing_hook
from mhc_interp.hooks.batched import Edit, run_edits
from mhc_interp.probes import (
    AblateRescue,
    ActivationPatching,
    SymmetricReplacement,
    ablate_and_rescue,
    activation_patching,
    run_probes,
)
from mhc_interp.probes.causal import clean_run, kl_metric

from .conftest import perturbed_model, tiny_config


@pytest.fixture(scope="module")
def model():
    return perturbed_model(tiny_config("mhc"), seed=5)


@pytest.fixture(scope="module")
def prompts():
    torch.manual_seed(11)
    return torch.randint(0, 40, (3, 8))


@torch.no_grad()
def naive_kl(clean_logits, logits, mask, temperature=1.0):
    """Mean over masked positions of KL(P_clean || P), per prompt, written out plainly."""
    p_log = F.log_softmax(clean_logits.double() / temperature, -1)
    q_log = F.log_softmax(logits.double() / temperature, -1)
    kl = (p_log.exp() * (p_log - q_log)).sum(-1)
    return (kl * mask).sum(-1) / mask.sum(-1)


def default_mask(tokens):
    mask = torch.ones(tokens.shape, dtype=torch.bool)
    mask[:, 0] = False
    return mask


def naive_rescue(model, tokens, mode, ablation="zero"):
    """One full forward per intervention, mixing frozen to the clean run."""
    clean, cache = model.run_with_cache(
        tokens, names_filter=lambda n: is_mixing_hook(n) or n.endswith("streams_in")
    )
    mask, n, names = default_mask(tokens), model.cfg.n_streams, model.sublayer_names
    L = len(names)
    ablated = np.full((L, n, n), np.nan)
    rescued = np.full((L, n, n), np.nan)

    def value(s):
        if ablation == "zero":
            return 0.0
        return cache[f"{names[s]}.hook_streams_in"][mask].mean(0)  # [n, d]

    def hooks_for(l, ablate, restore):
        span = [l] if mode == "one_shot" else range(l, L)
        out = []
        for s in span:
            name = f"{names[s]}.hook_streams_in"

            def hook(x, hook, s=s, name=name):
                x = x.clone()
                v = value(s)
                for st in ablate:
                    x[:, :, st] = v if isinstance(v, float) else v[st]
                for st in restore:
                    x[:, :, st] = cache[name][:, :, st]
                return x

            out.append((name, hook))
        return out

    with model.frozen_mixing(cache):
        for l in range(L):
            for i, j in itertools.combinations(range(n), 2):
                logits = model.run_with_hooks(tokens, fwd_hooks=hooks_for(l, (i, j), ()))
                ablated[l, i, j] = ablated[l, j, i] = naive_kl(clean, logits, mask).mean()
            for a, r in itertools.permutations(range(n), 2):
                logits = model.run_with_hooks(tokens, fwd_hooks=hooks_for(l, (a, r), (r,)))
                rescued[l, a, r] = naive_kl(clean, logits, mask).mean()
    return ablated, rescued


@pytest.mark.parametrize(
    "mode,ablation", [("one_shot", "zero"), ("persistent", "zero"), ("one_shot", "mean")]
)
def test_rescue_matches_naive_loop(model, prompts, mode, ablation):
    ablated, rescued = naive_rescue(model, prompts, mode, ablation)
    # mean ablation uses the batch's mean, so it is compared on one batch only
    splits = ((3, None), (2, 5)) if ablation == "zero" else ((3, 5),)
    for batch_size, max_rows in splits:  # several batches, and chunks smaller than one sublayer's edits
        r = ablate_and_rescue(
            model, prompts, mode=mode, ablation=ablation, batch_size=batch_size, max_rows=max_rows
        )
        np.testing.assert_allclose(r["kl_ablated"], ablated, atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(r["kl_rescued"], rescued, atol=1e-5, rtol=1e-4)
        expected = (ablated - rescued) / ablated
        np.testing.assert_allclose(r["rescue"], np.where(ablated >= 1e-3, expected, np.nan), atol=1e-4)
        assert r.meta["mode"] == mode and r.meta["frozen_mixing"] is True


def naive_patching(model, clean_tokens, corrupted, frozen, mask=None):
    clean, clean_cache = model.run_with_cache(clean_tokens, names_filter=lambda n: n.endswith("streams_in"))
    _, corr_cache = model.run_with_cache(corrupted, names_filter=is_mixing_hook)
    mask = default_mask(clean_tokens) if mask is None else mask
    n, names = model.cfg.n_streams, model.sublayer_names
    out = np.zeros((len(names), n))
    for l, s in itertools.product(range(len(names)), range(n)):
        name = f"{names[l]}.hook_streams_in"
        hook = model.stream_hook(name, s, clean_cache[name][:, :, s])
        if frozen:
            with model.frozen_mixing(corr_cache):
                logits = model.run_with_hooks(corrupted, fwd_hooks=[hook])
        else:
            logits = model.run_with_hooks(corrupted, fwd_hooks=[hook])
        out[l, s] = naive_kl(clean, logits, mask).mean()
    return out


def test_patching_matches_naive_loop(model, prompts):
    corrupted = prompts.clone()
    corrupted[:, 4] = (corrupted[:, 4] + 7) % 40
    r = activation_patching(model, prompts, corrupted, mixing="both", batch_size=2, max_rows=4)
    recomputed, frozen = (
        naive_patching(model, prompts, corrupted, False),
        naive_patching(model, prompts, corrupted, True),
    )
    np.testing.assert_allclose(r["kl_recomputed"], recomputed, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(r["kl_frozen"], frozen, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(r["kl_routing"], recomputed - frozen, atol=2e-5)
    assert (r["kl_recomputed_ci_low"] <= r["kl_recomputed"]).all()
    # patching the corrupted token's position of every stream at sublayer 0 restores the clean run
    full = activation_patching(model, prompts, corrupted, positions=[4], batch_size=3)
    assert full["kl_recomputed"].shape == (model.cfg.n_sublayers, 4, 1)
    assert r["baseline_corrupted"] > 0 and r["baseline_clean"] == 0


@pytest.mark.parametrize(
    "kw", [dict(mixing="both"), dict(mixing="frozen", positions="each", sublayers=[1, 3])]
)
def test_patching_progress_counts_every_run(model, prompts, kw):
    """The bar's total (`n_runs`) is what `patch` reports, with runs split into chunks (max_rows)."""
    corrupted = prompts.clone()
    corrupted[:, 4] = (corrupted[:, 4] + 7) % 40
    probe = ActivationPatching(max_rows=4, **kw)
    probe.setup(model)
    done = []
    probe.patch(model, prompts, corrupted, progress=done.append)
    assert sum(done) == probe.n_runs(prompts.shape[1]) and len(done) > 2


def test_patching_scored_from_the_corruption(model, prompts):
    """score_positions="from_corruption" averages the KL over each prompt's first corrupted token and
    after: the naive loop with that mask written out by hand; positions before it score ~0, so the
    all-positions score is the same sum over more positions."""
    corrupted = prompts.clone()
    corrupted[0, 2] = (corrupted[0, 2] + 5) % 40  # prompts corrupted at different depths
    corrupted[1:, 5] = (corrupted[1:, 5] + 7) % 40
    corrupted[2, 6] = (corrupted[2, 6] + 1) % 40  # a second difference does not move the start
    mask = default_mask(prompts)
    mask[0, :2] = False
    mask[1:, :5] = False
    r = activation_patching(model, prompts, corrupted, batch_size=2, score_positions="from_corruption")
    np.testing.assert_allclose(
        r["kl_recomputed"], naive_patching(model, prompts, corrupted, False, mask), atol=1e-5, rtol=1e-4
    )
    assert r.meta["score_positions"] == "from_corruption"
    per_prompt = activation_patching(
        model, prompts, corrupted, batch_size=1, sublayers=[2], score_positions="all"
    )
    scored = mask.sum(-1).double() / default_mask(prompts).sum(-1)  # share of positions scored
    single = [
        activation_patching(
            model, prompts[i : i + 1], corrupted[i : i + 1], sublayers=[2], score_positions="from_corruption"
        )["kl_recomputed"]
        for i in range(3)
    ]
    np.testing.assert_allclose(
        per_prompt["kl_recomputed"],
        np.mean([scored[i].item() * single[i] for i in range(3)], 0),
        rtol=1e-4,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match=r"prompts \[3, 4\]: clean and corrupted are identical"):
        activation_patching(
            model,
            torch.cat([prompts, prompts[:2]]),
            torch.cat([corrupted, prompts[:2]]),
            batch_size=3,
            score_positions="from_corruption",
        )
    with pytest.raises(ValueError, match="score_positions must be one of"):
        ActivationPatching(score_positions="after")
    with pytest.raises(ValueError, match="applies to the KL metric"):
        ActivationPatching(metric="logprob", answers=prompts[:, 0], score_positions="from_corruption")


def test_patching_all_streams_restores_clean(model, prompts):
    corrupted = prompts.clone()
    corrupted[:, 4] = (corrupted[:, 4] + 7) % 40
    clean_logits, clean_states, _ = clean_run(model, prompts)
    _, corr_states, _ = clean_run(model, corrupted)
    mask = default_mask(prompts)
    kl = run_edits(
        model,
        [Edit((2,), restore=(0, 1, 2, 3))],
        corr_states,
        kl_metric(clean_logits, mask),
        source_states=clean_states,
    )
    assert kl.abs().max() < 1e-9


# ------------------------------------------------------------------------------ planted
def planted_roles_model():
    """hc model, static coefficients, 4 streams:
    streams 0 and 1 carry identical content and are both read (H_pre = [.5, .5, 0, 0]) and
    re-averaged by H_res every sublayer; branch writes go to stream 2 only; stream 3 is never read
    and never carried on (its H_res column is zero), so it cannot matter."""
    model = perturbed_model(tiny_config("hc"), seed=2)
    h_res = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    with torch.no_grad():
        for sub in model.sublayers:
            m = sub.mixer
            m.dynamic_alpha_fn.zero_()
            m.dynamic_beta_fn.zero_()
            m.static_alpha.copy_(torch.cat([torch.tensor([[0.5], [0.5], [0.0], [0.0]]), h_res.T], dim=1))
            m.static_beta.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))
    return model


def test_planted_rescue_roles(prompts):
    r = ablate_and_rescue(planted_roles_model(), prompts, min_kl=1e-6)
    rescue, damage = r["rescue"], r["kl_ablated"]
    assert (damage[:, 0, 1] > 1e-3).all()
    # redundant pair {0, 1}: either stream alone rescues (LayerNorm makes the half-read harmless)
    assert (rescue[:, 1, 0] > 0.99).all() and (rescue[:, 0, 1] > 0.99).all()
    # stream 3 is never read nor carried: ablating it alone (= rescue by its partner) costs nothing
    np.testing.assert_array_equal(r["kl_rescued"][:, 3, [0, 1, 2]], 0.0)
    # asymmetric pair {0, 2}: recovering 2 (the written stream) rescues, recovering 0 does not
    late = slice(2, None)  # from sublayer 2 on, stream 2 holds the branches' writes
    assert (rescue[late, 0, 2] > 0.99).all() and (rescue[late, 2, 0] < 0.5).all()
    assert (r.pair_difference(2, 0)[late] > 0.5).all()
    assert "ablated \\ recovered" in r.table()


def test_restoring_every_ablated_stream_gives_zero(model, prompts):
    logits, states, cache = clean_run(model, prompts)
    metric = kl_metric(logits, default_mask(prompts))
    edits = [Edit((1,), ablate=(0, 2), restore=(0, 2)), Edit((1, 2, 3), ablate=(1,), restore=(1,))]
    kl = run_edits(model, edits, states, metric, source_states=states, frozen=cache, source_is_base=True)
    assert torch.equal(kl, torch.zeros_like(kl))
    # and actually running them (no identity shortcut) agrees to rounding
    kl = run_edits(model, edits, states, metric, source_states=states, frozen=cache)
    assert kl.abs().max() < 1e-9


def test_temperature_and_min_kl_flags(model, prompts):
    hot = ablate_and_rescue(model, prompts, temperature=4.0, sublayers=[0, 3])
    cold = ablate_and_rescue(model, prompts, sublayers=[0, 3])
    assert (hot["kl_ablated"][:, 0, 1] < cold["kl_ablated"][:, 0, 1]).all()
    flagged = ablate_and_rescue(model, prompts, sublayers=[0, 3], min_kl=1e9)
    assert flagged["low_damage"].all() and np.isnan(flagged["rescue"]).all()
    assert hot.meta["sublayers"] == ["blocks.0.attn", "blocks.1.mlp"]


def test_runner_with_causal_and_observational_probes(model, prompts, tmp_path):
    corrupt = SymmetricReplacement(groups={"a": [1, 2, 3], "b": [4, 5]})
    tokens = prompts.clone()
    tokens[:, 5] = 2
    results = run_probes(
        model,
        [AblateRescue(sublayers=[1]), ActivationPatching(corrupt=corrupt, sublayers=[0, 1])],
        tokens,
        batch_size=2,
        progress=False,
    )
    assert results["activation_patching"]["kl_recomputed"].shape == (2, 4)
    assert results["ablate_rescue"].meta["prompts"] == 3
    for res in results.values():
        res.save(tmp_path / res.probe)
        assert res.save_figures(tmp_path / "figs")


def test_symmetric_replacement():
    corrupt = SymmetricReplacement(groups={"noun": [10, 11, 12], "verb": [20, 21]})
    tokens = torch.tensor([[1, 10, 2, 20, 3], [11, 5, 6, 7, 8]])
    corrupted, pos = corrupt.corrupt_with_positions(tokens)
    assert pos.tolist() == [3, 0]
    assert corrupted.tolist() == [[1, 10, 2, 21, 3], [12, 5, 6, 7, 8]]
    with pytest.raises(ValueError, match="no token from the word groups"):
        corrupt(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="fewer than two"):
        SymmetricReplacement(groups={"x": [1]})

    class Tok:
        def encode(self, w):
            return {" cat": [7], " dog": [8], " hippopotamus": [9, 10]}.get(w, [1, 2])

    corrupt = SymmetricReplacement(Tok(), groups={"noun": [" cat", " dog", " hippopotamus"]})
    assert corrupt(torch.tensor([[3, 7, 3]])).tolist() == [[3, 8, 3]]


def test_bad_input(model, prompts):
    with pytest.raises(ValueError, match="differ in shape"):
        activation_patching(model, prompts, prompts[:, :5])
    with pytest.raises(ValueError, match="two different streams"):
        AblateRescue(pairs=[(1, 1)])
    with pytest.raises(IndexError, match="out of range"):
        ablate_and_rescue(model, prompts, sublayers=[99])
    with pytest.raises(IndexError, match="out of range"):
        ablate_and_rescue(model, prompts, pairs=[(0, 4)])
    with pytest.raises(ValueError, match="no meaning"):
        ablate_and_rescue(perturbed_model(tiny_config("none", 1)), prompts)
    with pytest.raises(ValueError, match="needs answers"):
        ActivationPatching(metric="logit_diff")
    with pytest.raises(ValueError, match="corrupt="):
        run_probes(model, ActivationPatching(), prompts, progress=False)
    r = ablate_and_rescue(model, prompts, sublayers=[0], pairs=[(0, 1)])
    with pytest.raises(ValueError, match="two different streams"):
        r.pair_difference(2, 2)
    with pytest.raises(IndexError, match="stream index"):
        logits, states, _ = clean_run(model, prompts)
        run_edits(model, [Edit((0,), ablate=(7,))], states, kl_metric(logits, default_mask(prompts)))


def test_answer_metrics(model, prompts):
    corrupted = prompts.clone()
    corrupted[:, 4] = (corrupted[:, 4] + 7) % 40
    answers = torch.tensor([[1, 2], [3, 4], [5, 6]])
    r = activation_patching(model, prompts, corrupted, metric="logit_diff", answers=answers, sublayers=[0])
    clean = model(prompts)[:, -1]
    np.testing.assert_allclose(
        r["baseline_clean"],
        (clean[:, [1, 3, 5]].diagonal() - clean[:, [2, 4, 6]].diagonal()).mean().item(),
        atol=1e-5,
    )
    r = activation_patching(model, prompts, corrupted, metric="logprob", answers=answers[:, 0], sublayers=[0])
    assert r["logprob_recomputed"].shape == (1, 4) and (r["logprob_recomputed"] < 0).all()


# ------------------------------------------------------------------------- statistics, inputs
def test_prompt_statistics_skip_unscorable_prompts_and_use_student_t():
    """A prompt with nothing to score (NaN) is left out, not counted as 0; the s.e.m. of one prompt
    is undefined (NaN), and the 95% interval uses the t quantile of n - 1 degrees of freedom."""
    from mhc_interp.probes.causal import PromptStats, stats_arrays

    stats = PromptStats()
    stats.add(torch.tensor([[1.0, 2.0, float("nan")], [5.0, float("nan"), float("nan")]]))
    stats.add(torch.tensor([[6.0], [float("nan")]]))
    arrays = stats_arrays("kl", stats)
    values = np.array([1.0, 2.0, 6.0])
    sem = values.std(ddof=1) / np.sqrt(3)
    np.testing.assert_allclose(arrays["kl"], [3.0, 5.0])
    np.testing.assert_allclose(arrays["kl_sem"][0], sem)
    np.testing.assert_allclose(arrays["kl_ci_high"][0] - 3.0, 4.302652729911275 * sem)  # t_{0.975, 2}
    assert np.isnan(arrays["kl_sem"][1]) and np.isnan(arrays["kl_ci_low"][1])  # one prompt
    assert stats.count == 4


def test_a_prompt_with_no_scored_position_is_left_out(model, prompts):
    """Rescue over prompts of which one has every position masked equals rescue without it."""
    from mhc_interp.probes import AblateRescue

    def run(tokens, mask):
        probe = AblateRescue(sublayers=[1, 2])
        probe.setup(model)
        probe.intervene(model, tokens, mask)
        return probe.result()

    mask = default_mask(prompts)
    unscorable = mask.clone()
    unscorable[1] = False
    with_empty = run(prompts, unscorable)
    without = run(prompts[[0, 2]], mask[[0, 2]])
    for key in ("kl_ablated", "kl_rescued", "kl_ablated_sem", "rescue"):
        np.testing.assert_allclose(with_empty[key], without[key], rtol=1e-5, atol=1e-7, equal_nan=True)
    assert with_empty.meta["prompts"] == 3


def test_run_edits_refuses_edits_it_has_no_values_for(model, prompts):
    logits, states, cache = clean_run(model, prompts)
    metric = kl_metric(logits, default_mask(prompts))
    with pytest.raises(
        ValueError, match=r"needs ablation_values at sublayer\(s\) \[2\], which were not given"
    ):
        run_edits(model, [Edit((2,), ablate=(0, 1))], states, metric)
    with pytest.raises(ValueError, match=r"needs source_states at sublayer\(s\) \[3\], which it lacks"):
        run_edits(model, [Edit((2, 3), restore=(1,))], states, metric, source_states={2: states[2]})
    with pytest.raises(ValueError, match=r"needs base_states at sublayer\(s\) \[1\]"):
        run_edits(model, [Edit((1,), restore=(1,))], {0: states[0]}, metric, source_states=states)


def test_results_with_dots_in_their_names_stay_apart(model, prompts, tmp_path):
    hot = ablate_and_rescue(model, prompts, temperature=0.5, sublayers=[0])
    cold = ablate_and_rescue(model, prompts, temperature=0.7, sublayers=[0])
    assert hot.save(tmp_path / "rescue_T0.5").name == "rescue_T0.5.json"
    cold.save(tmp_path / "rescue_T0.7.json")  # an explicit extension is fine too
    from mhc_interp.probes import ProbeResult

    assert ProbeResult.load(tmp_path / "rescue_T0.5").meta["temperature"] == 0.5
    assert ProbeResult.load(tmp_path / "rescue_T0.7.npz").meta["temperature"] == 0.7


def test_one_call_wrappers_split_runner_and_probe_options():
    """The wrappers' keywords: the runner's options (no bar by default) apart from the probe's;
    options that cut a corpus are refused for aligned prompts, by name."""
    from mhc_interp.probes.patching import ALIGNED_OPTIONS
    from mhc_interp.probes.runner import split_options

    runner, probe = split_options({"batch_size": 2, "mixing": "frozen", "seq_len": 8})
    assert runner == {"progress": False, "batch_size": 2, "seq_len": 8} and probe == {"mixing": "frozen"}
    assert split_options({"progress": True})[0] == {"progress": True}
    with pytest.raises(TypeError, match=r"\['max_tokens', 'seq_len'\] do not apply"):
        split_options({"seq_len": 8, "max_tokens": 4, "direction": "noise"}, ALIGNED_OPTIONS)
