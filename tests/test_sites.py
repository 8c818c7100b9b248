"""The one site vocabulary (mhc_interp.probes.sites): every spec form, the same defaults in every
probe, clear errors, and the shared collecting forward."""

import copy

import pytest
import torch

from mhc_interp.hooks.names import HookNameError
from mhc_interp.probes import CKA, CrossStreamPredictability, Curvature, LogitLens, run_probes
from mhc_interp.probes.crosscoder_buffer import ActivationBuffer
from mhc_interp.probes.runner import iter_activations
from mhc_interp.probes.sites import (
    DEFAULT_SITES,
    evenly_spaced,
    forward_sites,
    last_sublayer_needed,
    resolve_sites,
    site_hooks,
    site_label,
)

from .conftest import perturbed_model, tiny_config

OUT = "hook_streams_out"


@pytest.fixture(scope="module")
def model():
    return perturbed_model(tiny_config("mhc", n_layers=5), seed=0)


def test_each_spec_form(model):
    L = model.cfg.n_layers
    assert site_hooks(model, "layers") == ["hook_streams_init"] + [f"blocks.{l}.mlp.{OUT}" for l in range(L)]
    assert site_hooks(model, "sublayers") == ["hook_streams_init"] + [
        f"blocks.{l}.{k}.{OUT}" for l in range(L) for k in ("attn", "mlp")
    ]
    assert site_hooks(model, 3) == [f"blocks.{l}.mlp.{OUT}" for l in (0, 2, 4)]
    assert site_hooks(model, 99) == [f"blocks.{l}.mlp.{OUT}" for l in range(L)]
    names = [f"blocks.3.attn.{OUT}", "blocks.1.mlp.hook_streams_in", "hook_streams_init"]
    assert site_hooks(model, names) == names  # the order given
    assert site_hooks(model, tuple(names)) == names
    assert site_hooks(model, None) == site_hooks(model, DEFAULT_SITES) == site_hooks(model, "layers")


def test_stream_pairs(model):
    n = model.cfg.n_streams
    assert resolve_sites(model, 2) == [(f"blocks.{l}.mlp.{OUT}", s) for l in (0, 4) for s in range(n)]
    assert resolve_sites(model, [f"blocks.0.mlp.{OUT}", (f"blocks.2.attn.{OUT}", 3)]) == (
        [(f"blocks.0.mlp.{OUT}", s) for s in range(n)] + [(f"blocks.2.attn.{OUT}", 3)]
    )
    assert len(resolve_sites(model, "sublayers")) == (2 * model.cfg.n_layers + 1) * n


def test_same_defaults_in_every_probe(model):
    tokens = torch.randint(0, model.cfg.d_vocab, (4, 12), generator=torch.Generator().manual_seed(0))
    expected = site_hooks(model, None)
    res = run_probes(
        model,
        [
            CKA(minibatch_tokens=8),
            Curvature(),
            LogitLens(writes=False),
            CrossStreamPredictability(max_tokens=40),
        ],
        tokens,
        progress=False,
    )
    assert res["cka"].site_names == expected
    assert res["curvature"].meta["site_names"] == expected
    assert res["logit_lens"].meta["sites"] == expected
    assert res["predictability"].meta["sites"] == expected
    labels = [site_label(s) for s in expected]
    assert labels[:2] == ["embed", "blocks.0.mlp"]
    for r in (res["curvature"], res["logit_lens"], res["predictability"]):
        assert r.meta["site_labels"] == labels


def test_every_probe_takes_every_form(model):
    """CKA used to refuse "sublayers"; every probe now takes each form and resolves it the same."""
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    for spec in ("sublayers", 2, [f"blocks.1.attn.{OUT}", "hook_streams_init"]):
        expected = site_hooks(model, spec)
        res = run_probes(
            model,
            [
                CKA(sites=spec, minibatch_tokens=8),
                Curvature(sites=spec),
                LogitLens(sites=spec, writes=False),
                CrossStreamPredictability(sites=spec, max_tokens=22),
            ],
            tokens,
            progress=False,
        )
        assert res["cka"].site_names == expected
        assert res["cka"]["cka"].shape == (len(expected) * model.cfg.n_streams,) * 2
        assert res["curvature"].meta["site_names"] == expected
        assert res["logit_lens"].meta["sites"] == expected
        assert res["predictability"].meta["sites"] == expected
        buf = ActivationBuffer(model, tokens, spec, buffer_tokens=8)
        assert buf.hook_names == expected


def test_errors(model):
    with pytest.raises(HookNameError, match="Did you mean"):
        site_hooks(model, ["blocks.0.mlp.hook_stream_out"])
    with pytest.raises(ValueError, match="stream states.*hook_write"):
        site_hooks(model, ["blocks.0.mlp.hook_write"])
    with pytest.raises(ValueError, match="duplicate"):
        site_hooks(model, ["hook_streams_init", "hook_streams_init"])
    with pytest.raises(ValueError, match="empty"):
        site_hooks(model, [])
    with pytest.raises(ValueError, match=">= 1"):
        site_hooks(model, 0)
    with pytest.raises(TypeError, match="hook-name strings"):
        site_hooks(model, [3])
    for probe in (CKA, Curvature, LogitLens, CrossStreamPredictability):  # at construction
        with pytest.raises(ValueError, match="sites must be 'layers', 'sublayers', an int"):
            probe(sites="everything")
    with pytest.raises(ValueError, match="stream index out of range"):
        resolve_sites(model, [(f"blocks.0.mlp.{OUT}", 4)])
    with pytest.raises(TypeError, match="stream must be an int"):
        resolve_sites(model, [(f"blocks.0.mlp.{OUT}", True)])


def test_evenly_spaced_and_labels():
    assert evenly_spaced(36, 4) == [0, 12, 23, 35]
    assert evenly_spaced(3, 8) == [0, 1, 2]
    assert evenly_spaced(10, 1) == [0] and evenly_spaced(0, 4) == []
    assert site_label("hook_streams_init") == "embed"
    assert site_label(f"blocks.3.attn.{OUT}") == "blocks.3.attn"
    assert site_label("blocks.3.attn.hook_res_mix") == "blocks.3.attn.hook_res_mix"
    assert site_label((f"blocks.3.mlp.{OUT}", 2)) == "blocks.3.mlp/s2"


def test_forward_sites_stops_early_and_checks_values(model):
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(2))
    names = ["hook_streams_init", f"blocks.1.attn.{OUT}"]
    assert last_sublayer_needed(model, names) == 3
    assert last_sublayer_needed(model, names + ["hook_logits"]) is None
    acts = forward_sites(model, tokens, names)
    _, cache = model.run_with_cache(tokens, names_filter=names)
    for n in names:
        torch.testing.assert_close(acts[n], cache[n], rtol=0, atol=0)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.get_submodule("blocks.0.attn").ln.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=f"blocks.0.attn.{OUT}"):
        forward_sites(broken, tokens, ["hook_streams_init", f"blocks.0.attn.{OUT}"])


def test_iter_activations_budget_and_mask(model):
    tokens = torch.randint(0, model.cfg.d_vocab, (5, 6), generator=torch.Generator().manual_seed(3))
    out = list(iter_activations(model, tokens, [f"blocks.0.mlp.{OUT}"], batch_size=2, max_tokens=15))
    assert [n for _, _, n, _ in out] == [12, 3]  # cut to the budget
    assert [tuple(m.shape) for _, m, _, _ in out] == [(2, 6), (1, 6)]
    assert not out[0][1][:, 0].any() and int(out[1][1].sum()) == 2  # position 0 and the cut masked
    assert all(not acts for *_, acts in iter_activations(model, tokens, [], batch_size=5))  # no forward
