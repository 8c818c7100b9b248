"""Stream-usage diagnostics against a slow reference from a full cache, planted read shares, and
the runner (token sources, masking, batching invariance, bounded state, errors)."""

import numpy as np
import pytest
import torch
from datasets import Dataset

from mhc_interp.hooks import HookNameError
from mhc_interp.probes import Probe, ProbeResult, StreamUsage, run_probes

from .conftest import perturbed_model, planted_reader_model, tiny_config


@pytest.fixture(scope="module")
def hc_model():
    return perturbed_model(tiny_config("hc"), seed=3)


@pytest.fixture(scope="module")
def corpus():
    torch.manual_seed(7)
    return torch.randint(0, 40, (7, 10))


def reference_usage(model, tokens, exclude_first=1):
    """Loops over tokens in numpy, from a cache of every stream and coefficient hook (caching the
    attention pattern too would switch attention to the eager path and change the float rounding)."""
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: "hook_streams" in n or "hook_h_" in n)
    n = model.cfg.n_streams
    out = {k: [] for k in ("h_res", "dist", "read", "read_norm", "write", "norm", "fro", "var_s", "h_post")}
    for s in model.sublayer_names:
        x = (
            cache[f"{s}.hook_streams_in"][:, exclude_first:]
            .double()
            .numpy()
            .reshape(-1, n, model.cfg.d_model)
        )
        hp = cache[f"{s}.hook_h_pre"][:, exclude_first:].double().numpy().reshape(-1, n)
        hq = cache[f"{s}.hook_h_post"][:, exclude_first:].double().numpy().reshape(-1, n)
        hr = cache[f"{s}.hook_h_res"][:, exclude_first:].double().numpy().reshape(-1, n, n)
        rows = {k: [] for k in out}
        for t in range(len(x)):
            norms = np.array([np.sqrt((x[t, i] ** 2).sum()) for i in range(n)])
            rows["h_res"].append(hr[t])
            rows["dist"].append(np.sqrt(((hr[t] - np.eye(n)) ** 2).sum()))
            rows["read"].append(np.abs(hp[t]) / np.abs(hp[t]).sum())
            rows["read_norm"].append(np.abs(hp[t]) * norms / (np.abs(hp[t]) * norms).sum())
            rows["write"].append(np.abs(hq[t]) / np.abs(hq[t]).sum())
            rows["norm"].append(norms)
            rows["fro"].append(np.sqrt((hq[t] ** 2).sum()))
            rows["var_s"].append(np.var(hq[t]))
            rows["h_post"].append(hq[t])
        for k in out:
            out[k].append(np.mean(rows[k], axis=0) if k != "h_post" else np.var(rows[k], axis=0).mean())
    return {k: np.array(v) for k, v in out.items()}


def test_online_aggregation_is_split_invariant(hc_model, corpus):
    """The same activations fed whole or in pieces give the same statistics (float64 sums)."""
    probe = StreamUsage()
    probe.setup(hc_model)
    _, cache = hc_model.run_with_cache(corpus, names_filter=probe.hook_names(hc_model))
    mask = torch.ones(corpus.shape, dtype=torch.bool)
    mask[:, 0] = False
    probe.update(cache, mask)
    whole = probe.result()
    probe.setup(hc_model)
    for rows in (slice(0, 1), slice(1, 4), slice(4, 7)):
        probe.update({k: v[rows] for k, v in cache.items()}, mask[rows])
    pieces = probe.result()
    for key in whole.arrays:
        np.testing.assert_allclose(pieces[key], whole[key], rtol=1e-12, atol=1e-14)


def test_matches_reference_for_any_batch_split(hc_model, corpus):
    """Through the runner; the model's float32 forward itself differs at ~1e-7 between batch
    sizes, so the tolerance is that of float32 activations."""
    ref = reference_usage(hc_model, corpus)
    for batch_size in (1, 3, 7):
        r = run_probes(hc_model, StreamUsage(), corpus, batch_size=batch_size, progress=False)
        np.testing.assert_allclose(r["mean_h_res"], ref["h_res"], atol=1e-7)
        np.testing.assert_allclose(r["h_res_dist"], ref["dist"], atol=1e-7)
        np.testing.assert_allclose(
            r["mean_h_res_dist"], np.linalg.norm(ref["h_res"] - np.eye(4), axis=(1, 2)), atol=1e-7
        )
        np.testing.assert_allclose(r["read_share"], ref["read"], atol=1e-7)
        np.testing.assert_allclose(r["read_share_norm"], ref["read_norm"], atol=1e-7)
        np.testing.assert_allclose(r["write_share"], ref["write"], atol=1e-7)
        np.testing.assert_allclose(r["stream_norm"][:-1], ref["norm"], rtol=1e-6)
        np.testing.assert_allclose(r["h_post_fro"], ref["fro"], atol=1e-7)
        np.testing.assert_allclose(r["h_post_var_streams"], ref["var_s"], atol=1e-7)
        np.testing.assert_allclose(r["h_post_var_tokens"], ref["h_post"], atol=1e-7)
        assert r.meta["tokens"] == 7 * 9


def test_planted_read_share_is_one_on_the_read_stream(corpus):
    model = planted_reader_model(reader=2, dropped=1)
    r = run_probes(model, StreamUsage(), corpus, progress=False)
    expected = np.zeros((model.cfg.n_sublayers, 4))
    expected[:, 2] = 1.0
    np.testing.assert_allclose(r["read_share"], expected, atol=1e-12)
    np.testing.assert_allclose(r["read_share_norm"], expected, atol=1e-12)
    h_res = np.eye(4)
    h_res[:, 1] = 0
    np.testing.assert_allclose(r["mean_h_res"], np.broadcast_to(h_res, (4, 4, 4)), atol=1e-12)
    np.testing.assert_allclose(r["write_share"][0], np.linspace(0.5, 1.5, 4) / 4, atol=1e-12)


def test_identity_mixing_has_zero_distance(corpus):
    model = planted_reader_model(reader=0, dropped=1)
    with torch.no_grad():
        for sub in model.sublayers:
            sub.mixer.static_alpha[:, 1:] = torch.eye(4)
    r = run_probes(model, StreamUsage(), corpus, progress=False)
    np.testing.assert_allclose(r["h_res_dist"], 0, atol=1e-12)
    np.testing.assert_allclose(r["h_post_var_tokens"], 0, atol=1e-12)  # static writes


def test_state_does_not_grow(hc_model):
    probe = StreamUsage()
    probe.setup(hc_model)
    names = probe.hook_names(hc_model)
    sizes = []
    for i in range(12):
        _, cache = hc_model.run_with_cache(torch.randint(0, 40, (2, 6)), names_filter=names)
        probe.update(cache, torch.ones(2, 6, dtype=torch.bool))
        sizes.append(sum(t.numel() for t in probe.sums.values()))
    assert len(set(sizes)) == 1


def test_result_save_load_and_plot(hc_model, corpus, tmp_path):
    r = run_probes(hc_model, StreamUsage(), corpus, progress=False)
    r.save(tmp_path / "usage")
    again = ProbeResult.load(tmp_path / "usage")
    assert type(again).__name__ == "StreamUsageResult"
    assert again.meta["sublayers"] == hc_model.sublayer_names
    np.testing.assert_array_equal(again["read_share"], r["read_share"])
    paths = again.save_figures(tmp_path / "figs")
    assert {p.name for p in paths} == {"h_res.png", "shares.png", "stream_norms.png", "h_post.png"}
    assert all(p.stat().st_size > 1000 for p in paths)


def test_single_stream_model_is_refused(corpus):
    with pytest.raises(ValueError, match="no meaning"):
        run_probes(perturbed_model(tiny_config("none", 1)), StreamUsage(), corpus, progress=False)


# ------------------------------------------------------------------------------- runner
class TokenCount(Probe):
    """A minimal custom probe: counts unmasked tokens and sums the logits' first entry."""

    name = "token_count"

    def __init__(self, hook="hook_logits"):
        self.hook, self.count, self.first = hook, 0, 0.0

    def hook_names(self, model):
        return [self.hook]

    def update(self, acts, mask):
        self.count += int(mask.sum())
        self.first += float(acts[self.hook][mask][:, 0].double().sum())

    def result(self):
        return ProbeResult(self.name, {"count": np.array(self.count), "first": np.array(self.first)})


def test_runner_sources_masking_and_max_tokens(hc_model, tmp_path):
    ragged = Dataset.from_dict({"input_ids": [[1, 2, 3, 4], [5, 6], [7, 8, 9]]})
    r = run_probes(hc_model, TokenCount(), ragged, batch_size=2, progress=False)
    assert int(r["count"]) == 3 + 1 + 2  # position 0 and padding excluded
    r = run_probes(hc_model, TokenCount(), ragged, batch_size=2, exclude_first=0, progress=False)
    assert int(r["count"]) == 9
    flat = torch.arange(1, 31) % 40
    r = run_probes(hc_model, TokenCount(), flat, seq_len=10, progress=False)
    assert int(r["count"]) == 3 * 9
    # the last, shorter window is kept (padded and masked): 34 tokens = 3 x 10 + 4
    r = run_probes(hc_model, TokenCount(), torch.arange(1, 35) % 40, seq_len=10, batch_size=2, progress=False)
    assert int(r["count"]) == 3 * 9 + 3 and r.meta["tokens_seen"] == 34
    # a one-token remainder has nothing to score and is dropped; so is a tensor shorter than a window no more
    r = run_probes(hc_model, TokenCount(), torch.arange(1, 32) % 40, seq_len=10, progress=False)
    assert int(r["count"]) == 3 * 9 and r.meta["tokens_seen"] == 30
    r = run_probes(hc_model, TokenCount(), torch.arange(1, 6), seq_len=10, progress=False)
    assert int(r["count"]) == 4
    # max_tokens is exact: 2 x 5 tokens, then the first 2 tokens of the next batch's first row
    r = run_probes(
        hc_model, TokenCount(), torch.randint(0, 40, (8, 5)), batch_size=2, max_tokens=12, progress=False
    )
    assert int(r["count"]) == 2 * 4 + 1 and r.meta["tokens_seen"] == 12

    class Bytes:  # a stand-in tokenizer: one token per character, ids mod vocab
        def encode(self, text):
            return [ord(c) % 40 for c in text]

    hc_model.tokenizer = Bytes()
    try:
        (tmp_path / "a.txt").write_text("abcdefghij" * 3)
        r = run_probes(hc_model, TokenCount(), [tmp_path / "a.txt"], seq_len=10, progress=False)
        assert int(r["count"]) == 3 * 9
        r = run_probes(
            hc_model, TokenCount(), Dataset.from_dict({"text": ["x" * 25]}), seq_len=12, progress=False
        )
        assert int(r["count"]) == 2 * 11
        # documents shorter than a window (short sentences) are scored, not dropped
        short = Dataset.from_dict({"text": ["a" * 8, "b" * 17, "c" * 7]})
        r = run_probes(hc_model, TokenCount(), short, seq_len=10, batch_size=2, progress=False)
        assert int(r["count"]) == 7 + (9 + 6) + 6 and r.meta["tokens_seen"] == 8 + 17 + 7
    finally:
        hc_model.tokenizer = None


def test_token_budget_cuts_row_major_over_valid_tokens():
    from mhc_interp.probes.runner import within_budget

    tokens = torch.arange(12).view(3, 4)
    valid = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)  # 2 + 3 + 4 valid
    same = within_budget(tokens, valid, 9)
    assert same[0] is tokens and same[1] is valid
    cut_tokens, cut_valid = within_budget(tokens, valid, 4)
    assert torch.equal(cut_tokens, tokens[:2])  # row 2 dropped
    assert cut_valid.tolist() == [[True, True, False, False], [True, True, False, False]]
    assert within_budget(tokens, valid, 2)[1].tolist() == [[True, True, False, False]]


def test_runner_shares_one_forward_and_stops_early(hc_model, corpus):
    calls = []
    for name in ("hook_embed", "blocks.1.attn.hook_streams_in", "hook_logits"):
        hc_model.add_hook(name, lambda a, hook: calls.append(hook.name), is_permanent=True)
    try:
        early = TokenCount("blocks.0.mlp.hook_write")
        r = run_probes(hc_model, [early, StreamUsage()], corpus, batch_size=7, progress=False)
        assert set(r) == {"token_count", "stream_usage"}
        assert calls == ["hook_embed", "blocks.1.attn.hook_streams_in"]  # one forward, no unembed
        calls.clear()
        run_probes(hc_model, early, corpus, batch_size=7, progress=False)
        assert calls == ["hook_embed"]  # stopped after blocks.0.mlp
        calls.clear()
        run_probes(hc_model, TokenCount(), corpus, batch_size=4, progress=False)
        assert calls.count("hook_logits") == 2
    finally:
        hc_model.reset_hooks(including_permanent=True)


def test_runner_errors(hc_model, corpus):
    with pytest.raises(HookNameError, match="Did you mean"):
        run_probes(hc_model, TokenCount("blocks.0.mlp.hook_wrte"), corpus, progress=False)
    with pytest.raises(TypeError, match="unsupported token source"):
        run_probes(hc_model, TokenCount(), {"tokens": corpus}, progress=False)
    with pytest.raises(ValueError, match="no tokens"):
        run_probes(hc_model, TokenCount(), torch.zeros(0, 5, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        run_probes(hc_model, TokenCount(), Dataset.from_dict({"text": ["abc"]}), progress=False)
    with pytest.raises(ValueError, match="exclude_first must be a non-negative int"):
        run_probes(hc_model, TokenCount(), corpus, exclude_first=-1, progress=False)
    with pytest.raises(ValueError, match=r"\[n_seq, pos\] or 1-D, got shape \(2, 3, 4\)"):
        run_probes(hc_model, TokenCount(), torch.zeros(2, 3, 4, dtype=torch.long), progress=False)
    hook = hc_model.stream_hook("blocks.1.attn.hook_streams_in", 0, float("nan"))
    with hc_model.hooks([hook]):
        with pytest.raises(FloatingPointError, match="blocks.1"):
            run_probes(hc_model, StreamUsage(), corpus, progress=False)
    assert not hc_model.list_hooks()


def test_collapse_summary(corpus):
    """One stream read exclusively: entropy 0 and dominant share 1."""
    r = run_probes(planted_reader_model(reader=2, dropped=1), StreamUsage(), corpus, progress=False)
    s = r.collapse_summary()
    assert s["read_share_entropy"] == pytest.approx(0.0, abs=1e-9)
    assert s["dominant_read_share"] == pytest.approx(1.0)
    assert s["norm_imbalance"] >= 1.0
