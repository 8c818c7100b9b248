"""Sparse crosscoders over (layer, stream) sites: planted-feature recovery and stream assignment,
the per-source normalisation bias, the analysis maths on hand-set decoders, the activation buffer
(BOS/padding dropped, bf16, shuffled, refilled, bounded), save/load, progress bar and bad input.

Tiny matmuls on busy shared cores are ~15x slower with 2 threads than with 1, so this module
runs single-threaded (restored afterwards)."""

import numpy as np
import pytest
import torch

from mhc_interp.hooks.names import HookNameError
from mhc_interp.probes.base import ProbeResult
from mhc_interp.probes.crosscoder import (
    DEAD,
    SHARED,
    Crosscoder,
    CrosscoderConfig,
    CrosscoderEval,
    CrosscoderResult,
    analyze_crosscoder,
    match_decoder_directions,
    thresholds_for,
    train_crosscoder,
)
from mhc_interp.probes.crosscoder_buffer import (
    ActivationBuffer,
    ActivationSource,
    InMemoryActivations,
    default_sites,
    grid_sites,
    resolve_sites,
)
from mhc_interp.probes.runner import run_probes

from .conftest import perturbed_model, tiny_config

N_LAYERS, N_STREAMS, D = 2, 4, 16
N_EXCL, N_SHARED = 12, 12  # ground truth: 12 features only in stream 0, 12 in all streams


def reference_counts(share: np.ndarray, dead: np.ndarray, tau: float, thresholds):
    """The assignment written out: ({stream t / shared / dead: count} at tau, counts [threshold,
    n + 2] at every swept threshold) from decoder-norm shares [m, n] and a dead mask [m]."""
    n = share.shape[-1]
    at = lambda u: (
        [int(((share.argmax(-1) == t) & (share.max(-1) > u) & ~dead).sum()) for t in range(n)]
        + [int(((share.max(-1) <= u) & ~dead).sum()), int(dead.sum())]
    )
    expect = dict(zip([f"stream {t}" for t in range(n)] + ["shared", "dead"], at(tau)))
    return expect, np.array([at(u) for u in thresholds])


def planted(n_tokens=40000, p=0.1, noise=0.01, scale_stream=None, scale=10.0, seed=0):
    """Activations [N, L, n, d] = sum_i c_i(x) D_i + noise with sparse codes c (each feature on
    with probability p, magnitude U(0.5, 1.5)) and known directions D [F, L*n, d]: unit vectors at
    every site of stream 0 for the first N_EXCL features, at every site for the others. With
    `scale_stream`, that stream's activations (and directions) are multiplied by `scale`."""
    g = torch.Generator().manual_seed(seed)
    S = N_LAYERS * N_STREAMS
    stream_of = torch.arange(S) % N_STREAMS
    F = N_EXCL + N_SHARED
    Dirs = torch.randn(F, S, D, generator=g)
    Dirs /= Dirs.norm(dim=-1, keepdim=True)
    Dirs[:N_EXCL, stream_of != 0] = 0
    codes = (torch.rand(n_tokens, F, generator=g) < p) * (0.5 + torch.rand(n_tokens, F, generator=g))
    x = torch.einsum("nf,fsd->nsd", codes, Dirs) + noise * torch.randn(n_tokens, S, D, generator=g)
    if scale_stream is not None:
        x[:, stream_of == scale_stream] *= scale
        Dirs[:, stream_of == scale_stream] *= scale
    return x.reshape(n_tokens, N_LAYERS, N_STREAMS, D), Dirs


def fit(x, steps=600, **kw):
    cfg = dict(dict_size=48, k=3, lr=3e-3, batch_size=256, dead_after_tokens=5000)
    cfg.update(kw)
    return train_crosscoder(x, CrosscoderConfig(**cfg), n_steps=steps, progress=False)


def matched_assignment(cc, x, Dirs):
    """Recovery: each planted direction matched to an ALIVE latent (one that fired on the data)."""
    res = analyze_crosscoder(cc, x[:16384], n_tokens=16384)
    idx, cos = match_decoder_directions(cc.decoder_directions("raw"), Dirs, alive=~res["dead"])
    assert (idx >= 0).all() and not res["dead"][idx].any()
    return res, cos, res.assignment_at(0.5)[idx]


@pytest.fixture(scope="module")
def planted_run():
    x, Dirs = planted()
    cc = fit(x)
    return (x, Dirs, cc) + matched_assignment(cc, x, Dirs)


# ------------------------------------------------------------------------- planted features
def test_planted_features_recovered_and_assigned(planted_run):
    x, Dirs, cc, res, cos, assign = planted_run
    # "most": over data seeds 0-5 x init seeds 0-1 the fraction is 0.75-1.0 after 600 steps
    # (1.0 for this seed), and the median cosine is 1.00
    assert (cos > 0.9).mean() >= 0.7, np.round(cos, 3)
    assert np.median(cos) > 0.98
    excl, shared = assign[:N_EXCL], assign[N_EXCL:]
    assert (excl == 0).sum() >= N_EXCL - 1, excl  # stream-0-only features -> stream 0
    assert (shared == SHARED).sum() >= N_SHARED - 1, shared  # features in every stream -> shared
    counts = res.counts_at(0.5)
    assert counts["stream 1"] == counts["stream 2"] == counts["stream 3"] == 0
    assert counts["stream 0"] >= N_EXCL - 1
    # quality statistics
    assert res["explained_variance"].shape == (N_LAYERS * N_STREAMS,)
    assert res["explained_variance"].min() > 0.95
    assert res.meta["l0"] == pytest.approx(3, abs=1.0)
    # exclusive features put (almost) no decoder norm outside stream 0, shared ones ~1/n everywhere
    idx, _ = match_decoder_directions(cc.decoder_directions("raw"), Dirs, alive=~res["dead"])
    assert (res["stream_share"][idx[:N_EXCL], 0] > 0.9).sum() >= N_EXCL - 1
    assert (np.abs(res["stream_share"][idx[N_EXCL:]] - 0.25).max(-1) < 0.15).sum() >= N_SHARED - 1


def test_training_tracks_dead_latents_and_aux_loss(planted_run):
    cc = planted_run[2]
    hist = cc.history
    assert hist[0]["step"] == 1 and hist[-1]["step"] == 600 and hist[-1]["tokens"] == 600 * 256
    # 48 latents for 24 features: some die, and the aux loss is then switched on
    assert max(h["dead_frac"] for h in hist) > 0
    assert any(h["aux"] > 0 for h in hist)
    assert hist[-1]["fvu"] < 0.01 and hist[-1]["l0"] == pytest.approx(3)
    assert hist[-1]["lr"] < 0.1 * hist[0]["lr"]  # linear decay at the end
    assert float(cc.threshold) > 0  # BatchTopK inference threshold learned
    assert torch.equal(cc.dead_mask(), cc.tokens_since_fired >= 5000)


def test_stream_scale_bias_without_normalisation():
    """Stream 1 scaled up 10x: without per-source normalisation the shared features are assigned
    to the loud stream; with it (the default) they stay shared."""
    x, Dirs = planted(scale_stream=1)
    cc_off = fit(x, normalize=False)
    _, _, assign_off = matched_assignment(cc_off, x, Dirs)
    assert (assign_off[N_EXCL:] == 1).sum() >= N_SHARED - 2, assign_off

    cc_on = fit(x)
    assert cc_on.cfg.normalize
    res_on, cos_on, assign_on = matched_assignment(cc_on, x, Dirs)
    assert (assign_on[N_EXCL:] == SHARED).sum() >= N_SHARED - 1, assign_on
    assert (assign_on[:N_EXCL] == 0).sum() >= N_EXCL - 1, assign_on
    assert res_on.counts_at(0.5)["stream 1"] <= 1
    assert (cos_on > 0.9).mean() >= 0.7
    # the factors undo the scale: stream 1's factor is ~10x smaller than stream 2's
    nf = cc_on.norm_factors.view(N_LAYERS, N_STREAMS)
    assert torch.allclose(nf[:, 2] / nf[:, 1], torch.full((N_LAYERS,), 10.0), rtol=0.1)
    # analysing the same crosscoder in raw units brings the bias back
    raw = analyze_crosscoder(cc_on, space="raw")
    idx, _ = match_decoder_directions(cc_on.decoder_directions("raw"), Dirs, alive=~res_on["dead"])
    assert (raw.assignment_at(0.5)[idx[N_EXCL:]] == 1).sum() >= N_SHARED - 2


def test_l1_mode_recovers_planted_features():
    x, Dirs = planted(n_tokens=20000)
    cc = fit(x, sparsity="l1", l1_coeff=0.3, steps=400)
    res, cos, assign = matched_assignment(cc, x, Dirs)
    assert (cos > 0.9).mean() >= 0.7, np.round(cos, 3)
    assert (assign[:N_EXCL] == 0).sum() >= N_EXCL - 1
    assert cc.history[0]["l1_coeff"] == pytest.approx(0.3 / 20)  # warm-up over 5% of 400 steps
    assert cc.history[-1]["l1_coeff"] == pytest.approx(0.3)
    assert cc.history[-1]["sparsity"] > 0


# ------------------------------------------------------------------------------- the maths
def hand_set(norms):
    """A crosscoder on grid_sites(2, 2) whose W_dec[i, s] has norm norms[i][s]."""
    norms = torch.as_tensor(norms, dtype=torch.float32)
    m, S = norms.shape
    cc = Crosscoder(CrosscoderConfig(dict_size=m, k=1, n_sites=S, d_model=3, sites=grid_sites(2, 2)))
    with torch.no_grad():
        # along one axis, so the norms are exact (random unit directions left the result
        # depending on the global RNG state and float32 rounding at the 1e-7 level)
        cc.W_dec.zero_()
        cc.W_dec[..., 1] = norms
    return cc


def test_shares_assignment_and_counts_on_hand_set_decoders():
    # sites: (layer0, s0), (layer0, s1), (layer1, s0), (layer1, s1)
    cc = hand_set(
        [
            [1, 0, 1, 0],  # stream 0 only
            [0, 2, 0, 2],  # stream 1 only
            [1, 1, 1, 1],  # shared
            [3, 1, 0, 0],  # stream 0: share 0.75, layer 0 only
            [0, 0, 0, 0],
        ]
    )  # no decoder: dead
    cc.tokens_since_fired[2] = 10**9  # dead by the training tracker
    res = analyze_crosscoder(cc, threshold=0.5, thresholds=(0.5, 0.8))
    share = res["stream_share"]
    np.testing.assert_allclose(share[:4], [[1, 0], [0, 1], [0.5, 0.5], [0.75, 0.25]])
    np.testing.assert_allclose(res["layer_share"][:4], [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [1, 0]])
    np.testing.assert_array_equal(res.assignment_at(0.5), [0, 1, DEAD, 0, DEAD])
    np.testing.assert_array_equal(res.assignment_at(0.8), [0, 1, DEAD, SHARED, DEAD])
    assert res.counts_at(0.5) == {"stream 0": 2, "stream 1": 1, "shared": 0, "dead": 2}
    assert res.counts_at(0.8) == {"stream 0": 1, "stream 1": 1, "shared": 1, "dead": 2}
    assert np.isnan(res["explained_variance"]).all()  # no data given
    np.testing.assert_allclose(res["layer_profile"][0], [0.75, 0.25])  # stream-0 group at tau 0.5
    # raw space divides by the normalisation factors: stream 1 halved -> shared feature leans to 0
    cc.norm_factors.copy_(torch.tensor([1.0, 2.0, 1.0, 2.0]))
    raw = analyze_crosscoder(cc, space="raw", thresholds=(0.5,))
    np.testing.assert_allclose(raw["stream_share"][0], [1, 0])
    np.testing.assert_allclose(raw["stream_share"][3], [3 / 3.5, 0.5 / 3.5])
    assert "tau" in res.table() and "shared" in res.table()


def test_thresholds_are_relative_to_an_even_split():
    """With n streams the largest share is >= 1/n: a latent spread evenly over 3 streams is
    'shared' at every default threshold (the old absolute sweep started at 0.3 < 1/3, where no
    latent can be shared), and an absolute threshold below 1/n is refused."""
    from mhc_interp.probes.crosscoder import MAIN_RELATIVE_THRESHOLD

    norms = torch.tensor(
        [
            [1.0, 1.0, 1.0],  # even: share 1/3 each
            [1.2, 1.0, 1.0],  # nearly even: 0.375
            [3.0, 1.0, 0.0],  # stream 0: 0.75
            [0.0, 0.0, 2.0],
        ]
    )  # stream 2 only
    cc = Crosscoder(CrosscoderConfig(dict_size=4, k=1, n_sites=3, d_model=3, sites=grid_sites(1, 3)))
    with torch.no_grad():
        cc.W_dec.zero_()
        cc.W_dec[..., 0] = norms
    res = analyze_crosscoder(cc)
    n_shared = res["counts"][:, 3]
    assert res["thresholds"].min() > 1 / 3 and (n_shared >= 1).all(), res.table()
    np.testing.assert_allclose(
        res["thresholds"], sorted(thresholds_for(3, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1 / 3]))
    )
    np.testing.assert_allclose(res["thresholds_relative"], (res["thresholds"] - 1 / 3) / (2 / 3))
    assert res.meta["threshold"] == pytest.approx(1 / 3 + (2 / 3) / 3)
    np.testing.assert_array_equal(res.assignment_at(), [SHARED, SHARED, 0, 2])
    np.testing.assert_array_equal(res.assignment_at(thresholds_for(3, 0.9)), [SHARED, SHARED, SHARED, 2])
    with pytest.raises(ValueError, match=r"must lie in \[1/n, 1\) = \[0.333, 1\) for 3 streams, got \[0.3\]"):
        analyze_crosscoder(cc, thresholds=(0.3, 0.5))
    # the main threshold: 0.5 for 4 streams (as before), 2/3 for 2
    assert thresholds_for(4, MAIN_RELATIVE_THRESHOLD) == pytest.approx(0.5)
    assert thresholds_for(2, MAIN_RELATIVE_THRESHOLD) == pytest.approx(2 / 3)
    assert res.table().splitlines()[0].split()[:2] == ["tau", "rho"]


def test_recovery_matches_only_alive_latents():
    """A dead latent whose decoder happens to equal a planted direction is not a recovery."""
    true = torch.eye(3)[:2].view(2, 1, 3)  # 2 directions, 1 site
    learned = torch.tensor(
        [
            [1.0, 0.0, 0.0],  # dead, exact copy of dir 0
            [0.9, 0.4, 0.1],  # alive, near dir 0
            [0.0, 1.0, 0.0],
        ]
    ).view(3, 1, 3)  # alive, dir 1
    idx, cos = match_decoder_directions(learned, true)
    assert idx.tolist() == [0, 2]  # all latents: the dead one wins
    idx, cos = match_decoder_directions(learned, true, alive=np.array([False, True, True]))
    assert idx.tolist() == [1, 2] and cos[0] == pytest.approx(0.9 / np.sqrt(0.98)) and cos[1] == 1
    idx, cos = match_decoder_directions(learned, true, alive=np.array([False, False, True]))
    assert idx.tolist() == [-1, 2] and np.isnan(cos[0])  # too few alive latents
    with pytest.raises(ValueError, match="alive must be a \\[3\\] bool mask"):
        match_decoder_directions(learned, true, alive=np.ones(2, bool))


def test_encode_modes_init_and_explained_variance():
    torch.manual_seed(0)
    cfg = CrosscoderConfig(dict_size=20, k=3, n_sites=4, d_model=5, dec_init_norm=0.08)
    cc = Crosscoder(cfg)
    # W_enc = W_dec^T, every W_dec[i, s] of norm dec_init_norm
    assert torch.equal(cc.W_enc, cc.W_dec.permute(1, 2, 0))
    torch.testing.assert_close(cc.W_dec.norm(dim=-1), torch.full((20, 4), 0.08))
    with torch.no_grad():
        cc.b_enc.fill_(1.0)  # every ReLU(pre) > 0
        cc.b_dec.normal_(0, 0.1)
    x = torch.randn(7, 4, 5)
    f = cc.encode(x, mode="batchtopk")
    assert int((f > 0).sum()) == 3 * 7  # exactly k * B over the batch
    assert ((cc.encode(x, mode="topk") > 0).sum(-1) == 3).all()
    pre = cc.relu_pre(cc.normalize(x))
    torch.testing.assert_close(cc.encode(x, mode="relu"), pre)
    # written out: ReLU(sum_s W_enc^s (x^s - b_dec^s) + b_enc), x^s = c_s a^s
    xn = cc.normalize(x)
    ref = torch.relu(torch.einsum("bsd,sdm->bm", xn - cc.b_dec, cc.W_enc) + cc.b_enc)
    torch.testing.assert_close(cc.relu_pre(xn), ref)
    with pytest.raises(ValueError, match="threshold is not set"):
        cc.encode(x, mode="threshold")
    cc.threshold.fill_(0.0)
    torch.testing.assert_close(cc.encode(x), pre)  # threshold 0 keeps every positive
    # decode: f W_dec + b_dec; forward works in raw units
    cc.norm_factors.copy_(torch.tensor([1.0, 2.0, 4.0, 0.5]))
    out = cc(x)
    f = cc.encode(x)
    torch.testing.assert_close(
        out, (torch.einsum("bm,msd->bsd", f, cc.W_dec) + cc.b_dec) / cc.norm_factors[:, None]
    )
    # explained variance per site, against a direct computation in normalised units
    res = analyze_crosscoder(cc, x, n_tokens=7, thresholds=(0.5,))
    xn = cc.normalize(x)
    err = (xn - cc.decode(cc.encode(x))).pow(2).sum((0, 2))
    var = (xn - xn.mean(0)).pow(2).sum((0, 2))
    np.testing.assert_allclose(res["explained_variance"], (1 - err / var).detach().numpy(), rtol=1e-5)
    assert res.meta["tokens_used"] == 7


def test_normalisation_factors_and_b_dec_init():
    x = torch.randn(2000, 3, 8) * torch.tensor([1.0, 10.0, 0.1])[None, :, None] + 2.0
    cc = train_crosscoder(
        x,
        CrosscoderConfig(dict_size=16, k=2, batch_size=100, lr=1e-9, norm_estimate_tokens=2000),
        n_steps=1,
        progress=False,
    )
    normed = cc.normalize(x).norm(dim=-1).mean(0)
    torch.testing.assert_close(normed, torch.full((3,), 8**0.5), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cc.b_dec.detach(), cc.normalize(x).mean(0), atol=1e-3, rtol=1e-3)
    off = train_crosscoder(
        x, CrosscoderConfig(dict_size=16, k=2, batch_size=100, normalize=False), n_steps=1, progress=False
    )
    assert torch.equal(off.norm_factors, torch.ones(3))


# --------------------------------------------------------------------------- the buffer / model
@pytest.fixture(scope="module")
def tiny():
    model = perturbed_model(tiny_config())
    tokens = torch.randint(
        0, model.cfg.d_vocab, (24, model.cfg.n_ctx), generator=torch.Generator().manual_seed(0)
    )
    return model, tokens


def test_buffer_holds_exactly_the_non_bos_site_activations(tiny):
    model, tokens = tiny
    sites = [("blocks.0.attn.hook_streams_out", 2), ("blocks.1.mlp.hook_streams_out", 0)]
    buf = ActivationBuffer(model, tokens, sites, buffer_tokens=10_000, loop=False, model_batch_size=5)
    assert buf.hook_names == ["blocks.0.attn.hook_streams_out", "blocks.1.mlp.hook_streams_out"]
    rows = buf.next_batch(10_000)  # one pass: the last, partial batch
    n_tok = tokens.shape[0] * (tokens.shape[1] - 1)  # position 0 dropped
    assert rows.shape == (n_tok, 2, model.cfg.d_model) and rows.dtype == torch.float32
    assert buf.buffer.storage.dtype == torch.bfloat16
    with pytest.raises(StopIteration):
        buf.next_batch(4)
    _, cache = model.run_with_cache(tokens, names_filter=[h for h, _ in sites])
    ref = torch.stack([cache[h][:, 1:, s].reshape(-1, model.cfg.d_model) for h, s in sites], 1)
    ref = ref.to(torch.bfloat16).float()
    # same multiset of rows (the buffer is shuffled): sort by a fixed projection
    key = lambda r: r.flatten(1) @ torch.linspace(-1, 1, r[0].numel())
    torch.testing.assert_close(rows[key(rows).argsort()], ref[key(ref).argsort()])
    assert not torch.equal(rows, ref)  # ... and shuffled


def test_buffer_drops_padding_and_respects_exclude_first(tiny):
    datasets = pytest.importorskip("datasets")
    model, tokens = tiny
    ds = datasets.Dataset.from_dict({"input_ids": [tokens[0, :5].tolist(), tokens[1].tolist()]})
    buf = ActivationBuffer(model, ds, [("blocks.0.mlp.hook_streams_out", 1)], loop=False, buffer_tokens=100)
    assert buf.next_batch(100).shape[0] == 4 + 11
    buf = ActivationBuffer(
        model, tokens[:3], ["blocks.0.mlp.hook_streams_out"], loop=False, buffer_tokens=100, exclude_first=0
    )
    assert buf.next_batch(100).shape == (36, 4, 16)


def test_buffer_refills_as_it_drains_with_bounded_memory(tiny):
    model, tokens = tiny
    buf = ActivationBuffer(model, tokens, buffer_tokens=40, model_batch_size=2, batch_size=16)
    assert len(buf.sites) == 8 and buf.sites == default_sites(model)
    served = [buf.next_batch(16) for _ in range(60)]  # 960 rows > 3 passes of 264
    assert buf.buffer.storage.shape == (40, 8, 16)  # never grows
    assert buf.tokens_served == 960 and buf.passes >= 3 and buf.refills > 10
    assert buf.tokens_read <= 960 + 40 + 2 * 11
    assert all(torch.isfinite(b).all() for b in served)


def test_end_to_end_from_a_tiny_model(tiny, tmp_path):
    model, tokens = tiny
    buf = ActivationBuffer(model, tokens, buffer_tokens=128)
    cfg = CrosscoderConfig(dict_size=32, k=4, batch_size=32, lr=1e-3, dead_after_tokens=1000)
    cc = train_crosscoder(buf, cfg, n_steps=40, progress=False, log_every=10)
    assert cc.cfg.sites == buf.sites and cc.cfg.n_sites == 8 and cc.cfg.d_model == 16
    assert cc.history[-1]["fvu"] < cc.history[0]["fvu"]
    # the default sweep (rho >= 0.1) calls every latent of this barely trained crosscoder shared;
    # rho = 0 and 0.05 (tau = 1/n = 0.25, 0.2875) assign them to their largest stream
    thresholds = thresholds_for(4, (0.0, 0.05, 0.1, 0.5))
    res = run_probes(model, CrosscoderEval(cc, thresholds=thresholds), tokens, batch_size=8, progress=False)
    assert isinstance(res, CrosscoderResult)
    assert res.meta["tokens_used"] == tokens.shape[0] * (tokens.shape[1] - 1)
    assert res["stream_share"].shape == (32, 4) and res["layer_share"].shape == (32, 2)
    assert res["explained_variance_grid"].shape == (2, 4)
    np.testing.assert_allclose(res["stream_share"].sum(-1), 1, rtol=1e-6)
    assert res.meta["layers"] == ["blocks.0.mlp.hook_streams_out", "blocks.1.mlp.hook_streams_out"]
    # the counts at tau, recomputed from the decoder norms and the firing frequencies
    norms = cc.decoder_norms().double().numpy().reshape(32, 2, 4).sum(1)  # [m, n] per stream
    share = norms / norms.sum(-1, keepdims=True)
    dead = res["firing_frequency"] == 0
    tau = res.meta["threshold"]
    assert tau == pytest.approx(0.5)  # rho = 1/3, 4 streams
    expect, sweep = reference_counts(share, dead, tau, res["thresholds"])
    # ... and at every swept threshold (the low ones assign latents to streams)
    np.testing.assert_array_equal(res["counts"], sweep)
    assert sweep[0, :4].sum() > 0, res.table()
    assert res.counts_at() == expect
    # the same numbers straight from a tensor of the same activations (cached in the runner's
    # batches of 8, so the float32 forward is the same): statistics and assignment agree
    acts = []
    for i in range(0, len(tokens), 8):
        _, cache = model.run_with_cache(tokens[i : i + 8], names_filter=res.meta["layers"])
        acts.append(torch.stack([cache[h][:, 1:, s].reshape(-1, 16) for h, s in cc.sites], 1))
    acts = torch.cat(acts)  # [N, S, d]
    direct = analyze_crosscoder(cc, acts, n_tokens=len(acts), batch_size=100, thresholds=thresholds)
    assert direct.meta["tokens_used"] == res.meta["tokens_used"] == len(acts)
    np.testing.assert_allclose(direct["explained_variance"], res["explained_variance"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(direct["firing_frequency"], res["firing_frequency"], atol=1e-12)
    assert direct.meta["l0"] == pytest.approx(res.meta["l0"])
    np.testing.assert_array_equal(direct["assignment"], res["assignment"])
    # crosscoder save / load
    cc.save(tmp_path / "cc")
    back = Crosscoder.load(tmp_path / "cc")
    assert back.cfg == cc.cfg and back.history == cc.history
    for (k, v), (k2, v2) in zip(cc.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    x = buf.next_batch(8)
    assert torch.equal(back(x), cc(x))
    # result save / load / plots
    path = res.save(tmp_path / "res" / "crosscoder")
    again = ProbeResult.load(path)
    assert isinstance(again, CrosscoderResult)
    np.testing.assert_array_equal(again["assignment"], res["assignment"])
    assert again.counts_at() == res.counts_at()
    figs = again.save_figures(tmp_path / "figs")
    assert {p.stem for p in figs} == {
        "stream_share",
        "assignment_counts",
        "layer_profile",
        "explained_variance",
        "firing",
    }


def test_progress_bar_shows_loss_l0_and_dead_fraction(capsys):
    x, _ = planted(n_tokens=512)
    train_crosscoder(x, CrosscoderConfig(dict_size=8, k=2, batch_size=64), n_steps=3, log_every=1)
    err = capsys.readouterr().err
    assert "crosscoder" in err and "loss=" in err and "L0=" in err and "dead=" in err


# ------------------------------------------------------------------------------- bad input
def test_bad_sites(tiny):
    model, tokens = tiny
    with pytest.raises(HookNameError, match="Did you mean"):
        resolve_sites(model, [("blocks.0.mlp.hook_stream_out", 0)])
    with pytest.raises(HookNameError):
        ActivationBuffer(model, tokens, [("blocks.7.mlp.hook_streams_out", 0)])
    with pytest.raises(ValueError, match="stream index out of range"):
        resolve_sites(model, [("blocks.0.mlp.hook_streams_out", 4)])
    with pytest.raises(ValueError, match="not: .*hook_write"):
        resolve_sites(model, ["blocks.0.mlp.hook_write"])
    with pytest.raises(ValueError, match="duplicate"):
        resolve_sites(model, ["blocks.0.mlp.hook_streams_out", ("blocks.0.mlp.hook_streams_out", 1)])
    with pytest.raises(ValueError, match="empty list"):
        resolve_sites(model, [])
    with pytest.raises(TypeError, match="stream must be an int"):
        resolve_sites(model, [("blocks.0.mlp.hook_streams_out", 0.5)])
    assert (
        len(resolve_sites(model, "sublayers")) == (4 + 1) * 4
    )  # the embedding streams and 4 sublayer outputs


def test_bad_config():
    with pytest.raises(ValueError, match="k=65 is larger than the dictionary"):
        CrosscoderConfig(dict_size=64, k=65)
    with pytest.raises(ValueError, match="aux_k"):
        CrosscoderConfig(dict_size=64, aux_k=100)
    with pytest.raises(ValueError, match="sparsity"):
        CrosscoderConfig(sparsity="topk")
    with pytest.raises(ValueError, match="n_sites=3 but 2 sites"):
        CrosscoderConfig(n_sites=3, sites=[("a", 0), ("a", 1)])
    with pytest.raises(ValueError, match="needs n_sites and d_model"):
        Crosscoder(CrosscoderConfig())


def test_buffer_smaller_than_a_batch(tiny):
    model, tokens = tiny
    with pytest.raises(ValueError, match="holds 64 tokens, which is smaller than one training batch of 128"):
        ActivationBuffer(model, tokens, buffer_tokens=64, batch_size=128)
    buf = ActivationBuffer(model, tokens, buffer_tokens=64)
    with pytest.raises(ValueError, match="smaller than one training batch"):
        train_crosscoder(buf, CrosscoderConfig(dict_size=8, k=2, batch_size=128), n_steps=1, progress=False)
    with pytest.raises(ValueError, match="smaller than one training batch"):
        train_crosscoder(
            torch.randn(50, 2, 4),
            CrosscoderConfig(dict_size=8, k=2, batch_size=64),
            n_steps=1,
            progress=False,
        )


def test_data_shape_mismatch_and_missing_length():
    cfg = CrosscoderConfig(dict_size=8, k=2, batch_size=16, n_sites=3, d_model=4)
    with pytest.raises(ValueError, match="the data has 2 sites x d_model 4"):
        train_crosscoder(torch.randn(50, 2, 4), cfg, n_steps=1, progress=False)
    with pytest.raises(ValueError, match="n_steps or n_tokens"):
        train_crosscoder(torch.randn(50, 3, 4), cfg, progress=False)
    with pytest.raises(TypeError, match="ActivationBuffer"):
        train_crosscoder([1, 2, 3], cfg, n_steps=1, progress=False)


def test_non_finite_loss_names_the_step():
    x = torch.randn(256, 2, 4) * 1e20  # squared errors overflow float32
    cfg = CrosscoderConfig(dict_size=8, k=2, batch_size=32, normalize=False, init_b_dec_from_data=False)
    with pytest.raises(FloatingPointError, match=r"the loss is inf at step 1 "):
        train_crosscoder(x, cfg, n_steps=5, progress=False)

    class NaNAtStep3(InMemoryActivations):
        def next_batch(self, n):
            out = super().next_batch(n)
            if self.tokens_served == 3 * n:
                out[0, 0, 0] = float("nan")
            return out

    src = NaNAtStep3(torch.randn(256, 2, 4))
    cfg = CrosscoderConfig(dict_size=8, k=2, batch_size=32)
    with pytest.raises(FloatingPointError, match="stopped at step 3: non-finite values"):
        train_crosscoder(src, cfg, n_steps=5, progress=False)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no crosscoder"):
        Crosscoder.load(tmp_path)
    cc = Crosscoder(CrosscoderConfig(dict_size=4, k=1, n_sites=2, d_model=3))
    cc.save(tmp_path / "a")
    assert Crosscoder.load(tmp_path / "a" / "crosscoder.json").cfg == cc.cfg
    assert issubclass(InMemoryActivations, ActivationSource)


def test_a_second_crosscoder_on_a_drained_buffer(tiny):
    """The normalisation sample of a later training run refills a drained buffer instead of
    estimating from no rows (NaN factors); a used-up one-pass buffer is a clear error."""
    model, tokens = tiny
    buf = ActivationBuffer(model, tokens[:8], buffer_tokens=64, model_batch_size=4, batch_size=64)
    cfg = CrosscoderConfig(dict_size=16, k=2, batch_size=64)
    train_crosscoder(buf, cfg, n_steps=2, progress=False)
    second = train_crosscoder(buf, cfg, n_steps=2, progress=False)
    assert torch.isfinite(second.norm_factors).all() and torch.isfinite(second.b_dec).all()
    once = ActivationBuffer(model, tokens[:2], buffer_tokens=22, loop=False, batch_size=22)
    once.next_batch(22)
    with pytest.raises(ValueError, match="no rows left for the normalisation sample"):
        train_crosscoder(once, cfg.__class__(dict_size=16, k=2, batch_size=22), n_steps=1, progress=False)


def test_shuffle_buffer_serves_rows_in_the_documented_order():
    """ShuffleBuffer keeps slots, not rows, in order; what it serves equals a slow reference that
    moves the rows themselves: a list of unread rows, appended to, permuted by the same seeded
    randperm, read from the front. Puts are cut at the capacity."""
    from mhc_interp.probes.crosscoder_buffer import ShuffleBuffer

    buf, ref, gen = ShuffleBuffer(10, seed=4), [], torch.Generator().manual_seed(4)
    rows = torch.arange(60, dtype=torch.float32)[:, None].expand(60, 3)
    fed, served, expected = 0, [], []
    for k_put, k_take in [(7, 0), (9, 4), (6, 5), (12, 3), (10, 10), (8, 2)]:
        took = buf.put(rows[fed : fed + k_put])
        assert took == min(k_put, 10 - len(ref))
        ref += rows[fed : fed + took].tolist()
        fed += took
        buf.shuffle()
        ref = [ref[i] for i in torch.randperm(len(ref), generator=gen).tolist()]
        assert buf.peek(2).tolist() == ref[:2]
        served += buf.take(k_take).tolist()
        expected, ref = expected + ref[:k_take], ref[k_take:]
        assert buf.unread == len(ref)
    assert served == expected and len(served) == 24
    assert buf.storage.shape == (10, 3)
