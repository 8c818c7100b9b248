"""Per-stream logit lens: the exact decomposition on the public code's reference checkpoints, the
last site's stream sum = the final distribution, every view against a direct computation, the
probe's online means against per-prompt lenses, the translator seam, bad input, results."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from mhc_interp import HookedMHC
from mhc_interp.hooks import HookNameError
from mhc_interp.probes import ProbeResult, run_probes
from mhc_interp.probes.logit_lens import (
    LogitLens,
    LogitLensResult,
    all_subsets,
    check_subsets,
    decompose_logits,
    stream_contributions,
)
from mhc_interp.probes.logit_lens_prompt import PromptLensResult, logit_lens

from .conftest import FIXTURES, REFERENCE_NAMES, perturbed_model, tiny_config


@pytest.fixture(scope="module")
def hc_model():
    return perturbed_model(tiny_config("hc"), seed=5)


@pytest.fixture(scope="module")
def corpus():
    torch.manual_seed(11)
    return torch.randint(0, 40, (5, 9))


@pytest.mark.parametrize("name", REFERENCE_NAMES)
def test_decomposition_sums_to_logits_on_reference_checkpoints(name, tokens):
    model = HookedMHC.from_pretrained(FIXTURES / f"{name}.pt")
    contributions, logits = decompose_logits(model, tokens, atol=1e-5)
    assert contributions.shape == (*tokens.shape, model.cfg.n_streams, model.cfg.d_vocab)
    assert torch.equal(logits, model(tokens))
    assert (contributions.sum(-2) - logits).abs().max() <= 1e-5
    reference = torch.load(FIXTURES / f"{name}.logits.pt", weights_only=True)  # the public code's logits
    assert (contributions.sum(-2) - reference).abs().max() <= 1e-4
    # the lens of the last site's stream sum is the final distribution; so is the probe's
    lens = logit_lens(model, tokens[:1], k=3)
    assert lens.meta["site_labels"][-1] == model.sublayer_names[-1]
    assert lens["kl"][-1, 0].max() < 1e-6
    assert lens["top1_agree"][-1, 0].all()
    assert lens.meta["decomposition_max_error"] <= 1e-5
    probe = run_probes(model, LogitLens(), tokens, batch_size=1, progress=False)
    assert probe["kl"][-1, 0] < 1e-6 and probe["top1"][-1, 0] == 1.0
    assert probe.meta["decomposition_max_error"] <= 1e-5
    if model.cfg.n_streams == 1:  # one stream: the stream alone is the sum
        np.testing.assert_allclose(probe["kl"][:, 1], probe["kl"][:, 0], atol=1e-6)


@torch.no_grad()
def test_views_match_direct_computation(hc_model, corpus):
    """Every view and branch output against W_U^T LN_f(.) computed with the model's own modules,
    in float64 (hc: unconstrained, possibly negative coefficients)."""
    model, toks = hc_model, corpus[:1]
    subsets = [(0, 2), (1, 2, 3)]
    lens = logit_lens(model, toks, k=4, subsets=subsets)
    names = lens.meta["sites"] + [f"{s}.hook_write" for s in model.sublayer_names]
    logits, cache = model.run_with_cache(toks, names_filter=names)
    W_U = model.W_U.double()

    ln = model.ln_final

    def unembed(x):
        return F.layer_norm(x.double(), (16,), ln.weight.double(), ln.bias.double(), ln.eps) @ W_U

    final_lp = F.log_softmax(logits[0].double(), -1)

    def kl(view):
        return (final_lp.exp() * (final_lp - F.log_softmax(view, -1))).sum(-1).numpy()

    assert lens.meta["views"] == [
        "sum",
        "stream 0",
        "stream 1",
        "stream 2",
        "stream 3",
        "streams 0+2",
        "streams 1+2+3",
    ]
    for i, site in enumerate(lens.meta["sites"]):
        c = unembed(cache[site][0])  # [pos, n, V]
        views = [c.sum(1)] + [c[:, s] for s in range(4)] + [c[:, list(s)].sum(1) for s in subsets]
        for j, view in enumerate(views):
            np.testing.assert_allclose(lens["kl"][i, j], kl(view), atol=2e-5)
            np.testing.assert_array_equal(lens["topk_ids"][i, j][:, 0], view.argmax(-1).numpy())
            np.testing.assert_allclose(
                lens["topk_probs"][i, j], F.softmax(view, -1).topk(4).values.numpy(), atol=1e-5
            )
    for i, sub in enumerate(model.sublayer_names):
        w = unembed(cache[f"{sub}.hook_write"][0])
        np.testing.assert_allclose(lens["write_kl"][i], kl(w), atol=2e-5)
        np.testing.assert_array_equal(lens["write_topk_ids"][i][:, 0], w.argmax(-1).numpy())
    contrib = stream_contributions(model, cache[lens.meta["sites"][-1]][0])
    ids = lens["final_topk_ids"]
    np.testing.assert_array_equal(ids[:, 0], logits[0].argmax(-1).numpy())
    np.testing.assert_allclose(
        lens["final_topk_contributions"],
        contrib.gather(-1, torch.as_tensor(ids)[:, None].expand(-1, 4, -1)).numpy(),
    )


def test_probe_is_the_token_mean_of_the_prompt_lens(hc_model, corpus):
    subsets = [(0, 1)]
    per_prompt = [logit_lens(hc_model, corpus[i], subsets=subsets) for i in range(len(corpus))]
    kl = np.mean(np.concatenate([p["kl"][:, :, 1:] for p in per_prompt], axis=-1), axis=-1)
    top1 = np.mean(np.concatenate([p["top1_agree"][:, :, 1:] for p in per_prompt], axis=-1), axis=-1)
    kl_w = np.mean(np.concatenate([p["write_kl"][:, 1:] for p in per_prompt], axis=-1), axis=-1)
    for batch_size, chunk in ((1, 128), (2, 3), (5, 7)):
        r = run_probes(
            hc_model,
            LogitLens(subsets=subsets, chunk_tokens=chunk),
            corpus,
            batch_size=batch_size,
            progress=False,
        )
        assert r["kl"].shape == (hc_model.cfg.n_layers + 1, 1 + 4 + 1)
        np.testing.assert_allclose(r["kl"], kl, atol=1e-6)
        np.testing.assert_allclose(r["top1"], top1, atol=1e-12)
        np.testing.assert_allclose(r["kl_write"], kl_w, atol=1e-6)
        assert r.meta["tokens"] == corpus[:, 1:].numel()
    # each stream's share of the top-1 margin sums to the margin of the logits
    logits = hc_model(corpus)[:, 1:].detach().double()
    margin = (logits.max(-1).values - logits.mean(-1)).mean()
    assert r["final_top1_contribution"].sum() == pytest.approx(float(margin), abs=1e-5)


def test_translator_seam(hc_model, corpus):
    toks = corpus[:1]
    calls = []

    def recorder(site, x):
        calls.append((site, tuple(x.shape)))
        return x

    plain = logit_lens(hc_model, toks, subsets=[(0, 1)])
    seen = logit_lens(hc_model, toks, subsets=[(0, 1)], translator=recorder)
    np.testing.assert_array_equal(plain["kl"], seen["kl"])
    p = toks.shape[1]
    assert calls[: len(plain.meta["sites"])] == [(s, (p, 4, 16)) for s in plain.meta["sites"]]
    assert calls[len(plain.meta["sites"]) :] == [
        (f"{s}.hook_write", (p, 16)) for s in hc_model.sublayer_names
    ]
    # a mapping translates only the named sites
    site = plain.meta["sites"][1]
    mapped = logit_lens(hc_model, toks, translator={site: lambda x: -x})
    assert not np.allclose(mapped["kl"][1], plain["kl"][1, :5])
    np.testing.assert_array_equal(np.delete(mapped["kl"], 1, 0), np.delete(plain["kl"][:, :5], 1, 0))
    # the probe takes the same seam
    probe = run_probes(hc_model, LogitLens(translator={site: lambda x: -x}), corpus, progress=False)
    base = run_probes(hc_model, LogitLens(), corpus, progress=False)
    np.testing.assert_array_equal(np.delete(probe["kl"], 1, 0), np.delete(base["kl"], 1, 0))
    assert not np.allclose(probe["kl"][1], base["kl"][1])
    with pytest.raises(ValueError, match="translator for site"):
        logit_lens(hc_model, toks, translator=lambda s, x: x[..., :3])


def test_bad_input(hc_model, corpus):
    for bad, err, match in (
        ([()], ValueError, "empty"),
        ([(0, 4)], IndexError, "out of range"),
        ([(-1,)], IndexError, "out of range"),
        ([(1, 1)], ValueError, "repeats"),
        ([(0, 1.5)], TypeError, "ints"),
        ((0, 1), TypeError, "list of stream subsets"),
    ):
        with pytest.raises(err, match=match):
            logit_lens(hc_model, corpus[:1], subsets=bad)
        with pytest.raises(err, match=match):
            run_probes(hc_model, LogitLens(subsets=bad), corpus, progress=False)
    assert check_subsets([(3, 0), 2], 4) == [(0, 3), (2,)]
    assert len(all_subsets(4)) == 6 + 4 and all_subsets(4, 1, 4)[-1] == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="one prompt"):
        logit_lens(hc_model, corpus[:2])
    with pytest.raises(HookNameError):
        logit_lens(hc_model, corpus[:1], sites=["blocks.9.attn.hook_streams_out"])
    with pytest.raises(ValueError, match="stream states"):
        logit_lens(hc_model, corpus[:1], sites=["blocks.0.attn.hook_read"])
    with pytest.raises(ValueError, match="sites must be"):
        LogitLens(sites="everything").setup(hc_model)
    with pytest.raises(ArithmeticError, match="atol"):
        decompose_logits(hc_model, corpus[:1], atol=0.0)
    with pytest.raises(ValueError, match="k must be"):
        logit_lens(hc_model, corpus[:1], k=0)


def test_results_save_load_plot(hc_model, corpus, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    r = run_probes(hc_model, LogitLens(subsets=[(0, 3)], sites="layers"), corpus, progress=False)
    assert r.meta["site_labels"] == ["embed", "blocks.0.mlp", "blocks.1.mlp"]
    back = ProbeResult.load(r.save(tmp_path / "lens"))
    assert isinstance(back, LogitLensResult)
    np.testing.assert_array_equal(back["kl"], r["kl"])
    assert "streams 0+3" in back.table()
    paths = back.save_figures(tmp_path / "lens_png")
    assert {p.stem for p in paths} == {"kl", "top1", "writes", "final_decomposition"}
    assert all(p.stat().st_size > 0 for p in paths)

    single = logit_lens(hc_model, corpus[0], k=3, writes=False)
    back = ProbeResult.load(single.save(tmp_path / "prompt"))
    assert isinstance(back, PromptLensResult)
    assert back["write_topk_ids"].shape == (0, corpus.shape[1], 3)
    assert back.top_tokens(-1, "stream 2", 4) == single.top_tokens(len(single.meta["sites"]) - 1, 3, 4)
    assert "stream 3" in back.table(position=2)
    paths = back.save_figures(tmp_path / "prompt_png")
    assert {p.stem for p in paths} == {"kl", "top1_grid", "final_decomposition"}


# --------------------------------------------------------------- the probe against the slow reference
class _ReferenceLens:
    """The probe's earlier update, kept as the slow reference: per block of tokens, per site, the
    full [tokens, views, d_vocab] view logits, a log_softmax per view, KL and argmax from them."""

    def __init__(self, model, subsets=(), sites=None, writes=True, translator=None):
        from mhc_interp.probes.logit_lens import _translate, lens_sites
        from mhc_interp.probes.logit_lens_prompt import _kl_top1, _view_logits

        self.f = dict(translate=_translate, view_logits=_view_logits, kl_top1=_kl_top1)
        self.model, self.subsets, self.translator = model, list(subsets), translator
        self.sites = lens_sites(model, sites)
        self.sublayers = model.sublayer_names if writes else []
        self.final_site = f"{model.sublayer_names[-1]}.hook_streams_out"
        ln, W_U = model.ln_final, model.W_U.float()  # the readout, written out: W_U^T LN_f(x)
        self.unembed = lambda x: (
            F.layer_norm(
                x.float(),
                ln.weight.shape,
                ln.weight.float(),
                None if ln.bias is None else ln.bias.float(),
                ln.eps,
            )
            @ W_U
        )

    @torch.no_grad()
    def run(self, tokens):
        names = set(self.sites) | {self.final_site} | {f"{s}.hook_write" for s in self.sublayers}
        logits, cache = self.model.run_with_cache(tokens, names_filter=lambda n: n in names)
        keep = torch.ones(tokens.shape, dtype=torch.bool)
        keep[:, 0] = False
        rows = keep.flatten().nonzero()[:, 0]
        take = lambda t: t.flatten(0, 1)[rows]
        final = take(logits).float()
        final_lp, top = F.log_softmax(final, -1), final.argmax(-1)
        tr, n = self.f["translate"], self.model.cfg.n_streams
        kl = torch.stack(
            [
                self.f["kl_top1"](
                    final_lp,
                    top,
                    self.f["view_logits"](self.unembed(tr(self.translator, s, take(cache[s]))), self.subsets),
                )[0]
                .double()
                .mean(0)
                for s in self.sites
            ]
        )
        top1 = torch.stack(
            [
                self.f["kl_top1"](
                    final_lp,
                    top,
                    self.f["view_logits"](self.unembed(tr(self.translator, s, take(cache[s]))), self.subsets),
                )[1]
                .double()
                .mean(0)
                for s in self.sites
            ]
        )
        kl_w, top1_w = [], []
        for sub in self.sublayers:
            w = self.unembed(tr(self.translator, f"{sub}.hook_write", take(cache[f"{sub}.hook_write"])))[
                :, None
            ]
            k, a = self.f["kl_top1"](final_lp, top, w)
            kl_w.append(k[:, 0].double().mean()), top1_w.append(a[:, 0].double().mean())
        contrib = self.unembed(take(cache[self.final_site]))
        centred = contrib - contrib.mean(-1, keepdim=True)
        share = centred.gather(-1, top[:, None, None].expand(-1, n, 1))[..., 0].double().mean(0)
        return {
            "kl": kl.numpy(),
            "top1": top1.numpy(),
            "kl_write": torch.stack(kl_w).numpy() if kl_w else np.zeros(0),
            "top1_write": torch.stack(top1_w).numpy() if top1_w else np.zeros(0),
            "final_top1_contribution": share.numpy(),
            "decomposition_max_error": float((contrib.sum(1) - final).abs().max()),
        }


def _compare_with_reference(model, tokens, batch_size=2, **kw):
    ref = _ReferenceLens(model, **kw).run(tokens)
    for chunk in (1, 3, 64):
        r = run_probes(
            model, LogitLens(chunk_tokens=chunk, **kw), tokens, batch_size=batch_size, progress=False
        )
        np.testing.assert_allclose(r["kl"], ref["kl"], atol=2e-6, rtol=1e-6)
        np.testing.assert_array_equal(r["top1"], ref["top1"])  # the same argmax decisions
        np.testing.assert_allclose(r["kl_write"], ref["kl_write"], atol=2e-6, rtol=1e-6)
        np.testing.assert_array_equal(r["top1_write"], ref["top1_write"])
        np.testing.assert_allclose(r["final_top1_contribution"], ref["final_top1_contribution"], atol=1e-6)
        assert r.meta["decomposition_max_error"] == pytest.approx(ref["decomposition_max_error"], abs=2e-6)
    return r


@pytest.mark.parametrize(
    "case", ["default", "subsets_layers", "sites_without_final", "translated_final", "no_writes"]
)
def test_probe_equals_slow_reference(hc_model, corpus, case):
    """The probe's batched form (one GEMM for every site and write, one log_softmax and amax per
    view row, p.z from the model's width, the final distribution shared) equals the direct
    per-site computation to float rounding, with the same top-1 decisions."""
    sites = [f"{s}.hook_streams_out" for s in hc_model.sublayer_names[:2]]
    kw = {
        "default": {},
        "subsets_layers": dict(subsets=[(0, 2), (1, 2, 3)], sites="layers"),
        "sites_without_final": dict(sites=sites, subsets=[(0, 1)]),
        "translated_final": dict(
            translator={f"{hc_model.sublayer_names[-1]}.hook_streams_out": lambda x: 0.5 * x + 0.1}
        ),
        "no_writes": dict(writes=False),
    }[case]
    _compare_with_reference(hc_model, corpus, **kw)


def test_probe_equals_reference_on_reference_checkpoint(tokens):
    model = HookedMHC.from_pretrained(FIXTURES / "mhc_n4.pt")
    _compare_with_reference(model, tokens, subsets=[(0, 1)])


def test_top1_ties_follow_argmax(hc_model, corpus):
    """Two identical unembedding columns make exact ties at the max: the lens must decide them
    as argmax does (the first index), like the reference."""
    import copy

    model = copy.deepcopy(hc_model)
    with torch.no_grad():
        W = model.W_U  # tied or not, edit what the lens reads
        W[:, 7] = 3 * W[:, 3]
        W[:, 3] = W[:, 7]
    ref = _ReferenceLens(model).run(corpus)
    r = run_probes(model, LogitLens(), corpus, batch_size=2, progress=False)
    np.testing.assert_array_equal(r["top1"], ref["top1"])
    np.testing.assert_allclose(r["kl"], ref["kl"], atol=2e-6, rtol=1e-6)
    logits = model(corpus)[:, 1:]
    assert (logits.argmax(-1) == 3).float().mean() > 0.2  # ties did happen at the top


def test_token_fraction_and_standard_errors(hc_model, corpus):
    full = run_probes(hc_model, LogitLens(), corpus, batch_size=2, progress=False)
    assert full.meta["tokens"] == full.meta["tokens_seen"] == corpus[:, 1:].numel()
    for key in ("kl", "top1", "kl_write", "top1_write"):
        se = full[f"{key}_se"]
        assert se.shape == full[key].shape and np.all(np.isfinite(se)) and np.all(se >= 0)
    # the clustered SE against a direct computation from per-sequence means
    per_prompt = [logit_lens(hc_model, corpus[i]) for i in range(len(corpus))]
    S = np.stack([p["kl"][:, :, 1:].sum(-1) for p in per_prompt])  # [seq, site, view]
    n_i = corpus.shape[1] - 1
    mean = S.sum(0) / (n_i * len(S))
    g = len(S)
    se = np.sqrt(g / (g - 1) * ((S - mean * n_i) ** 2).sum(0)) / (n_i * g)
    # atol: at the final site the sum view's KL is 0 up to float32 rounding (~1e-7), and so its SE
    np.testing.assert_allclose(full["kl_se"], se, rtol=1e-4, atol=1e-6)
    half = run_probes(hc_model, LogitLens(token_fraction=0.5, seed=3), corpus, batch_size=2, progress=False)
    assert 0 < half.meta["tokens"] < full.meta["tokens"] and half.meta["tokens_seen"] == full.meta["tokens"]
    assert half.meta["token_fraction"] == 0.5
    again = run_probes(hc_model, LogitLens(token_fraction=0.5, seed=3), corpus, batch_size=2, progress=False)
    np.testing.assert_array_equal(half["kl"], again["kl"])  # seeded
    assert np.all(np.abs(half["kl"] - full["kl"]) < 6 * half["kl_se"] + 1e-6)
    with pytest.raises(ValueError, match="token_fraction"):
        LogitLens(token_fraction=0)


@pytest.mark.parametrize("host_check", [True, False])
def test_argmax_is_without_index_tracking_max(host_check):
    """The lens's top-1 test (z[y*] is the max and no earlier entry ties) equals argmax == y* on
    logits with many exact ties, in both the host-checked and the sync-free form."""
    from mhc_interp.probes.logit_lens import _argmax_is

    gen = torch.Generator().manual_seed(0)
    z = torch.randint(0, 4, (6, 50, 9), generator=gen).float()  # few values: ties everywhere
    top = torch.randint(0, 9, (50,), generator=gen)
    want = z.argmax(-1) == top[None]
    idx = top[None, :, None].expand(6, -1, 1)
    z_top = z.gather(-1, idx)[..., 0]
    got = _argmax_is(z.clone(), idx, z_top, z.amax(-1), host_check=host_check)
    assert torch.equal(got, want) and want.any() and (~want).any()


def test_lens_reads_the_deepseek_v4_adapter_through_its_own_readout():
    """On the HF adapter (a learned hc_head collapses the streams before one RMSNorm) the probe
    reads each stream through the model's `stream_contributions`: the "sum" view of the final
    state is the model's output (KL 0, top-1 1), each view's KL equals a direct softmax of the
    adapter's own contributions, and the write lens (one-stream states) is refused by name."""
    pytest.importorskip("transformers")
    from mhc_interp.adapters import HookedHFMHC, tiny_deepseek_v4

    model = HookedHFMHC(tiny_deepseek_v4(seed=0))
    toks = torch.randint(0, model.cfg.d_vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="writes=False"):
        run_probes(model, LogitLens(), toks, progress=False)
    r = run_probes(model, LogitLens(sites="sublayers", writes=False), toks, progress=False)
    final = r.meta["sites"].index(f"{model.sublayer_names[-1]}.hook_streams_out")
    assert r["kl"][final, 0] == pytest.approx(0, abs=1e-5) and r["top1"][final, 0] == 1
    logits, cache = model.run_with_cache(toks, names_filter=lambda n: n in r.meta["sites"])
    keep = torch.ones(toks.shape, dtype=torch.bool)
    keep[:, 0] = False  # run_probes' default mask drops position 0
    lp_final = F.log_softmax(logits[keep].float(), -1)
    for k, site in enumerate(r.meta["sites"]):
        c = model.stream_contributions(cache[site])[keep]  # [N, n, V]
        views = torch.cat([c.sum(1, keepdim=True), c], 1)
        kl = (lp_final.exp()[:, None] * (lp_final[:, None] - F.log_softmax(views, -1))).sum(-1).mean(0)
        np.testing.assert_allclose(r["kl"][k], kl.detach().double().numpy(), atol=1e-5, rtol=1e-4)
    assert r.meta["decomposition_max_error"] < 1e-4


def test_report_samples_the_lens_with_its_errors():
    """The report's lens scores `lens_token_fraction` of the tokens, and its figures say so."""
    from mhc_interp.report import ReportConfig

    lens = LogitLens.for_report(ReportConfig(lens_token_fraction=0.5))
    assert lens.token_fraction == 0.5 and LogitLens.for_report(ReportConfig()).token_fraction == 0.25
    with pytest.raises(ValueError, match="token_fraction"):
        LogitLens.for_report(ReportConfig(lens_token_fraction=0.0))
