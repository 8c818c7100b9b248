"""Causal probes, fixes from the method audit (issue 14 items 4-6, issue 19 item 9): a float64
model is scored in float64; the helpers take the runner's options (the position-0 mask among
them); a corpus-mean ablation does not depend on the batch size; NaN weights raise, they do not
return NaN arrays."""

import numpy as np
import pytest
import torch

from mhc_interp.probes import (
    AblateRescue,
    ActivationPatching,
    StreamUsage,
    ablate_and_rescue,
    activation_patching,
    run_probes,
)
from mhc_interp.probes.causal import kl_metric, log_probs, logit_diff_metric

from .conftest import perturbed_model, tiny_config
from .test_causal import model, naive_patching, naive_rescue, prompts  # noqa: F401  (fixtures)


def corrupt(prompts):
    corrupted = prompts.clone()
    corrupted[:, 4] = (corrupted[:, 4] + 7) % 40
    return corrupted


# ------------------------------------------------------------------------------ float64 (14.4)
def test_float64_model_is_scored_in_float64(prompts):
    """A float64 model's damage, rescue and patching KL equal a float64 naive loop to ~1e-12 (in
    float32 they agreed to ~1e-7 relative only); float32 and bf16 logits are still scored in float32."""
    model = perturbed_model(tiny_config("mhc"), seed=5).double()
    ablated, rescued = naive_rescue(model, prompts, "one_shot")
    r = ablate_and_rescue(model, prompts, batch_size=2)
    np.testing.assert_allclose(r["kl_ablated"], ablated, rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(r["kl_rescued"], rescued, rtol=1e-11, atol=1e-14)
    corrupted = corrupt(prompts)
    p = activation_patching(model, prompts, corrupted, batch_size=2)
    np.testing.assert_allclose(
        p["kl_recomputed"], naive_patching(model, prompts, corrupted, False), rtol=1e-11, atol=1e-14
    )
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    assert log_probs(logits).dtype == torch.float64
    assert kl_metric(logits, torch.ones(2, 3, dtype=torch.bool))(logits[None]).dtype == torch.float64
    assert logit_diff_metric(torch.tensor([[0, 1], [2, 3]]))(logits[None]).dtype == torch.float64
    for low in (torch.float32, torch.bfloat16, torch.float16):
        assert log_probs(logits.to(low)).dtype == torch.float32
        assert (
            kl_metric(logits.to(low), torch.ones(2, 3, dtype=torch.bool))(logits[None].to(low)).dtype
            == torch.float32
        )


# ------------------------------------------------------------------------- runner options (14.5)
def test_helpers_take_the_runner_options(model, prompts):
    """exclude_first (and the runner's other options) reach the helpers: exclude_first=0 scores
    position 0 too, exactly as the probe given an all-True mask."""
    every = torch.ones(prompts.shape, dtype=torch.bool)
    probe = AblateRescue(sublayers=[1, 2])
    probe.setup(model)
    probe.intervene(model, prompts, every)
    r = ablate_and_rescue(
        model,
        prompts,
        sublayers=[1, 2],
        exclude_first=0,
        batch_size=3,
        max_tokens=24,
        seq_len=8,
        progress=False,
    )
    np.testing.assert_allclose(r["kl_ablated"], probe.result()["kl_ablated"], rtol=1e-6, atol=1e-9)
    default = ablate_and_rescue(model, prompts, sublayers=[1, 2])
    assert np.nanmax(np.abs(default["kl_ablated"] - r["kl_ablated"])) > 1e-4  # the mask changes the numbers
    corrupted = corrupt(prompts)
    p = activation_patching(model, prompts, corrupted, exclude_first=0, batch_size=2, progress=False)
    np.testing.assert_allclose(
        p["kl_recomputed"], naive_patching(model, prompts, corrupted, False, every), rtol=1e-4, atol=1e-6
    )
    first3 = activation_patching(model, prompts, corrupted, exclude_first=3, sublayers=[0])
    mask = every.clone()
    mask[:, :3] = False
    np.testing.assert_allclose(
        first3["kl_recomputed"],
        naive_patching(model, prompts, corrupted, False, mask)[:1],
        rtol=1e-4,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="exclude_first must be a non-negative int"):
        activation_patching(model, prompts, corrupted, exclude_first=-1)
    with pytest.raises(TypeError, match="seq_len"):
        activation_patching(model, prompts, corrupted, seq_len=4)


# ---------------------------------------------------------------------------- corpus mean (14.6)
def test_corpus_mean_ablation_does_not_depend_on_the_batch_size(model, prompts):
    """ablation="corpus_mean": per sublayer and stream, the mean state over every masked token of
    the corpus (a first pass, float64 accumulation), so damage and rescue are the same whatever
    the batch size - unlike "mean" (the batch's own mean)."""
    from mhc_interp.probes.corpus_mean import corpus_mean

    torch.manual_seed(3)
    tokens = torch.randint(0, 40, (5, 8))
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_streams_in"))
    mask = torch.ones(tokens.shape, dtype=torch.bool)
    mask[:, 0] = False
    naive = torch.stack([cache[f"{s}.hook_streams_in"][mask].double().mean(0) for s in model.sublayer_names])
    means = corpus_mean(model, tokens, batch_size=2)
    assert means.shape == (model.cfg.n_sublayers, model.cfg.n_streams, model.cfg.d_model)
    assert means.dtype == torch.float64
    torch.testing.assert_close(means, naive, rtol=1e-6, atol=1e-7)

    runs = {
        b: ablate_and_rescue(model, tokens, ablation="corpus_mean", batch_size=b, min_kl=0) for b in (1, 2, 5)
    }
    for b in (2, 5):
        for key in ("kl_ablated", "kl_rescued", "rescue"):
            np.testing.assert_allclose(runs[b][key], runs[1][key], rtol=1e-5, atol=1e-7)
    assert runs[1].meta["ablation"] == "corpus_mean" and runs[1].meta["corpus_mean_tokens"] == 5 * 7
    batch_mean = {
        b: ablate_and_rescue(model, tokens, ablation="mean", batch_size=b, min_kl=0) for b in (1, 5)
    }
    assert np.nanmax(np.abs(batch_mean[1]["kl_ablated"] - batch_mean[5]["kl_ablated"])) > 1e-3  # the problem
    np.testing.assert_allclose(
        runs[5]["kl_ablated"], batch_mean[5]["kl_ablated"], rtol=1e-5
    )  # one batch: same
    # the probe run directly needs its first pass; it says how to get it
    with pytest.raises(ValueError, match="corpus_mean.*fit_corpus_mean"):
        run_probes(model, AblateRescue(ablation="corpus_mean"), tokens, progress=False)
    probe = AblateRescue(ablation="corpus_mean", sublayers=[1])
    probe.fit_corpus_mean(model, tokens, batch_size=4)
    direct = run_probes(model, probe, tokens, batch_size=2, progress=False)
    np.testing.assert_allclose(direct["kl_ablated"], runs[1]["kl_ablated"][1:2], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ NaN weights (19.9)
def test_nan_weights_raise_like_run_probes(prompts):
    """A model with NaN weights: the causal helpers and the runner with a causal probe raise the
    runner's FloatingPointError, naming the run whose logits are non-finite."""
    model = perturbed_model(tiny_config("mhc"), seed=5)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        run_probes(model, StreamUsage(), prompts, progress=False)  # observational: raises
    with pytest.raises(FloatingPointError, match="non-finite .* clean run's logits"):
        ablate_and_rescue(model, prompts)
    with pytest.raises(FloatingPointError, match="non-finite .* clean run's logits"):
        run_probes(
            model, AblateRescue(sublayers=[0]), prompts, progress=False
        )  # `mhc-interp probe ablate_rescue`
    with pytest.raises(FloatingPointError, match="non-finite"):
        activation_patching(model, prompts, corrupt(prompts))
    probe = ActivationPatching()  # the CLI's patching path
    probe.setup(model)
    with pytest.raises(FloatingPointError, match="non-finite"):
        probe.patch(model, prompts, corrupt(prompts))
