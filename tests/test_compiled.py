"""`HookedMHC.compile()`: the compiled fast path computes what the eager model computes, and every
way of looking inside a sublayer (TransformerLens hooks attached after compiling, torch hooks,
nnsight) still sees and changes the run - the hazard of a plain `torch.compile(model)`, whose
graphs silently skip hooks added later.

Compiling is most of this module's time (inductor on a CPU, ~10-60 s a graph on 2 cores), so every
test shares one compiled model and one token shape (conftest's `compile_test_config` and
COMPILE_SHAPE), and the module compiles as few graphs as it can: static shapes only (no dynamic
re-trace), a 3-iteration Sinkhorn, and the mHC-lite model of the last test has the same shapes, so
it shares `apply`'s graphs and compiles only its own mixer."""

import numpy as np
import pytest
import torch

from mhc_interp.hooks import is_mixing_hook
from mhc_interp.model.compiled import compile_once, module_observed
from mhc_interp.model.sublayer import BOUNDARY_HOOKS
from mhc_interp.probes import ablate_and_rescue

from .conftest import COMPILE_SHAPE as SHAPE
from .conftest import compile_test_config, perturbed_model

TOL = dict(atol=1e-5, rtol=1e-5)


# SHAPE: [batch, pos] of every forward here but those at SWEEP_SHAPE. The one-shot rescue sweep of
# SHAPE's 3 prompts runs its 10 interventions per sublayer (n = 4: 6 pairs, 4 singles) as one batch
# of 30; the check that a new shape re-traces uses that shape too.
SWEEP_SHAPE = (30, 9)


@pytest.fixture(scope="module", autouse=True)
def static_shapes():
    """A new shape compiles a static graph (no automatic dynamic-shape re-trace, which here only
    added graphs: one dynamic graph per function and grad mode, and a re-trace after it)."""
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        yield


@pytest.fixture(scope="module")
def models(static_shapes):
    """(eager, compiled) copies of one perturbed model: the compiled one has run once already,
    so hooks attached afterwards meet existing graphs."""
    eager = perturbed_model(compile_test_config(), seed=3)
    fast = perturbed_model(compile_test_config(), seed=3).compile()
    with torch.no_grad():
        fast(torch.zeros(SHAPE, dtype=torch.long))
    return eager, fast


@pytest.fixture
def toks():
    torch.manual_seed(7)
    return torch.randint(0, 40, SHAPE)


def uses_compiled_apply(model) -> list:
    """Which sublayers would take the compiled `apply` right now."""
    return [sub.compiled and not sub.interior_observed() for sub in model.sublayers]


def test_compiled_forward_matches_eager(models, toks):
    eager, fast = models
    assert all(uses_compiled_apply(fast)) and not any(uses_compiled_apply(eager))
    with torch.no_grad():
        torch.testing.assert_close(fast(toks), eager(toks), **TOL)
        # a new batch size (dynamo re-traces for the new shape) and a resumed run
        other = torch.randint(0, 40, SWEEP_SHAPE)
        torch.testing.assert_close(fast(other), eager(other), **TOL)
        state = eager(toks, stop_at_sublayer=2)
        torch.testing.assert_close(fast(state, start_at_sublayer=2), eager(state, start_at_sublayer=2), **TOL)


def test_boundary_hooks_stay_compiled_and_see_the_same_values(models, toks):
    eager, fast = models
    boundary = lambda n: n.endswith(BOUNDARY_HOOKS)  # streams in/out, H_pre/H_post/H_res  # noqa: E731
    ref_logits, ref = eager.run_with_cache(toks, names_filter=boundary)
    seen = []
    with fast.hooks(fwd_hooks=[(boundary, lambda x, hook: seen.append(all(uses_compiled_apply(fast))))]):
        fast(toks)
    assert seen and all(seen)  # the hooks fired, and the interiors stayed compiled
    logits, cache = fast.run_with_cache(toks, names_filter=boundary)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    assert set(cache) == set(ref) and len(cache) == 5 * len(fast.sublayers)
    for name in ref:
        torch.testing.assert_close(cache[name], ref[name], **TOL)


def test_compiled_mixers_match_eager_and_keep_hooks(models, toks):
    """`compile_mixers()`: only the coefficient maths compiled; the mixing hooks see its output."""
    eager, fast = models
    ref, ref_cache = eager.run_with_cache(toks, names_filter=is_mixing_hook)
    fast.compile(False).compile_mixers()
    try:
        assert not any(uses_compiled_apply(fast)) and all(s.mixer.compiled for s in fast.sublayers)
        compiled, cache = fast.run_with_cache(toks, names_filter=is_mixing_hook)
        torch.testing.assert_close(compiled, ref, **TOL)
        for name in ref_cache:
            torch.testing.assert_close(cache[name], ref_cache[name], **TOL)
        with fast.frozen_mixing(cache):  # frozen runs never call the mixers
            assert torch.equal(fast(toks), compiled)
        fast.compile_mixers(False)
        assert not any(s.mixer.compiled for s in fast.sublayers)
    finally:
        fast.compile()
    assert all(uses_compiled_apply(fast))


@pytest.mark.parametrize(
    "hook_name",
    ["blocks.0.attn.hook_q", "blocks.1.mlp.hook_post", "blocks.1.attn.hook_write", "blocks.0.mlp.hook_read"],
)
def test_interior_hook_added_after_compiling_fires_and_changes_the_run(models, toks, hook_name):
    eager, fast = models
    flip = lambda x, hook: x.flip(-1)  # noqa: E731  (not a rescaling: LayerNorm would undo that)
    expected = eager.run_with_hooks(toks, fwd_hooks=[(hook_name, flip)])
    out = fast.run_with_hooks(toks, fwd_hooks=[(hook_name, flip)])
    torch.testing.assert_close(out, expected, **TOL)
    assert not torch.allclose(out, eager(toks), atol=1e-3)  # the hook really changed the output
    assert all(uses_compiled_apply(fast))  # nothing stayed attached


def test_only_the_observed_sublayer_runs_eagerly(models):
    _, fast = models
    with fast.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", lambda x, hook: x)]):
        assert uses_compiled_apply(fast) == [True, True, False, True]


def test_torch_hooks_inside_a_sublayer_are_respected(models, toks):
    eager, fast = models
    outputs = {}
    for model in (eager, fast):
        handle = model.blocks[1].mlp.c_fc.register_forward_hook(lambda m, i, o: o * 0)
        try:
            if model is fast:
                assert uses_compiled_apply(fast) == [True, True, True, False]
            outputs[model is fast] = model(toks)
        finally:
            handle.remove()
    torch.testing.assert_close(outputs[True], outputs[False], **TOL)
    # hooks registered for every module reach inside compiled regions only by running eagerly
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert not any(uses_compiled_apply(fast))
    finally:
        handle.remove()
    assert all(uses_compiled_apply(fast))


def test_hooks_are_removed_after_an_exception(models, toks):
    _, fast = models

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fast.run_with_hooks(toks, fwd_hooks=[("blocks.0.attn.hook_z", boom)])
    assert not any(module_observed(hp) for hp in fast.hook_dict.values())
    assert all(uses_compiled_apply(fast))


def test_frozen_rescue_sweep_matches_eager(models, toks):
    """The batched causal sweeps run compiled: frozen coefficients enter `apply` as arguments,
    edits are hooks on hook_streams_in (outside the compiled region)."""
    eager, fast = models
    kw = dict(mode="one_shot", ablation="zero", batch_size=SHAPE[0])
    ref = ablate_and_rescue(eager, toks, **kw)
    res = ablate_and_rescue(fast, toks, **kw)
    for key in ("kl_ablated", "kl_rescued"):
        np.testing.assert_allclose(res[key], ref[key], atol=1e-5, rtol=1e-4)


def test_gradients_match_eager(models, toks):
    eager, fast = models
    grads = []
    for model in (eager, fast):
        model.zero_grad()
        model(toks, return_type="loss").backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-4)


def test_compile_can_be_switched_off(toks):
    model = perturbed_model(compile_test_config("mhc_lite"), seed=4)
    with torch.no_grad():
        ref = model(toks)
        model.compile()
        torch.testing.assert_close(model(toks), ref, **TOL)
        model.compile(False)
        assert not any(s.compiled or s.mixer.compiled for s in model.sublayers)
        assert torch.equal(model(toks), ref)


# two functions with their own code objects (dynamo caches graphs per code object)
FRESH_FUNCTIONS = {"per-region limit": lambda x: 2 * x, "torch without per-region limits": lambda x: 2 * x}


@pytest.mark.parametrize("torch_kind", list(FRESH_FUNCTIONS))
def test_compiled_regions_get_their_graph_limit_and_leave_torchs_alone(monkeypatch, torch_kind):
    """compile_once's regions may compile more graphs than torch's process-wide `recompile_limit`
    (3 shapes under a global limit of 1), and that limit is the same afterwards - with a
    `torch.compile(recompile_limit=)` and with a torch without it (the limit is raised around each
    call). The eager backend stands in for inductor: what counts is dynamo's graph count."""
    real_compile = torch.compile

    def fake_compile(fn, **kwargs):
        if "recompile_limit" in kwargs and torch_kind != "per-region limit":
            raise TypeError("compile() got an unexpected keyword argument 'recompile_limit'")
        return real_compile(fn, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", fake_compile)
    stats = torch._dynamo.utils.counters["stats"]
    with torch._dynamo.config.patch(recompile_limit=1, automatic_dynamic_shapes=False):
        before = stats["unique_graphs"]
        double = compile_once(FRESH_FUNCTIONS[torch_kind])
        for n in (1, 2, 3):
            assert torch.equal(double(torch.ones(n)), torch.full((n,), 2.0))
        assert stats["unique_graphs"] - before == 3
        assert torch._dynamo.config.recompile_limit == 1


def test_compiled_model_leaves_torchs_recompile_limit_alone(models, toks):
    limit = torch._dynamo.config.recompile_limit
    with torch.no_grad():
        models[1](toks)
    assert torch._dynamo.config.recompile_limit == limit == 8  # torch's default: nothing raised it
