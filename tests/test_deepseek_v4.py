"""HookedHFMHC on transformers' DeepSeek-V4: a tiny random model built offline (hidden 64, 2 layers,
4 experts, 4 streams, a CSA and an HCA attention layer, a hash-routed and a top-k MoE layer).

The adapter's hooks reproduce the HF logits, its cached mixing equals the HF module's, stream edits
equal hand-made edits of the HF forward, resuming from any sublayer is exact (hash routing
included), the observational and causal probes run unchanged (and the causal ones agree with a
naive loop), accelerate offloading works, and bad models / inputs fail clearly."""

import itertools

import numpy as np
import pytest
import torch
from torch.nn import functional as F

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DeepseekV4Config"):  # pragma: no cover - older transformers
    pytest.skip("this transformers has no DeepSeek-V4", allow_module_level=True)

from mhc_interp.adapters import HookedHFMHC, UnsupportedModelError, find_hyper_connections, tiny_deepseek_v4  # noqa: E402
from mhc_interp.hooks import HookNameError, is_mixing_hook  # noqa: E402
from mhc_interp.hooks.freeze import frozen_mixing  # noqa: E402
from mhc_interp.hooks.names import hook_table  # noqa: E402
from mhc_interp.probes import (  # noqa: E402
    CKA,
    AblateRescue,
    Curvature,
    StreamUsage,
    ablate_and_rescue,
    activation_patching,
    run_probes,
)

VOCAB = 96


@pytest.fixture(scope="module")
def hf():
    return tiny_deepseek_v4(seed=0)


@pytest.fixture(scope="module")
def model(hf):
    return HookedHFMHC(hf)


@pytest.fixture(scope="module")
def toks():
    return torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(1))


def default_mask(tokens):
    mask = torch.ones(tokens.shape, dtype=torch.bool)
    mask[:, 0] = False
    return mask


def naive_kl(clean_logits, logits, mask):
    p_log = F.log_softmax(clean_logits.double(), -1)
    q_log = F.log_softmax(logits.double(), -1)
    kl = (p_log.exp() * (p_log - q_log)).sum(-1)
    return ((kl * mask).sum(-1) / mask.sum(-1)).mean().item()


# ------------------------------------------------------------------------------ parity with HF
def test_tiny_model_is_deterministic_in_its_seed(hf, toks):
    """Same seed, same model (and the global RNG is left alone); another seed, another model."""
    rng = torch.random.get_rng_state()
    tiny, again = tiny_deepseek_v4(seed=3), tiny_deepseek_v4(seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng)
    with torch.no_grad():
        logits, logits_again, logits_seed0 = tiny(toks).logits, again(toks).logits, hf(toks).logits
    assert not tiny.training and logits.shape == (3, 16, VOCAB) and torch.isfinite(logits).all()
    assert torch.equal(logits, logits_again)
    assert (logits - logits_seed0).abs().max() > 1e-3
    cfg = tiny.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.n_routed_experts, cfg.num_nextn_predict_layers) == (
        64,
        2,
        4,
        0,
    )
    assert len(find_hyper_connections(hf)) == 4


def test_logits_match_hf_without_hooks(model, hf, toks):
    with torch.no_grad():
        ref = hf(toks).logits
        out = model(toks)
        cached, cache = model.run_with_cache(toks)  # every hook point attached
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cached, ref, atol=1e-6, rtol=1e-6)
    assert len(cache) == len(model.hook_dict) == 4 + 8 * 4 + 3
    assert model.sublayer_names == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    assert model.cfg.n_streams == 4 and model.cfg.n_sublayers == 4 and model.cfg.hash_layers == (0,)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())  # no copy
    assert model.blocks[0].attn.hf.hc is hf.model.layers[0].attn_hc


def test_hook_table_matches_specs(model):
    names = [row[0] for row in hook_table(model)]  # raises if any shape differs from its spec
    assert names[:2] == ["hook_embed", "hook_streams_init"] and names[-1] == "hook_logits"
    assert "head.hook_h_pre" in names and "blocks.{l}.attn.hook_h_res" in names


def test_cached_mixing_equals_hf_module(model, hf, toks):
    _, cache = model.run_with_cache(toks)
    eps = model.cfg.hc_eps
    for l, layer in enumerate(hf.model.layers):
        for sub, hc, norm, branch in (
            ("attn", layer.attn_hc, layer.input_layernorm, None),
            ("mlp", layer.ffn_hc, layer.post_attention_layernorm, layer.mlp),
        ):
            name = f"blocks.{l}.{sub}"
            x = cache[f"{name}.hook_streams_in"]
            with torch.no_grad():
                post, comb, collapsed = hc(x)  # the HF module itself
            h_res = cache[f"{name}.hook_h_res"]
            torch.testing.assert_close(h_res, comb.transpose(-1, -2), atol=0, rtol=0)  # [target, source]
            torch.testing.assert_close(cache[f"{name}.hook_h_post"], post, atol=0, rtol=0)
            torch.testing.assert_close(cache[f"{name}.hook_read"], collapsed, atol=0, rtol=0)
            # doubly stochastic: rows (comb's normalised columns) within hc_eps, columns within the
            # Sinkhorn residual; non-negative
            assert (h_res >= 0).all()
            assert (h_res.sum(-1) - 1).abs().max() <= 2 * eps
            assert (h_res.sum(-2) - 1).abs().max() <= 1e-4  # 20 iterations: ~1e-5 here
            # H_pre = sigmoid(.) + hc_eps, read = sum_s H_pre_s x_s
            h_pre = cache[f"{name}.hook_h_pre"]
            assert (h_pre > eps).all() and (h_pre < 1 + eps).all()
            torch.testing.assert_close(
                cache[f"{name}.hook_read"], (h_pre[..., None] * x).sum(2), atol=1e-6, rtol=1e-6
            )
            # update rule through the hooks
            out = (
                torch.einsum("bpts,bpsd->bptd", h_res, x)
                + cache[f"{name}.hook_h_post"][..., None] * cache[f"{name}.hook_write"][:, :, None]
            )
            torch.testing.assert_close(cache[f"{name}.hook_streams_out"], out, atol=1e-5, rtol=1e-5)
            if branch is not None:
                with torch.no_grad():
                    ref = branch(norm(collapsed), input_ids=toks)
                torch.testing.assert_close(cache[f"{name}.hook_write"], ref, atol=0, rtol=0)
    # the whole decoder layer: HF forward on the state entering blocks.1 == the adapter's output of blocks.1
    ctx = model._context(cache["blocks.1.attn.hook_streams_in"], toks)
    with torch.no_grad():
        ref = hf.model.layers[1](cache["blocks.1.attn.hook_streams_in"], input_ids=toks, **ctx.kwargs)
    torch.testing.assert_close(cache["blocks.1.mlp.hook_streams_out"], ref, atol=0, rtol=0)
    # head: the learned hc_head collapse, then the final norm
    final = cache["head.hook_streams_in"]
    with torch.no_grad():
        torch.testing.assert_close(cache["head.hook_read"], hf.model.hc_head(final), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(
            cache["head.hook_write"], hf.model.norm(hf.model.hc_head(final)), atol=1e-6, rtol=1e-6
        )


# ---------------------------------------------------------------------- edits == hand edits in HF
def _zero_stream(s):
    def edit(t):
        t = t.clone()
        t[:, :, s] = 0
        return t

    return edit


def test_zeroing_a_stream_equals_zeroing_it_in_the_hf_forward(model, hf, toks):
    cases = [  # adapter hook, HF module, pre (input) or post (output) hook, stream
        ("blocks.1.attn.hook_streams_in", hf.model.layers[1], "pre", 2),
        ("blocks.0.mlp.hook_streams_out", hf.model.layers[0], "post", 1),
        ("blocks.0.attn.hook_streams_in", hf.model.layers[0], "pre", 0),
        ("head.hook_streams_in", hf.model.hc_head, "pre", 3),
    ]
    with torch.no_grad():
        clean = hf(toks).logits
        for name, module, kind, s in cases:
            ours = model.run_with_hooks(toks, fwd_hooks=[model.stream_hook(name, s, 0.0)])
            edit = _zero_stream(s)
            if kind == "pre":
                handle = module.register_forward_pre_hook(
                    lambda m, args, kwargs, edit=edit: ((edit(args[0]), *args[1:]), kwargs), with_kwargs=True
                )
            else:
                handle = module.register_forward_hook(lambda m, args, out, edit=edit: edit(out))
            try:
                ref = hf(toks).logits
            finally:
                handle.remove()
            torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
            assert (ours - clean).abs().max() > 1e-3, name  # the edit matters


# --------------------------------------------------------------------------------- resumption
def test_resume_from_every_sublayer_including_hash_routing(model, toks):
    logits, cache = model.run_with_cache(toks, names_filter=lambda n: n.endswith("streams_in"))
    states = [cache[f"{s}.hook_streams_in"] for s in model.sublayer_names] + [cache["head.hook_streams_in"]]
    other = (toks + 1) % VOCAB
    with torch.no_grad():
        for k, state in enumerate(states):
            torch.testing.assert_close(model(state, start_at_sublayer=k, tokens=toks), logits, atol=0, rtol=0)
            torch.testing.assert_close(
                model(state.repeat(2, 1, 1, 1), start_at_sublayer=k, tokens=toks),
                logits.repeat(2, 1, 1),
                atol=1e-6,
                rtol=1e-6,
            )  # replicas, ids of batch B
            wrong = model(state, start_at_sublayer=k, tokens=other)
            # sublayer 1 (blocks.0.mlp) routes by token id: wrong ids change the logits until it has run
            assert (wrong - logits).abs().max() > 1e-4 if k <= 1 else torch.equal(wrong, logits)
        for k in range(model.cfg.n_sublayers + 1):
            torch.testing.assert_close(model(toks, stop_at_sublayer=k), states[k], atol=0, rtol=0)
        # a hash-routed sublayer ahead needs tokens=, even for the state the last run produced
        for k in (0, 1):
            with pytest.raises(ValueError, match=r"routes by token id.*tokens=ids"):
                model(states[k], start_at_sublayer=k)
        model(states[2] * 1.5, start_at_sublayer=2)  # no hash layer ahead: no ids needed
        loss = model(states[2], start_at_sublayer=2, tokens=toks, return_type="loss")
        torch.testing.assert_close(loss, model(toks, return_type="loss"))


def test_resumed_runs_do_not_depend_on_call_history(hf, toks):
    """Two token runs resumed from the hash-routed sublayer give the same logits on a fresh adapter
    and on one that has since run other prompts many times: the ids come from `tokens=`, not from
    a memory of recent runs."""
    a, b = toks[:1], toks[1:2]
    used, fresh = HookedHFMHC(hf), HookedHFMHC(hf)
    with torch.no_grad():
        state_a, state_b = used(a, stop_at_sublayer=1), used(b, stop_at_sublayer=1)
        for t in range(20):  # more runs than any "recent runs" memory would keep
            used(torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(t)))
        for state, ids in ((state_a, a), (state_b, b)):
            expected = fresh(ids)
            torch.testing.assert_close(used(state, start_at_sublayer=1, tokens=ids), expected, atol=0, rtol=0)
            torch.testing.assert_close(
                fresh(state, start_at_sublayer=1, tokens=ids), expected, atol=0, rtol=0
            )
        swapped = used(state_a, start_at_sublayer=1, tokens=b)
        assert (swapped - fresh(a)).abs().max() > 1e-4  # the ids are what routes, not the state


# ------------------------------------------------------------------------------------- probes
def test_observational_probes_run_end_to_end(model, toks):
    res = run_probes(
        model,
        [StreamUsage(), CKA(minibatch_tokens=16, sites="sublayers"), Curvature(sites="sublayers")],
        toks,
        batch_size=2,
        progress=False,
    )
    usage, cka, curv = res["stream_usage"], res["cka"], res["curvature"]
    L, n = model.cfg.n_sublayers, model.cfg.n_streams
    assert usage["mean_h_res"].shape == (L, n, n) and usage["stream_norm"].shape == (L + 1, n)
    np.testing.assert_allclose(usage["mean_h_res"].sum(-1), 1, atol=1e-5)
    _, cache = model.run_with_cache(toks)
    mask = default_mask(toks)
    expected = torch.stack([cache[f"{s}.hook_h_res"][mask].double().mean(0) for s in model.sublayer_names])
    np.testing.assert_allclose(usage["mean_h_res"], expected.numpy(), atol=1e-6)
    np.testing.assert_allclose(usage["read_share"].sum(-1), 1, atol=1e-6)
    assert cka["cka"].shape == ((L + 1) * n, (L + 1) * n) and np.isfinite(cka["cka"]).all()
    np.testing.assert_allclose(np.diagonal(cka["cka"]), 1, atol=1e-6)
    assert curv["mean"].shape == (L + 1, n + 1) and np.isfinite(curv["mean"]).all()
    for r in res.values():
        assert r.meta["tokens_seen"] == toks.numel()


def naive_rescue_kl(model, tokens, mode):
    """KL of each ablation (and each ablate-a-restore-r) with one full forward per intervention."""
    clean, cache = model.run_with_cache(
        tokens, names_filter=lambda n: is_mixing_hook(n) or n.endswith("streams_in")
    )
    names, n, mask = model.sublayer_names, model.cfg.n_streams, default_mask(tokens)
    L = len(names)
    ablated, rescued = np.full((L, n, n), np.nan), np.full((L, n, n), np.nan)

    def hooks(l, ablate, restore):
        span = [l] if mode == "one_shot" else range(l, L)
        out = []
        for s in span:
            name = f"{names[s]}.hook_streams_in"

            def hook(x, hook, name=name):
                x = x.clone()
                x[:, :, list(ablate)] = 0
                for r in restore:
                    x[:, :, r] = cache[name][:, :, r]
                return x

            out.append((name, hook))
        return out

    with torch.no_grad(), model.frozen_mixing(cache):  # what the probe freezes: every sublayer + the head
        for l in range(L):
            for i, j in itertools.combinations(range(n), 2):
                ablated[l, i, j] = ablated[l, j, i] = naive_kl(
                    clean, model.run_with_hooks(tokens, fwd_hooks=hooks(l, (i, j), ())), mask
                )
            for a, r in itertools.permutations(range(n), 2):
                rescued[l, a, r] = naive_kl(
                    clean, model.run_with_hooks(tokens, fwd_hooks=hooks(l, (a, r), (r,))), mask
                )
    return ablated, rescued


@pytest.mark.parametrize("mode", ["one_shot", "persistent"])
def test_ablate_rescue_runs_and_matches_naive_loop(model, toks, mode):
    r = ablate_and_rescue(model, toks, mode=mode, batch_size=2, max_rows=5)
    ablated, rescued = naive_rescue_kl(model, toks, mode)
    np.testing.assert_allclose(r["kl_ablated"], ablated, atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(r["kl_rescued"], rescued, atol=1e-6, rtol=1e-4)
    assert r["rescue"].shape == (4, 4, 4) and np.isfinite(r["global_rescue"][~np.eye(4, dtype=bool)]).all()
    assert "| ablated \\ recovered |" in r.table()


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_activation_patching_runs_and_matches_naive_loop(model, toks, direction):
    corrupted = toks.clone()
    corrupted[:, 6] = (corrupted[:, 6] + 5) % VOCAB
    r = activation_patching(model, toks, corrupted, direction=direction, mixing="both", batch_size=3)
    base, source = (corrupted, toks) if direction == "denoise" else (toks, corrupted)
    clean = model(toks)
    _, src_cache = model.run_with_cache(source, names_filter=lambda n: n.endswith("streams_in"))
    _, base_cache = model.run_with_cache(base, names_filter=is_mixing_hook)
    mask = default_mask(toks)
    recomputed = np.zeros((4, 4))
    frozen = np.zeros((4, 4))
    with torch.no_grad():
        for l, s in itertools.product(range(4), range(4)):
            name = f"{model.sublayer_names[l]}.hook_streams_in"
            hook = model.stream_hook(name, s, src_cache[name][:, :, s])
            recomputed[l, s] = naive_kl(clean, model.run_with_hooks(base, fwd_hooks=[hook]), mask)
            with model.frozen_mixing(base_cache):
                frozen[l, s] = naive_kl(clean, model.run_with_hooks(base, fwd_hooks=[hook]), mask)
    np.testing.assert_allclose(r["kl_recomputed"], recomputed, atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(r["kl_frozen"], frozen, atol=1e-6, rtol=1e-4)
    assert r["baseline_corrupted"] > 0


def test_frozen_mixing_and_the_head(model, toks):
    logits, cache = model.run_with_cache(toks, names_filter=lambda n: is_mixing_hook(n) or "streams_in" in n)
    assert "head.hook_h_pre" in cache  # is_mixing_hook picks up the head weights
    edit = [model.stream_hook("head.hook_streams_in", 0, 0.0)]
    with torch.no_grad():
        with model.frozen_mixing(cache):  # sublayers and head
            assert torch.equal(model(toks), logits)  # no edit: identical
            frozen_head = model.run_with_hooks(
                toks, fwd_hooks=edit + [("head.hook_h_pre", _assert_equal(cache["head.hook_h_pre"]))]
            )
        with frozen_mixing(model, cache):  # the function: sublayers only
            recomputed_head = model.run_with_hooks(toks, fwd_hooks=edit)
    assert (frozen_head - recomputed_head).abs().max() > 1e-4
    # logit lens through the head: hc_head collapse of the state itself, or fixed weights
    state = cache["head.hook_streams_in"]
    torch.testing.assert_close(model.unembed_streams(state), logits)
    torch.testing.assert_close(model.unembed_streams(state, head_weights=cache["head.hook_h_pre"]), logits)
    contributions = model.stream_contributions(state)  # per-stream lens: exact decomposition
    assert contributions.shape == (*toks.shape, 4, VOCAB)
    torch.testing.assert_close(contributions.sum(-2), logits, atol=1e-5, rtol=1e-5)
    mid = cache["blocks.1.attn.hook_streams_in"]  # an intermediate state, read by hc_head
    with torch.no_grad():
        lens = hf_readout(model, mid)
    torch.testing.assert_close(model.unembed_streams(mid), lens, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.stream_contributions(mid).sum(-2), lens, atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError, match="head"):
        with model.frozen_mixing({k: v for k, v in cache.items() if not k.startswith("head")}, head=True):
            pass


def hf_readout(model, state):
    """What DeepseekV4Model + lm_head do with a final state: lm_head(norm(hc_head(state)))."""
    hf = model.hf_model
    return hf.lm_head(hf.model.norm(hf.model.hc_head(state)))


def _assert_equal(expected):
    def hook(act, hook):
        torch.testing.assert_close(act, expected, atol=0, rtol=0)

    return hook


def test_probe_setup_sees_the_adapter_as_a_stream_model(model):
    probe = AblateRescue(sublayers=[1, 3])
    probe.setup(model)
    assert probe.names == ["blocks.0.mlp", "blocks.1.mlp"]


def test_nnsight_edit_equals_tl_edit(toks):
    pytest.importorskip("nnsight")
    from mhc_interp.hooks.nnsight_support import to_nnsight

    model = HookedHFMHC(tiny_deepseek_v4(seed=0))  # nnsight wrapping is permanent: own model
    ref = model.run_with_hooks(toks, fwd_hooks=[model.stream_hook("blocks.1.mlp.hook_streams_in", 1, 0.0)])
    nn_model = to_nnsight(model)
    with nn_model.trace(toks):
        nn_model.blocks[1].mlp.hook_streams_in.output[:, :, 1] = 0
        h_res = nn_model.blocks[1].mlp.hook_h_res.output.save()
        out = nn_model.output.save()
    torch.testing.assert_close(out.detach(), ref, atol=1e-6, rtol=1e-6)
    assert h_res.shape == (3, 16, 4, 4)


# ------------------------------------------------------------------------------ devices / offload
def test_device_map_with_disk_offload_gives_the_same_results(toks, tmp_path, model):
    """`from_pretrained(..., device_map=)` (accelerate) on CPU: layer 0 and the head offloaded to
    disk (meta weights, loaded by accelerate's hooks while they run); the adapter loads the
    hyper-connection weights through the same hooks. Same logits, same rescue matrix."""
    tiny_deepseek_v4(seed=0).save_pretrained(tmp_path / "ckpt")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "disk",
        "model.layers.1": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "model.hc_head": "disk",
        "lm_head": "cpu",
    }
    offloaded = HookedHFMHC.from_pretrained(
        str(tmp_path / "ckpt"),
        device_map=device_map,
        local_files_only=True,
        offload_folder=str(tmp_path / "offload"),
    )
    hf = offloaded.hf_model
    assert hf.model.layers[0].attn_hc.fn.device.type == "meta" and offloaded.tokenizer is None
    with torch.no_grad():
        torch.testing.assert_close(offloaded(toks), model(toks), atol=0, rtol=0)
    a = ablate_and_rescue(offloaded, toks, batch_size=3)
    b = ablate_and_rescue(model, toks, batch_size=3)
    np.testing.assert_allclose(a["rescue"], b["rescue"], atol=1e-6, equal_nan=True)
    torch.testing.assert_close(
        offloaded.stream_contributions(model(toks, stop_at_sublayer=4)).sum(-2),
        model(toks),
        atol=1e-5,
        rtol=1e-5,
    )
    assert hf.model.layers[0].attn_hc.fn.device.type == "meta"  # offloaded again afterwards


def test_hooks_gathered_on_the_main_device_keep_their_semantics(model, toks):
    """The multi-device path without a GPU: every hook runs on a 'different' device (cpu:0, which
    compares unequal to cpu, so activations and results really are moved) and blocks.1 runs
    'elsewhere'; caches, stream edits, frozen mixing and the probes give the same numbers."""
    m = HookedHFMHC(tiny_deepseek_v4(seed=0))
    for hp in m.hook_dict.values():
        hp.gather_device = torch.device("cpu", 0)
    m.blocks[1].attn.device = m.blocks[1].mlp.device = torch.device("cpu", 0)
    with torch.no_grad():
        a, ca = m.run_with_cache(toks)
        b, cb = model.run_with_cache(toks)
    assert torch.equal(a, b) and all(torch.equal(ca[k], cb[k]) for k in cb)
    edit = [m.stream_hook("blocks.1.mlp.hook_streams_in", 2, 0.0)]
    torch.testing.assert_close(
        m.run_with_hooks(toks, fwd_hooks=edit), model.run_with_hooks(toks, fwd_hooks=edit), atol=0, rtol=0
    )
    r1, r2 = ablate_and_rescue(m, toks, batch_size=3), ablate_and_rescue(model, toks, batch_size=3)
    np.testing.assert_allclose(r1["kl_ablated"], r2["kl_ablated"], atol=1e-7, rtol=1e-6)
    with m.hooks(fwd_hooks=[("hook_logits", lambda act, hook: None)]):
        names = [h.__name__ for h in m.hook_dict["hook_logits"]._forward_hooks.values()]
        assert len(names) == 1 and names[0].startswith("gathered(")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_split_across_cpu_and_cuda_gives_the_same_probe_results(model, toks):
    """Layer 1, the head and lm_head on cuda, the rest on cpu (placed by hand: the adapter runs each
    sublayer where its weights are); and accelerate's cpu-offload device_map. Same results."""
    from accelerate import dispatch_model

    ref_rescue = ablate_and_rescue(model, toks, batch_size=3)
    ref_usage = run_probes(model, StreamUsage(), toks, batch_size=3, progress=False)
    corrupted = toks.clone()
    corrupted[:, 6] = (corrupted[:, 6] + 5) % VOCAB
    ref_patch = activation_patching(model, toks, corrupted, mixing="both")
    with torch.no_grad():
        ref_logits = model(toks)

    hf = tiny_deepseek_v4(seed=0)
    for m in (hf.model.layers[1], hf.model.hc_head, hf.model.norm, hf.lm_head):
        m.to("cuda")
    split = HookedHFMHC(hf)
    assert split.is_multi_device and split.device.type == "cpu"

    hf2 = tiny_deepseek_v4(seed=0)
    device_map = {
        "model.embed_tokens": 0,
        "model.layers.0": "cpu",
        "model.layers.1": 0,
        "model.norm": 0,
        "model.rotary_emb": 0,
        "model.hc_head": 0,
        "lm_head": 0,
    }
    offloaded = HookedHFMHC(dispatch_model(hf2, device_map=device_map))

    for m in (split, offloaded):
        with torch.no_grad():
            torch.testing.assert_close(m(toks).cpu(), ref_logits, atol=1e-5, rtol=1e-5)
        r = ablate_and_rescue(m, toks, batch_size=3)
        np.testing.assert_allclose(r["kl_ablated"], ref_rescue["kl_ablated"], atol=1e-5, rtol=1e-3)
        np.testing.assert_allclose(r["rescue"], ref_rescue["rescue"], atol=1e-4, equal_nan=True)
        u = run_probes(m, StreamUsage(), toks, batch_size=3, progress=False)
        np.testing.assert_allclose(u["mean_h_res"], ref_usage["mean_h_res"], atol=1e-5)
        p = activation_patching(m, toks, corrupted, mixing="both")
        np.testing.assert_allclose(p["kl_recomputed"], ref_patch["kl_recomputed"], atol=1e-5, rtol=1e-3)
        _, cache = m.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_streams_out"))
        assert {t.device.type for t in cache.values()} == {m.device.type}  # aggregated on one device


# ------------------------------------------------------------------------------------ bad input
def test_model_without_hyper_connections_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(UnsupportedModelError, match="no hyper-connections.*DeepseekV4HyperConnection"):
        HookedHFMHC(llama)
    with pytest.raises(UnsupportedModelError, match="torch.nn.Module"):
        HookedHFMHC("deepseek-ai/DeepSeek-V4")


def test_unsupported_configs_are_refused(hf):
    from transformers import DeepseekV4Model

    base = DeepseekV4Model(hf.config)
    with pytest.raises(UnsupportedModelError, match="no language-model head"):
        HookedHFMHC(base)
    odd = tiny_deepseek_v4(seed=0)
    odd.model.layers[1].ffn_hc.hc_mult = 3
    with pytest.raises(UnsupportedModelError, match="hc_mult=3"):
        HookedHFMHC(odd)
    # a look-alike whose decoder layer mixes with comb instead of comb^T: caught by the self-check
    lookalike = tiny_deepseek_v4(seed=0)
    layer = lookalike.model.layers[0]

    def forward(hidden_states, input_ids=None, **kwargs):
        post, comb, collapsed = layer.attn_hc(hidden_states)
        out, _ = layer.self_attn(layer.input_layernorm(collapsed), **kwargs)
        h = post.unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb, hidden_states)
        post, comb, collapsed = layer.ffn_hc(h)
        return post.unsqueeze(-1) * layer.mlp(
            layer.post_attention_layernorm(collapsed), input_ids=input_ids
        ).unsqueeze(-2) + torch.matmul(comb, h)

    layer.forward = forward
    with pytest.raises(UnsupportedModelError, match="does not compute"):
        HookedHFMHC(lookalike)
    HookedHFMHC(lookalike, check=False)  # the check can be skipped deliberately


def test_bad_inputs_fail_clearly(model, toks):
    with pytest.raises(ValueError, match="token ids must lie"):
        model(torch.full((1, 4), VOCAB))
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, model.cfg.n_ctx + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="stream state"):
        model(torch.zeros(1, 4, 3, 64), start_at_sublayer=1)
    with pytest.raises(ValueError, match="out of range"):
        model(toks, stop_at_sublayer=9)
    with pytest.raises(HookNameError, match="Did you mean"):
        model.run_with_hooks(toks, fwd_hooks=[("blocks.0.attn.hook_h_ress", lambda a, hook: a)])
    with pytest.raises(IndexError, match="4 streams"):
        model.stream_hook("blocks.0.attn.hook_streams_in", 4, 0.0)
    with pytest.raises(ValueError, match="tokens= has"):
        model(torch.zeros(1, 5, 4, 64), start_at_sublayer=1, tokens=toks[:1])
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())


def test_probes_that_need_hookedmhc_parts_say_so(model, toks):
    """The logit lens's write lens (a branch output read as a one-stream state) and the head
    detectors rely on HookedMHC's per-stream final LayerNorm and attention sublayers: on the
    adapter they fail with a message, not a crash (the stream views run: tests/test_logit_lens.py)."""
    from mhc_interp.probes import HeadDetector, LogitLens, run_probes

    with pytest.raises(ValueError, match="writes=False"):
        run_probes(model, LogitLens(), toks, progress=False)
    with pytest.raises(TypeError, match="multi-head attention"):
        run_probes(model, HeadDetector(), toks, progress=False)


def test_hooks_on_modules_the_adapter_does_not_run_are_refused(model, hf, toks):
    """The adapter recomputes attn_hc / ffn_hc / hc_head and runs each layer's parts itself: a torch
    hook on those modules (or a decoder layer) would never fire, so the forward says so; hooks on
    the parts it does call keep working."""
    for module in (hf.model.layers[0], hf.model.layers[1].ffn_hc, hf.model.hc_head, hf.model):
        handle = module.register_forward_hook(lambda m, args, out: out)
        try:
            with pytest.raises(RuntimeError, match="would never fire"):
                model(toks)
        finally:
            handle.remove()
    fired = []
    handle = hf.model.layers[0].mlp.register_forward_hook(lambda m, args, out: fired.append(1))
    try:
        model(toks)
    finally:
        handle.remove()
    assert fired


def test_in_place_edits_of_the_frozen_head_leave_the_cache_alone(model, toks):
    _, cache = model.run_with_cache(toks, names_filter=is_mixing_hook)
    kept = cache["head.hook_h_pre"].clone()

    def zero(act, hook):
        act[:, :, 0] = 0.0
        return act

    with torch.no_grad(), model.frozen_mixing(cache):
        model.run_with_hooks(toks, fwd_hooks=[("head.hook_h_pre", zero)])
    assert torch.equal(cache["head.hook_h_pre"], kept)
