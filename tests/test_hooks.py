"""Hook points: the sublayer maths seen through the hooks, planted stream usage, per-stream
addressing, frozen mixing, TransformerLens compatibility and clear errors."""

import pytest
import torch

from mhc_interp.hooks import HookNameError, is_mixing_hook

from .conftest import perturbed_model, planted_reader_model, tiny_config

VARIANTS = [("none", 1), ("hc", 4), ("mhc", 4), ("mhc_lite", 3), ("mhc_lite_lss", 4), ("mhc", 2)]


@pytest.fixture
def toks():
    torch.manual_seed(123)
    return torch.randint(0, 40, (3, 9))


# ------------------------------------------------------------------------------ sublayer maths
@pytest.mark.parametrize("kind,n", VARIANTS)
def test_hooks_satisfy_update_rule(kind, n, toks):
    """streams_out = H_res streams_in + H_post^T write and read = H_pre streams_in, per hook."""
    model = perturbed_model(tiny_config(kind, n))
    logits, cache = model.run_with_cache(toks)
    for name in model.sublayer_names:
        x, h_pre, h_post, h_res = (
            cache[f"{name}.hook_{k}"] for k in ("streams_in", "h_pre", "h_post", "h_res")
        )
        read_ref = sum(h_pre[:, :, s, None] * x[:, :, s] for s in range(n))
        out_ref = torch.stack(
            [
                sum(h_res[:, :, t, s, None] * x[:, :, s] for s in range(n))
                + h_post[:, :, t, None] * cache[f"{name}.hook_write"]
                for t in range(n)
            ],
            dim=2,
        )
        torch.testing.assert_close(cache[f"{name}.hook_read"], read_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache[f"{name}.hook_streams_out"], out_ref, atol=1e-5, rtol=1e-5)
    final = cache[model.sublayer_names[-1] + ".hook_streams_out"]
    torch.testing.assert_close(logits, model.unembed_streams(final))
    assert all(cache[k].shape[:2] == toks.shape for k in cache if "pattern" not in k and "scores" not in k)


def test_every_hook_fires_exactly_once(toks):
    model = perturbed_model(tiny_config("mhc"))
    calls = {}
    model.run_with_hooks(
        toks,
        fwd_hooks=[
            (lambda n: True, lambda a, hook: calls.__setitem__(hook.name, calls.get(hook.name, 0) + 1))
        ],
    )
    assert set(calls) == set(model.hook_dict)
    assert set(calls.values()) == {1}


# ------------------------------------------------------------------------- planted structure
@pytest.mark.parametrize("sublayer", range(4))
def test_planted_reader_ignores_dropped_stream(sublayer, toks):
    model = planted_reader_model(reader=0, dropped=1)
    clean = model(toks)
    name = f"{model.sublayer_names[sublayer]}.hook_streams_in"
    garbage = 50 * torch.randn(toks.shape[0], toks.shape[1], model.cfg.d_model)
    unchanged = model.run_with_hooks(toks, fwd_hooks=[model.stream_hook(name, 1, garbage)])
    changed = model.run_with_hooks(toks, fwd_hooks=[model.stream_hook(name, 0, garbage)])
    torch.testing.assert_close(unchanged, clean, atol=1e-5, rtol=0)
    assert (changed - clean).abs().max() > 1e-2


def test_planted_reader_read_depends_only_on_reader_stream(toks):
    """For a doubly-stochastic model H_res carries every stream to the output, so only the
    branch read can be claimed unchanged: with H_pre frozen one-hot on stream 0, replacing
    stream 1 leaves that sublayer's read and write untouched."""
    model = perturbed_model(tiny_config("mhc"))
    _, cache = model.run_with_cache(toks, names_filter=is_mixing_hook)
    for name in model.sublayer_names:
        cache[f"{name}.hook_h_pre"] = torch.zeros_like(cache[f"{name}.hook_h_pre"])
        cache[f"{name}.hook_h_pre"][:, :, 0] = 1.0
    target = "blocks.1.attn"
    with model.frozen_mixing(cache):
        _, clean = model.run_with_cache(toks, names_filter=lambda n: n.startswith(target))
        with model.hooks([model.stream_hook(f"{target}.hook_streams_in", 1, 0.0)]):
            _, edited = model.run_with_cache(toks, names_filter=lambda n: n.startswith(target))
    torch.testing.assert_close(edited[f"{target}.hook_write"], clean[f"{target}.hook_write"])
    assert (edited[f"{target}.hook_streams_out"] - clean[f"{target}.hook_streams_out"]).abs().max() > 1e-3


# --------------------------------------------------------------------------- frozen mixing
@pytest.mark.parametrize("kind,n", VARIANTS)
def test_frozen_mixing_without_edit_is_bit_exact(kind, n, toks):
    model = perturbed_model(tiny_config(kind, n))
    clean, cache = model.run_with_cache(toks, names_filter=is_mixing_hook)
    with model.frozen_mixing(cache):
        frozen = model(toks)
        replicated = model(toks.repeat(3, 1))  # replicas stacked along the batch axis
    assert torch.equal(frozen, clean)
    # a larger batch may change the matmul blocking, so replicas agree to rounding only
    torch.testing.assert_close(replicated, clean.repeat(3, 1, 1), atol=1e-5, rtol=1e-5)
    assert all(sub.frozen is None for sub in model.sublayers)


def test_frozen_mixing_blocks_rerouting(toks):
    """Ablating a stream changes the dynamic coefficients unless they are frozen."""
    model = perturbed_model(tiny_config("mhc"))
    _, cache = model.run_with_cache(toks, names_filter=is_mixing_hook)
    ablate = model.stream_hook("blocks.0.mlp.hook_streams_in", 2, 0.0)
    with model.hooks([ablate]):
        _, live = model.run_with_cache(toks, names_filter="blocks.1.attn.hook_h_res")
        with model.frozen_mixing(cache):
            _, frozen = model.run_with_cache(toks, names_filter="blocks.1.attn.hook_h_res")
    name = "blocks.1.attn.hook_h_res"
    assert torch.equal(frozen[name], cache[name])
    assert (live[name] - cache[name]).abs().max() > 1e-6


def test_frozen_subset_and_errors(toks):
    model = perturbed_model(tiny_config("mhc"))
    _, cache = model.run_with_cache(toks, names_filter=is_mixing_hook)
    with model.frozen_mixing(cache, sublayers=[0, "blocks.1.mlp"]):
        assert [s.frozen is not None for s in model.sublayers] == [True, False, False, True]
    with pytest.raises(ValueError, match="pos"):
        with model.frozen_mixing(cache):
            model(toks[:, :5])
    with pytest.raises(KeyError, match="lacks"):
        with model.frozen_mixing({}):
            pass
    with pytest.raises(IndexError):
        with model.frozen_mixing(cache, sublayers=[99]):
            pass
    assert all(s.frozen is None for s in model.sublayers)


# -------------------------------------------------------------------- resuming mid-network
def test_start_and_stop_at_sublayer(toks):
    model = perturbed_model(tiny_config("mhc_lite"))
    logits, cache = model.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_streams_in"))
    for k, name in enumerate(model.sublayer_names):
        state = model(toks, stop_at_sublayer=k)
        assert torch.equal(state, cache[f"{name}.hook_streams_in"])
        torch.testing.assert_close(model(state, start_at_sublayer=k), logits)
    with pytest.raises(ValueError, match="out of range"):
        model(toks, stop_at_sublayer=99)
    with pytest.raises(ValueError, match="stream state"):
        model(toks, start_at_sublayer=1)


# ------------------------------------------------------------------- per-stream addressing
def test_stream_addressing_reads_and_replaces(toks):
    model = perturbed_model(tiny_config("mhc"))
    name = "blocks.1.attn.hook_streams_in"
    _, cache = model.run_with_cache(toks, names_filter=name)
    assert torch.equal(cache.stream(name, 3), cache[name][:, :, 3])
    assert cache.stream(name, [0, 2]).shape == (*toks.shape, 2, model.cfg.d_model)
    seen = {}
    value = torch.randn(model.cfg.d_model)
    hooks = [
        model.stream_hook(name, 2, value),
        model.stream_hook(name, [0, 1], lambda s, hook: 2 * s),
        (name, lambda a, hook: seen.setdefault("x", a)),
    ]
    model.run_with_hooks(toks, fwd_hooks=hooks)
    x = seen["x"]
    assert torch.equal(x[:, :, 2], value.expand_as(x[:, :, 2]))
    torch.testing.assert_close(x[:, :, :2], 2 * cache[name][:, :, :2])
    torch.testing.assert_close(x[:, :, 3], cache[name][:, :, 3])
    _, after = model.run_with_cache(toks, names_filter=name)
    assert torch.equal(after[name], cache[name])  # the cached tensor was not mutated


def test_stream_addressing_errors():
    model = perturbed_model(tiny_config("mhc"))
    with pytest.raises(IndexError, match="out of range.*4 streams"):
        model.stream_hook("blocks.0.attn.hook_streams_in", 4, 0.0)
    with pytest.raises(IndexError):
        model.stream_hook("blocks.0.attn.hook_streams_in", -1, 0.0)
    with pytest.raises(ValueError, match="no stream axis"):
        model.stream_hook("blocks.0.attn.hook_read", 0, 0.0)
    with pytest.raises(HookNameError, match="Did you mean"):
        model.stream_hook("blocks.0.attn.hook_stream_in", 0, 0.0)


# --------------------------------------------------------------- TransformerLens contract
def test_unknown_hook_names_are_clear_errors(toks):
    model = perturbed_model(tiny_config("mhc"))
    with pytest.raises(HookNameError, match="blocks.0.attn.hook_h_res"):
        model.run_with_hooks(toks, fwd_hooks=[("blocks.0.attn.hook_hres", lambda a, hook: a)])
    with pytest.raises(HookNameError):
        model.run_with_cache(toks, names_filter=["hook_logits", "blocks.9.mlp.hook_write"])
    with pytest.raises(HookNameError):
        model.add_hook("nope", lambda a, hook: a)
    _, cache = model.run_with_cache(toks, names_filter="hook_logits")
    with pytest.raises(KeyError, match="not cached"):
        cache["blocks.0.attn.hook_write"]
    with pytest.raises(HookNameError):
        cache["blocks.0.attn.hook_wrte"]
    with pytest.raises(ValueError, match="pos_slice"):
        model.run_with_cache(toks, pos_slice=-1)


def test_hooks_removed_after_exception(toks):
    model = perturbed_model(tiny_config("mhc"))
    clean = model(toks)

    def boom(act, hook):
        raise RuntimeError("boom")

    _, cache = model.run_with_cache(toks, names_filter=is_mixing_hook)
    with pytest.raises(RuntimeError, match="boom"):
        with model.frozen_mixing(cache):
            model.run_with_hooks(
                toks,
                fwd_hooks=[
                    ("blocks.1.mlp.hook_write", boom),
                    model.stream_hook("blocks.0.attn.hook_streams_in", 0, 0.0),
                ],
            )
    with pytest.raises(RuntimeError):
        model.run_with_hooks(toks, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), boom)])
    assert all(not hp.fwd_hooks and not hp._forward_hooks for hp in model.hook_dict.values())
    assert all(s.frozen is None for s in model.sublayers)
    assert torch.equal(model(toks), clean)


def test_hooks_context_and_backward_hooks(toks):
    model = perturbed_model(tiny_config("mhc"))
    grads = {}
    with model.hooks(
        bwd_hooks=[("blocks.0.attn.hook_h_pre", lambda g, hook: grads.__setitem__(hook.name, g))]
    ):
        model(toks, return_type="loss", tokens=toks).backward()
    assert grads["blocks.0.attn.hook_h_pre"].shape == (*toks.shape, 4)
    assert grads["blocks.0.attn.hook_h_pre"].abs().sum() > 0
    assert not model.list_hooks()


def test_attention_pattern_hook_matches_fused_path(toks):
    model = perturbed_model(tiny_config("mhc"))
    fused = model(toks)
    logits, cache = model.run_with_cache(
        toks, names_filter=lambda n: n.endswith(("hook_pattern", "hook_attn_scores"))
    )
    torch.testing.assert_close(logits, fused, atol=1e-5, rtol=1e-5)
    pattern = cache["blocks.0.attn.hook_pattern"]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
    assert torch.equal(pattern.triu(1), torch.zeros_like(pattern))


# ------------------------------------------------------------------------------- bad input
def test_bad_token_input():
    model = perturbed_model(tiny_config("mhc"))
    with pytest.raises(ValueError, match="longer than the model's context n_ctx=12"):
        model(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        model(torch.tensor([[1, 40]]))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="no tokenizer"):
        model("hello")
    assert model(torch.tensor([1, 2, 3])).shape == (1, 3, 40)


# ------------------------------------------------------------------ in-place edits and views
def test_in_place_hook_edits_stay_where_they_are_made(toks):
    """Hooks get real tensors, not expanded views: editing one row of hook_pos_embed in place
    changes that row only, and one coefficient of a `none` model changes that coefficient only."""
    model = perturbed_model(tiny_config("mhc"))
    clean = model(toks)

    def bump_row_0(act, hook):
        act[0, 2] += 5.0
        return act

    edited = model.run_with_hooks(toks, fwd_hooks=[("hook_pos_embed", bump_row_0)])
    assert not torch.allclose(edited[0], clean[0]) and torch.equal(edited[1:], clean[1:])

    plain = perturbed_model(tiny_config("none", 1))
    seen = {}

    def zero_one_h_post(act, hook):
        act[0, 2, 0] = 0.0
        return act

    hooks = [
        ("blocks.0.attn.hook_h_post", zero_one_h_post),
        ("blocks.0.attn.hook_h_res", lambda a, hook: seen.setdefault("h_res", a.clone())),
        ("blocks.0.attn.hook_h_pre", lambda a, hook: seen.setdefault("h_pre", a.clone())),
    ]
    plain.run_with_hooks(toks, fwd_hooks=hooks)
    assert bool((seen["h_res"] == 1).all()) and bool((seen["h_pre"] == 1).all())


def test_stream_hook_value_without_a_stream_axis_is_per_position(toks):
    """A [pos, d_model] (or [batch, pos, d_model]) value on several streams gives every selected
    stream value[p] at position p - also when pos happens to equal the number of streams."""
    model = perturbed_model(tiny_config("mhc"))
    name, d = "blocks.0.attn.hook_streams_in", model.cfg.d_model
    seen = {}
    for pos in (2, 4):  # 2 = the number of selected streams, 4 = the model's n_streams
        t = toks[:, :pos]
        per_pos = (torch.arange(pos, dtype=torch.float32) + 1)[:, None].expand(pos, d)
        for value in (per_pos, per_pos.expand(t.shape[0], pos, d)):
            model.run_with_hooks(
                t,
                fwd_hooks=[
                    model.stream_hook(name, [0, 3], value),
                    (name, lambda a, hook: seen.__setitem__("x", a.clone())),
                ],
            )
            for s in (0, 3):
                torch.testing.assert_close(seen["x"][:, :, s], per_pos.expand(t.shape[0], pos, d))


def test_bad_sublayer_span_and_cache_options(toks):
    model = perturbed_model(tiny_config("mhc"))
    state = model(toks, stop_at_sublayer=3)
    with pytest.raises(ValueError, match="stop_at_sublayer=1 comes before start_at_sublayer=3"):
        model(state, start_at_sublayer=3, stop_at_sublayer=1)
    torch.testing.assert_close(model(state, start_at_sublayer=3, stop_at_sublayer=3), state)
    with pytest.raises(ValueError, match="remove_batch_dim is not supported"):
        model.run_with_cache(toks[:1], remove_batch_dim=True)


def test_in_place_edits_never_reach_caches_or_resumed_states(toks):
    """Frozen coefficients and a resumed run's input state are copied before the hooks see them: an
    in-place hook edit leaves the user's cache and state as they were."""
    model = perturbed_model(tiny_config("mhc"))
    _, cache = model.run_with_cache(toks, names_filter=is_mixing_hook)
    kept = {k: v.clone() for k, v in cache.items()}

    def zero_stream_0(act, hook):
        act[:, :, 0] = 0.0
        return act

    with model.frozen_mixing(cache):
        model.run_with_hooks(toks, fwd_hooks=[(n, zero_stream_0) for n in cache])
    assert all(torch.equal(cache[k], kept[k]) for k in cache)
    state = model(toks, stop_at_sublayer=2)
    before = state.clone()
    model.run_with_hooks(
        state, start_at_sublayer=2, fwd_hooks=[("blocks.1.attn.hook_streams_in", zero_stream_0)]
    )
    assert torch.equal(state, before)
    # a state in another float dtype runs in the model's; an integer one or empty tokens are refused
    torch.testing.assert_close(model(state.double(), start_at_sublayer=2), model(state, start_at_sublayer=2))
    with pytest.raises(TypeError, match="floating-point"):
        model(state.long(), start_at_sublayer=2)
    with pytest.raises(ValueError, match="have no positions"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"tokens= \(3, 9\) do not match the resumed state's \[batch, pos\] \(2, 9\)"
    ):
        model(state[:2], start_at_sublayer=2, tokens=toks, return_type="loss")
    with pytest.raises(TypeError, match="must be an int sublayer index"):
        model(state, start_at_sublayer=True)
