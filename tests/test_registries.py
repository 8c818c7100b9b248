"""Registries are the source of truth and refuse collisions: a second class under a taken name is
an error naming both, never a silent replacement of the built-in."""

import numpy as np
import pytest
import torch
from torch import nn

from mhc_interp import HookedMHC, MHCConfig
from mhc_interp.config import ConfigError
from mhc_interp.hooks import is_mixing_hook
from mhc_interp.model.mixers import MIXERS, Mixer, register_mixer
from mhc_interp.model.mixers.base import normed_projection
from mhc_interp.model.mixers.mhc import SinkhornMixer
from mhc_interp.model.mixers.mhc_lite import LSSPermutationMixer
from mhc_interp.probes import (
    PROBES,
    Probe,
    ProbeResult,
    StreamUsage,
    ablate_and_rescue,
    activation_patching,
    register_probe,
    register_result,
)
from mhc_interp.probes.base import RESULTS

from .conftest import perturbed_model, tiny_config


def test_a_probe_name_taken_by_a_builtin_is_refused():
    class MyUsage(Probe):
        name = "stream_usage"

    with pytest.raises(
        ValueError,
        match="probe 'stream_usage' is already registered by mhc_interp.probes.stream_usage.StreamUsage",
    ):
        register_probe(MyUsage)
    assert PROBES["stream_usage"] is StreamUsage


def test_a_result_class_name_taken_is_refused_and_a_new_one_registers():
    before = RESULTS["StreamUsageResult"]

    class StreamUsageResult(ProbeResult):
        pass

    with pytest.raises(ValueError, match="result class 'StreamUsageResult' is already registered"):
        register_result(StreamUsageResult)
    assert RESULTS["StreamUsageResult"] is before

    class FreshProbe(Probe):
        name = "fresh_probe_for_the_registry_test"

    try:
        assert (
            register_probe(FreshProbe) is FreshProbe and register_probe(FreshProbe) is FreshProbe
        )  # idempotent
        assert PROBES[FreshProbe.name] is FreshProbe
    finally:
        PROBES.pop(FreshProbe.name)


# ------------------------------------------------------------------ mixers: a variant is one file
# A user's variant, defined here - outside the package - exactly as a file under
# mhc_interp/model/mixers/ would define it: nothing else (config, loading, hooks, freezing, sweeps)
# lists the variants.
@register_mixer("toy_softmax")
class ToySoftmaxMixer(Mixer):
    """H_res a softmax over sources of static + dynamic logits (rows sum to 1, columns need not),
    H_pre a softmax over streams, H_post 2 sigmoid (its static part favours stream `init_stream`,
    which breaks the symmetry of the copied streams)."""

    max_streams = 6  # a per-variant fact MHCConfig reads

    def __init__(self, cfg, init_stream: int = 0):
        super().__init__(cfg, init_stream)
        n, d = cfg.n_streams, cfg.d_model
        self.static_res = nn.Parameter(4 * torch.eye(n))
        self.static_pre = nn.Parameter(torch.zeros(n))
        self.static_post = nn.Parameter(-torch.ones(n).index_fill_(0, torch.tensor(init_stream % n), 1.0))
        self.dynamic_fn = nn.Parameter(torch.randn(d, n) / d**0.5)  # data-dependent from the start
        self.norm_gamma = nn.Parameter(torch.zeros(d))

    @staticmethod
    def compute(x, w, n, iters):  # x [batch, pos, n, d]
        dyn = normed_projection(x, w["norm_gamma"], w["dynamic_fn"])  # [b, p, s, t]
        h_res = torch.softmax(w["static_res"] + dyn.transpose(-1, -2), dim=-1)  # [b, p, t, s]
        diagonal = dyn.diagonal(dim1=-2, dim2=-1)  # [b, p, n]
        h_pre = torch.softmax(w["static_pre"] + diagonal, dim=-1)
        h_post = 2 * torch.sigmoid(w["static_post"] - diagonal)
        return h_pre, h_post, h_res.contiguous()


def test_a_mixer_registered_outside_the_package_loads_hooks_freezes_and_sweeps(tmp_path):
    assert MIXERS["toy_softmax"] is register_mixer("toy_softmax")(ToySoftmaxMixer)  # re-registering: fine
    cfg = tiny_config("toy_softmax", n_streams=3)
    with pytest.raises(
        ConfigError,
        match=r"'toy_softmax' \(tests.test_registries.ToySoftmaxMixer\) "
        r"takes at most n_streams=6, got 7",
    ):
        tiny_config("toy_softmax", n_streams=7)
    model = perturbed_model(cfg, seed=3)
    assert all(isinstance(sub.mixer, ToySoftmaxMixer) for sub in model.sublayers)
    torch.manual_seed(0)
    clean = torch.randint(0, cfg.d_vocab, (4, 8))
    corrupted = clean.clone()
    corrupted[:, 3] = (corrupted[:, 3] + 1) % cfg.d_vocab

    # saved and loaded (the config names the variant; loading looks it up in the registry)
    model.save_pretrained(tmp_path / "toy")
    loaded = HookedMHC.from_pretrained(tmp_path / "toy")
    assert loaded.cfg == cfg
    torch.testing.assert_close(loaded(clean), model(clean), atol=0, rtol=0)

    # hooked: its coefficients at the boundary hook points, as the mixer computes them
    logits, cache = model.run_with_cache(clean, names_filter=lambda n: is_mixing_hook(n) or n.endswith("_in"))
    torch.testing.assert_close(logits, model(clean))
    for sub in model.sublayers:
        h_res = cache[f"{sub.name}.hook_h_res"]
        assert h_res.shape == (4, 8, 3, 3)
        torch.testing.assert_close(h_res.sum(-1), torch.ones(4, 8, 3))
        torch.testing.assert_close(h_res, sub.mixer(cache[f"{sub.name}.hook_streams_in"]).h_res)

    # frozen: a corrupted run keeps the clean run's mixing (which, recomputed, differs)
    _, corr_cache = model.run_with_cache(corrupted, names_filter=is_mixing_hook)
    late = "blocks.1.mlp.hook_h_res"
    assert not torch.allclose(corr_cache[late][:, 3:], cache[late][:, 3:])
    with model.frozen_mixing(cache):
        _, frozen_cache = model.run_with_cache(corrupted, names_filter=is_mixing_hook)
    torch.testing.assert_close(frozen_cache[late], cache[late], atol=0, rtol=0)

    # swept: the causal probes run on it, recomputing or freezing its mixing
    rescue = ablate_and_rescue(model, clean, batch_size=2, min_kl=0.0)
    assert rescue["kl_ablated"].shape == (cfg.n_sublayers, 3, 3)
    ablated = rescue["kl_ablated"][:, ~np.eye(3, dtype=bool)]
    assert np.isfinite(ablated).all() and (ablated > 0).all()
    patching = activation_patching(model, clean, corrupted, mixing="both", batch_size=2)
    routing = [k for k in patching.arrays if k.endswith("_routing")]
    assert routing and patching[routing[0]].shape == (cfg.n_sublayers, 3)
    assert np.abs(patching[routing[0]]).max() > 0  # freezing its mixing changes the effect


def test_the_config_takes_the_registered_variants_and_their_facts():
    shapes = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=40)
    toy = MHCConfig.from_nanogpt_args(
        dict(shapes, hyper_conn_type="toy_softmax", hyper_conn_n=3, expand_lss_init=0.5)
    )  # read only by a stream-scaling variant
    assert (toy.hyper_conn_type, toy.n_streams, toy.lss_init) == ("toy_softmax", 3, None)
    with pytest.raises(ConfigError, match="unknown hyper_conn_type 'kromhc'; known types: hc, .*toy_softmax"):
        MHCConfig(hyper_conn_type="kromhc")
    with pytest.raises(
        ConfigError,
        match=r"'none' \(mhc_interp.model.mixers.residual.ResidualMixer\) needs "
        r"n_streams=1, got 2",
    ):
        MHCConfig(hyper_conn_type="none", n_streams=2)
    with pytest.raises(ConfigError, match=r"'mhc_lite_lss' .* takes at most n_streams=8, got 9"):
        MHCConfig(hyper_conn_type="mhc_lite_lss", n_streams=9, d_model=32, n_heads=2)
    assert MHCConfig(hyper_conn_type="mhc_lite_lss").lss_init == LSSPermutationMixer.default_lss_init == 0.6
    assert MHCConfig(hyper_conn_type="mhc_lite", lss_init=0.3).lss_init == 0.3
    iters = {
        name: HookedMHC(tiny_config(name, cls.n_streams_required or 2, sinkhorn_iters=7))
        .sublayers[0]
        .mixer.sinkhorn_iters
        for name, cls in MIXERS.items()
    }
    assert iters == {name: 7 if name == "mhc" else 0 for name in MIXERS}  # only Sinkhorn's compute gets them


def test_a_different_class_under_a_builtin_mixer_name_is_refused():
    class MyMHC(SinkhornMixer):
        pass

    with pytest.raises(
        ValueError,
        match=r"mixer 'mhc' is already registered by "
        r"mhc_interp.model.mixers.mhc.SinkhornMixer; give "
        r"tests.test_registries.test_a_different_class_under_a_builtin_"
        r"mixer_name_is_refused.<locals>.MyMHC another name",
    ):
        register_mixer("mhc")(MyMHC)
    assert MIXERS["mhc"] is SinkhornMixer and register_mixer("mhc")(SinkhornMixer) is SinkhornMixer
    assert tiny_config("mhc").hyper_conn_type == "mhc" and isinstance(
        HookedMHC(tiny_config("mhc")).sublayers[0].mixer, SinkhornMixer
    )


def test_a_mixer_under_several_names_takes_none_of_them_if_one_is_taken():
    class TwoNames(SinkhornMixer):
        pass

    with pytest.raises(ValueError, match="mixer 'hc' is already registered"):
        register_mixer("two_names_for_the_registry_test", "hc")(TwoNames)
    assert "two_names_for_the_registry_test" not in MIXERS
