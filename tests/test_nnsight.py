"""nnsight 0.8 on HookedMHC: reads, patches and multi-invoke batching agree with TransformerLens.

Each test builds its own model: nnsight wrapping permanently installs a controller `forward`
on every module, which must not leak into other tests.
"""

import pytest
import torch
from nnsight import NNsight

from mhc_interp import HookedMHC, MHCConfig
from mhc_interp.hooks.nnsight_support import to_nnsight
from mhc_interp.model.compiled import module_observed

from .conftest import COMPILE_SHAPE, compile_test_config, perturbed_model

ATOL = 1e-6


def make_model():
    cfg = MHCConfig(
        n_layers=2, n_heads=2, d_model=16, n_ctx=12, d_vocab=40, n_streams=4, hyper_conn_type="mhc"
    )
    torch.manual_seed(0)
    model = HookedMHC(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    tokens = torch.randint(0, 40, (2, 7))
    return model, tokens


def close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def no_tl_hooks(model):
    assert model.list_hooks(including_permanent=True) == {}
    for name, hp in model.hook_dict.items():
        assert not hp.fwd_hooks and not hp.bwd_hooks, name
        assert not hp._forward_hooks and not hp._backward_hooks, name


@pytest.fixture
def setup():
    model, tokens = make_model()
    return model, tokens


def test_wrapping_marks_pattern_observed(setup):
    model, tokens = setup
    hp = model.blocks[0].attn.hook_pattern
    assert not module_observed(hp)  # fused SDPA until someone can read the pattern
    fused = model(tokens)
    NNsight(model)  # installs nnsight's controller as every module's `forward`, for good
    assert all(module_observed(blk.attn.hook_pattern) for blk in model.blocks)
    eager = model(tokens)  # now always the materialised-pattern path, even outside a trace
    close(eager, fused, atol=1e-4)


@torch.no_grad()
def test_reads_match_run_with_cache(setup):
    model, tokens = setup
    names = ["blocks.1.attn.hook_streams_in", "blocks.1.attn.hook_h_res", "blocks.1.attn.hook_pattern"]
    nn_model = NNsight(model)
    with nn_model.trace(tokens):
        streams_in = nn_model.blocks[1].attn.hook_streams_in.output.save()
        h_res = nn_model.blocks[1].attn.hook_h_res.output.save()
        pattern = nn_model.blocks[1].attn.hook_pattern.output.save()
        logits = nn_model.output.save()
    ref_logits, cache = model.run_with_cache(tokens, names_filter=names)
    for name, got in zip(names, (streams_in, h_res, pattern)):
        assert got.shape == cache[name].shape, name
        close(got, cache[name])
    assert pattern.shape == (2, 2, 7, 7)
    close(pattern.sum(-1), torch.ones(2, 2, 7))  # a real softmax pattern, causal
    assert (pattern.triu(1) == 0).all()
    close(logits, ref_logits)
    close(logits, model(tokens))


@torch.no_grad()
def test_stream_zeroing_matches_tl_stream_hook(setup):
    model, tokens = setup
    nn_model = NNsight(model)  # wrap first: TL references must use the same attention path
    clean = model(tokens)
    hook = model.stream_hook("blocks.1.mlp.hook_streams_in", 2, 0.0)
    tl_patched = model.run_with_hooks(tokens, fwd_hooks=[hook])
    with nn_model.trace(tokens):
        nn_model.blocks[1].mlp.hook_streams_in.output[:, :, 2] = 0.0
        nn_patched = nn_model.output.save()
    close(nn_patched, tl_patched)
    assert (nn_patched - clean).abs().max() > 1e-3
    close(model(tokens), clean)  # the in-place patch did not persist


@torch.no_grad()
def test_identity_h_res_matches_tl_hook(setup):
    model, tokens = setup
    n = model.cfg.n_streams
    eye = torch.eye(n)
    nn_model = NNsight(model)
    clean = model(tokens)
    tl_frozen = model.run_with_hooks(
        tokens,
        fwd_hooks=[(lambda name: name.endswith("hook_h_res"), lambda h, hook: eye.expand_as(h).clone())],
    )
    with nn_model.trace(tokens):
        for block in nn_model.blocks:  # forward order: attn then mlp of each block
            for sub in (block.attn, block.mlp):
                sub.hook_h_res.output = eye.expand_as(sub.hook_h_res.output).clone()
        nn_frozen = nn_model.output.save()
    close(nn_frozen, tl_frozen)
    assert (nn_frozen - clean).abs().max() > 1e-3


@torch.no_grad()
def test_two_invokes_match_separate_runs(setup):
    model, tokens = setup
    nn_model = to_nnsight(model)
    other = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(1))
    names = ["blocks.1.attn.hook_pattern", "blocks.1.mlp.hook_streams_in"]
    separate = [model.run_with_cache(t, names_filter=names) for t in (tokens, other)]
    # The same 5 rows in one TL forward: nnsight's per-invoke rows must be exactly these.
    both_logits, both = model.run_with_cache(torch.cat([tokens, other]), names_filter=names)
    rows = (slice(0, 2), slice(2, 5))
    patched_ref = model.run_with_hooks(
        other, fwd_hooks=[model.stream_hook("blocks.1.mlp.hook_streams_in", 2, 0.0)]
    )
    with nn_model.trace() as tracer:
        with tracer.invoke(tokens):
            pat_a = nn_model.blocks[1].attn.hook_pattern.output.save()
            s_a = nn_model.blocks[1].mlp.hook_streams_in.output.save()
            out_a = nn_model.output.save()
        with tracer.invoke(other):
            pat_b = nn_model.blocks[1].attn.hook_pattern.output.save()
            s_b = nn_model.blocks[1].mlp.hook_streams_in.output.clone().save()
            nn_model.blocks[1].mlp.hook_streams_in.output[:, :, 2] = 0.0  # only this invoke
            out_b = nn_model.output.save()
    got = {"blocks.1.attn.hook_pattern": (pat_a, pat_b), "blocks.1.mlp.hook_streams_in": (s_a, s_b)}
    for name, (a, b) in got.items():
        assert a.shape[0] == 2 and b.shape[0] == 3, name
        assert torch.equal(a, both[name][rows[0]]) and torch.equal(b, both[name][rows[1]]), name
        # separate runs differ from the batched one only by batch-size-dependent rounding
        close(a, separate[0][1][name], atol=1e-5)
        close(b, separate[1][1][name], atol=1e-5)
    # the patch in the second invoke did not touch the first invoke's rows
    assert torch.equal(out_a, both_logits[rows[0]])
    close(out_a, separate[0][0], atol=1e-5)
    close(out_b, patched_ref, atol=1e-5)
    assert (out_b - separate[1][0]).abs().max() > 1e-3


@torch.no_grad()
def test_batched_loss_is_one_scalar(setup):
    # nnsight 0.8.1's base Batcher raises IndexError narrowing a 0-dim output
    model, tokens = setup
    nn_model = to_nnsight(model)
    with nn_model.trace() as tracer:
        with tracer.invoke(tokens, return_type="loss"):
            loss_a = nn_model.output.save()
        with tracer.invoke(tokens[:1], return_type="loss"):
            loss_b = nn_model.output.save()
    ref = model(torch.cat([tokens, tokens[:1]]), return_type="loss")
    assert loss_a.ndim == 0 and torch.equal(loss_a, ref) and torch.equal(loss_b, ref)


@torch.no_grad()
def test_batching_rejects_mismatched_positions(setup):
    model, tokens = setup
    nn_model = to_nnsight(model)
    with pytest.raises(ValueError, match="same|share"):
        with nn_model.trace() as tracer:
            with tracer.invoke(tokens):
                a = nn_model.output.save()  # noqa: F841 - nnsight traces the assignment
            with tracer.invoke(tokens[:, :5]):
                b = nn_model.output.save()  # noqa: F841


@pytest.mark.parametrize("wrap", [NNsight, to_nnsight])
@torch.no_grad()
def test_exception_in_trace_leaves_nothing_attached(setup, wrap):
    model, tokens = setup
    nn_model = wrap(model)
    clean = model(tokens)
    with pytest.raises(RuntimeError, match="boom"):
        with nn_model.trace(tokens):
            nn_model.blocks[0].attn.hook_h_res.output = torch.zeros(2, 7, 4, 4)
            nn_model.blocks[1].mlp.hook_streams_in.output[:, :, 2] = 0.0
            raise RuntimeError("boom")
    no_tl_hooks(model)
    assert torch.equal(model(tokens), clean)
    # TransformerLens still works on the wrapped model, and a new trace runs clean
    logits, cache = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_pattern")
    assert torch.equal(logits, clean)
    no_tl_hooks(model)
    with nn_model.trace(tokens):
        out = nn_model.output.save()
    assert torch.equal(out, clean)


@torch.no_grad()
def test_compiled_model_under_nnsight():
    """A compiled model traced by nnsight: the instrumented interiors run eagerly, so reads and
    patches inside a sublayer take effect exactly as on the eager model. (The shapes of
    test_compiled, so the compiled graphs are shared.)"""
    model = perturbed_model(compile_test_config(), seed=0)
    tokens = torch.randint(0, 40, COMPILE_SHAPE)
    nn_model = NNsight(model)
    ref_logits, cache = model.run_with_cache(tokens, names_filter="blocks.0.mlp.hook_post")
    eager_patched = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", lambda z, hook: 0 * z)])
    model.compile()
    assert not any(sub.compiled and not sub.interior_observed() for sub in model.sublayers)
    with nn_model.trace(tokens):
        post = nn_model.blocks[0].mlp.hook_post.output.save()
        logits = nn_model.output.save()
    close(post, cache["blocks.0.mlp.hook_post"], atol=1e-5)
    close(logits, ref_logits, atol=1e-5)
    with nn_model.trace(tokens):
        nn_model.blocks[0].attn.hook_z.output[:] = 0.0
        patched = nn_model.output.save()
    close(patched, eager_patched, atol=1e-5)
    assert (patched - ref_logits).abs().max() > 1e-3


@torch.no_grad()
def test_invokes_stay_apart_for_mixer_outputs_and_position_embeddings(setup):
    """The mixer's output (a NamedTuple of H_pre/H_post/H_res) and the position embedding are split
    per invoke like every other activation: an edit in invoke 2 leaves invoke 1 alone."""
    model, a = setup
    b = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(1))
    eye = torch.eye(4)
    ref_a = model(torch.cat([a, b]))[:2]
    ref_b = model.run_with_hooks(
        b,
        fwd_hooks=[
            ("blocks.0.attn.hook_h_res", lambda h, hook: eye.expand_as(h).clone()),
            ("hook_pos_embed", lambda p, hook: torch.zeros_like(p)),
        ],
    )
    nn_model = to_nnsight(model)
    with nn_model.trace() as tracer:
        with tracer.invoke(a):
            out_a = nn_model.output.save()
        with tracer.invoke(b):
            nn_model.pos_embed.output[:] = 0
            nn_model.blocks[0].attn.mixer.output.h_res[:] = eye
            h_pre = nn_model.blocks[0].attn.mixer.output.h_pre.save()
            out_b = nn_model.output.save()
    close(out_a, ref_a, atol=1e-5)
    close(out_b, ref_b, atol=1e-5)
    assert h_pre.shape == (3, 7, 4)
