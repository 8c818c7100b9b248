"""`contract.MultiStreamModel`: HookedMHC and the HF adapter both implement it, their
`stream_contributions` split their own readout exactly, `forward` returns what its overloads say,
and the causal probes' clean run plus the model's `frozen_mixing` freeze every coefficient the model
has (a learned readout's included) without naming any of them."""

import pytest
import torch

from mhc_interp import HookedMHC
from mhc_interp.contract import MultiStreamModel
from mhc_interp.hooks import is_mixing_hook
from mhc_interp.probes.causal import clean_run

from .conftest import perturbed_model, tiny_config

transformers = pytest.importorskip("transformers")
HAS_DEEPSEEK = hasattr(transformers, "DeepseekV4Config")
MODELS = [
    "HookedMHC",
    pytest.param(
        "HookedHFMHC",
        marks=pytest.mark.skipif(not HAS_DEEPSEEK, reason="this transformers has no DeepSeek-V4"),
    ),
]


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    if request.param == "HookedMHC":  # float64: the split is exact to ~1e-15, not ~1e-7
        return perturbed_model(tiny_config(), seed=0).double()
    from mhc_interp.adapters import HookedHFMHC, tiny_deepseek_v4

    return HookedHFMHC(tiny_deepseek_v4(seed=0))


@pytest.fixture
def toks(model):
    return torch.randint(0, model.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(0))


def tolerance(model) -> dict:
    return dict(atol=1e-10, rtol=1e-10) if model.dtype == torch.float64 else dict(atol=1e-5, rtol=1e-4)


def test_models_implement_the_contract(model):
    assert isinstance(model, MultiStreamModel)


def test_a_model_without_a_member_does_not():
    class NoContributions(HookedMHC):
        stream_contributions = None

    assert not isinstance(NoContributions(tiny_config()), MultiStreamModel)


def test_forward_returns_what_its_overloads_say(model, toks):
    b, p = toks.shape
    n, d, n_sub = model.cfg.n_streams, model.cfg.d_model, model.cfg.n_sublayers
    with torch.no_grad():
        logits = model(toks)
        loss = model(toks, return_type="loss")
        both = model(toks, return_type="both")
        state = model(toks, stop_at_sublayer=n_sub)
        assert model(toks, return_type=None) is None
        resumed = model.forward(state, "logits", start_at_sublayer=n_sub, tokens=toks)
    assert logits.shape == (b, p, model.cfg.d_vocab) and loss.ndim == 0
    assert isinstance(both, tuple) and torch.equal(both[0], logits) and torch.equal(both[1], loss)
    assert state.shape == (b, p, n, d)
    torch.testing.assert_close(resumed, logits, **tolerance(model))


def test_stream_contributions_sum_to_the_models_logits(model, toks):
    with torch.no_grad():
        logits = model(toks)
        final = model(toks, stop_at_sublayer=model.cfg.n_sublayers)  # [b, p, n, d]
        c = model.stream_contributions(final, dtype=model.dtype)  # [b, p, n, vocab]
    assert c.shape == (*final.shape[:3], model.cfg.d_vocab)
    torch.testing.assert_close(c.sum(-2), logits, **tolerance(model))
    assert not torch.allclose(c[:, :, 0], c[:, :, 1])  # a real split, not n copies of logits / n


def test_hooked_mhc_stream_contribution_is_its_streams_own_readout():
    """c_s = W_U^T LN_f(x_s), against the model's own LayerNorm module, stream by stream."""
    model = perturbed_model(tiny_config(), seed=1).double()
    toks = torch.randint(0, model.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        final = model(toks, stop_at_sublayer=model.cfg.n_sublayers)
        c = model.stream_contributions(final, dtype=torch.float64)
        for s in range(model.cfg.n_streams):
            torch.testing.assert_close(
                c[:, :, s], model.ln_final(final[:, :, s]) @ model.W_U, atol=1e-12, rtol=0
            )
    assert model.stream_contributions(final).dtype == torch.float32


def test_clean_run_and_frozen_mixing_freeze_every_coefficient(model, toks):
    """The clean run caches each mixing hook the model has (HF: the hc_head's read weights too);
    inside `model.frozen_mixing(cache)`, with every state after the embedding edited, each of them
    still holds its clean value - the readout's too, so the ablation cannot re-weight it."""
    _, _, cache = clean_run(model, toks)
    mixing = sorted(n for n in cache if not n.endswith("hook_streams_in"))
    assert set(mixing) == {n for n in model.hook_dict if is_mixing_hook(n)}
    edit = [(f"{model.sublayer_names[0]}.hook_streams_in", lambda x, hook: x + x.roll(1, dims=-1))]
    with torch.no_grad(), model.frozen_mixing(cache), model.hooks(fwd_hooks=edit):
        _, edited = model.run_with_cache(toks, names_filter=mixing)
    for name in mixing:
        torch.testing.assert_close(edited[name], cache[name], atol=0, rtol=0, msg=name)
    with torch.no_grad(), model.hooks(fwd_hooks=edit):
        _, unfrozen = model.run_with_cache(toks, names_filter=mixing)
    assert not torch.allclose(unfrozen[mixing[-1]], cache[mixing[-1]])  # the edit does reach them
