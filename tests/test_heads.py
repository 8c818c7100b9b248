"""Attention-head detectors: planted previous-token, duplicate-token and copy-suppression heads are
found; pattern scores, ablation scores and successor scores against slow direct computations;
bad input; results."""

import math

import numpy as np
import pytest
import torch

from mhc_interp.model.mlp import MLPSublayer
from mhc_interp.probes import ProbeResult, run_probes
from mhc_interp.probes.heads import (
    HEAD_SCORES,
    HeadDetector,
    HeadScores,
    detect_heads,
    head_ablation_hook,
    repeated_random_tokens,
    successor_scores,
)

from .conftest import perturbed_model, tiny_config

PREV, DUP, COPY = (1, 1), (0, 0), (1, 0)


def planted_model(copy_sign: float = -1.0, seed: int = 0):
    """A tiny mHC model (d_model 16, 2 heads of d_head 8, n_ctx 12) with three heads built by hand.

    Embeddings: position p -> a (cos tp, sin tp, -cos tp, -sin tp) in dims 0-3 (t = pi/12, so
    no two offsets alias), tokens -> a zero-mean vector of fixed norm in dims 4-9. Every embedding
    then has mean 0 and the same norm, so each branch LayerNorm (weight 1, bias 0) is a fixed
    rescaling. Layer 0 writes nothing (c_proj zeroed) and mHC's H_res is doubly stochastic, so
    every stream entering layer 1 is (up to Sinkhorn's rounding) the embedding, and so is H_pre x.
      head PREV = (1, 1): q = G R(-t) pos(p), k = pos(k): score G cos(t (q - 1 - k)), max at k = q - 1.
      head DUP = (0, 0): q = G2 tok + c R(pi) pos, k = tok + pos: the same token wins (tokens have
          fixed norm), and among copies the positional term -c cos(t (q - k)) excludes k = q.
      head COPY = (1, 0): q = k = 0 (uniform causal attention), v = token dims, output
          copy_sign * lambda * (token dims): writes minus (or plus) the embeddings of the context
          tokens, i.e. (tied unembedding) lowers (raises) their logits.
    """
    model = perturbed_model(tiny_config("mhc"), seed=seed)
    cfg = model.cfg
    d, dh = cfg.d_model, cfg.d_head
    t, a = math.pi / 12, 3.0
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in (model.blocks[0].attn, model.blocks[0].mlp):
            sub.c_proj.weight.zero_()
            sub.c_proj.bias.zero_()
        pos = torch.arange(cfg.n_ctx, dtype=torch.float32) * t
        model.pos_embed.weight.zero_()
        for j, v in enumerate((pos.cos(), pos.sin(), -pos.cos(), -pos.sin())):
            model.pos_embed.weight[:, j] = a * v
        tok = torch.randn(cfg.d_vocab, 6, generator=g)
        tok = tok - tok.mean(1, keepdim=True)
        model.embed.weight.zero_()
        model.embed.weight[:, 4:10] = tok / tok.norm(dim=1, keepdim=True) * math.sqrt(12)
        c, s = math.cos(t), math.sin(t)
        for layer, head in (PREV, DUP, COPY):
            attn = model.blocks[layer].attn
            attn.ln.weight.fill_(1.0)
            attn.ln.bias.zero_()
            W, b = attn.c_attn.weight, attn.c_attn.bias
            q, k, v = (slice(o + head * dh, o + (head + 1) * dh) for o in (0, d, 2 * d))
            for sl in (q, k):
                W[sl] = 0
                b[sl] = 0
            q0, k0, v0 = q.start, k.start, v.start
            if (layer, head) == PREV:
                G = 400.0
                W[q0, 0], W[q0, 1], W[q0 + 1, 0], W[q0 + 1, 1] = G * c, G * s, -G * s, G * c
                W[k0, 0] = W[k0 + 1, 1] = 1.0
            elif (layer, head) == DUP:
                G2, cpos = 30000.0, 200.0
                W[q0, 0] = W[q0 + 1, 1] = -cpos  # -c * pos(q) . pos(k)
                W[k0, 0] = W[k0 + 1, 1] = 1.0
                for i in range(2, dh):  # token dims 4..9 of the key / query
                    W[q0 + i, 2 + i] = G2
                    W[k0 + i, 2 + i] = 1.0
            else:
                W[v] = 0
                b[v] = 0
                for i in range(dh):
                    W[v0 + i, 4 + i] = 1.0
                P = attn.c_proj.weight  # [d_out, d_in]
                P[:, head * dh : (head + 1) * dh] = 0
                for i in range(dh):
                    P[4 + i, head * dh + i] = copy_sign * 4.0
    return model


@pytest.fixture(scope="module")
def model():
    return planted_model()


@pytest.fixture(scope="module")
def corpus():
    torch.manual_seed(3)
    return torch.randint(0, 40, (12, 12))


def test_planted_heads_rank_first(model, corpus):
    scores = detect_heads(model, corpus, n_random=8, ordinal_sequences=[[1, 2, 3, 4, 5], [20, 21, 22, 23]])
    top = {s: scores.top_heads(s, 1)[0] for s in ("previous_token", "duplicate_token", "copy_suppression")}
    assert (top["previous_token"]["layer"], top["previous_token"]["head"]) == PREV
    assert top["previous_token"]["score"] > 0.99
    assert (top["duplicate_token"]["layer"], top["duplicate_token"]["head"]) == DUP
    assert top["duplicate_token"]["score"] > 0.99
    assert (top["copy_suppression"]["layer"], top["copy_suppression"]["head"]) == COPY
    assert top["copy_suppression"]["score"] > 0.1
    assert scores.meta["sources"] == {
        "previous_token": "corpus",
        "copy_suppression": "corpus",
        "induction": "repeated_random",
        "duplicate_token": "repeated_random",
        "successor": "ordinal",
    }
    # reads / writes: the layer's mean H_pre / H_post at its attention sublayer
    row = scores.top_heads("previous_token", 1)[0]
    assert row["reads"] == scores["mean_h_pre"][1].tolist() and len(row["writes"]) == 4
    # a copying head (writes +embeddings) scores negative
    copier = planted_model(copy_sign=+1.0)
    r = run_probes(copier, HeadDetector(heads=[COPY]), corpus, progress=False)
    assert r["copy_suppression"][COPY] < -0.1
    assert np.isnan(r["copy_suppression"][PREV])
    # without a corpus, everything comes from the repeated random sequences
    alone = detect_heads(model, n_random=8, copy_suppression=False)
    assert alone.top_heads("previous_token", 1)[0]["score"] > 0.99
    assert alone.meta["sources"]["previous_token"] == "repeated_random"
    assert np.isnan(alone["copy_suppression"]).all() and "copy_suppression" in alone.meta["skipped"]


def _reference_pattern_scores(model, tokens):
    """Slow loops over (sequence, query) from an eager cache of the patterns; position 0 excluded."""
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    L, H = model.cfg.n_layers, model.cfg.n_heads
    out = {
        k: [[[] for _ in range(H)] for _ in range(L)]
        for k in ("previous_token", "duplicate_token", "induction")
    }
    toks = tokens.tolist()
    for l in range(L):
        pat = cache[f"blocks.{l}.attn.hook_pattern"].double().numpy()
        for b, seq in enumerate(toks):
            for q in range(1, len(seq)):
                dup = [k for k in range(q) if seq[k] == seq[q]]
                ind = sorted({k + 1 for k in dup if k + 1 < q})
                for h in range(H):
                    out["previous_token"][l][h].append(pat[b, h, q, q - 1])
                    if dup:
                        out["duplicate_token"][l][h].append(pat[b, h, q, dup].sum())
                    if ind:
                        out["induction"][l][h].append(pat[b, h, q, ind].sum())
    return {k: np.array([[np.mean(v[l][h]) for h in range(H)] for l in range(L)]) for k, v in out.items()}


def _reference_copy_suppression(model, tokens):
    """One full forward per head with the head's z zeroed (run_with_hooks), full logits."""
    clean = model(tokens).double()
    p = tokens.shape[1]
    out = np.zeros((model.cfg.n_layers, model.cfg.n_heads))
    for l in range(model.cfg.n_layers):
        for h in range(model.cfg.n_heads):
            delta = model.run_with_hooks(tokens, fwd_hooks=[head_ablation_hook(model, l, h)]).double() - clean
            vals = []
            for b in range(tokens.shape[0]):
                for q in range(1, p):
                    ctx = tokens[b, 1 : q + 1]
                    vals.append((delta[b, q, ctx].mean() - delta[b, q].mean()).item())
            out[l, h] = np.mean(vals)
    return out


@torch.no_grad()
def test_scores_match_direct_computation(corpus):
    model = perturbed_model(tiny_config("mhc_lite", n_layers=2, n_heads=4), seed=2)
    toks = corpus[:, :10] % 7  # small alphabet: many duplicates and induction targets
    ref = _reference_pattern_scores(model, toks)
    cs_ref = _reference_copy_suppression(model, toks)
    for batch_size, max_rows in ((12, 64), (5, 7), (1, 1)):
        r = run_probes(model, HeadDetector(max_rows=max_rows), toks, batch_size=batch_size, progress=False)
        for key, want in ref.items():
            np.testing.assert_allclose(r[key], want, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(r["copy_suppression"], cs_ref, atol=2e-5)
    h_pre = torch.stack(
        [
            model.run_with_cache(toks, names_filter=f"blocks.{l}.attn.hook_h_pre")[1][
                f"blocks.{l}.attn.hook_h_pre"
            ][:, 1:]
            .double()
            .mean((0, 1))
            for l in range(2)
        ]
    )
    np.testing.assert_allclose(r["mean_h_pre"], h_pre.numpy(), atol=1e-6)
    # repeated random sequences: distinct halves, each second-half query has one earlier copy
    rep = repeated_random_tokens(model, n_seq=3, half_len=5, seed=1)
    assert rep.shape == (3, 11) and torch.equal(rep[:, 1:6], rep[:, 6:])
    assert all(len(set(row[:6].tolist())) == 6 for row in rep)
    assert torch.equal(rep, repeated_random_tokens(model, n_seq=3, half_len=5, seed=1))


@torch.no_grad()
def test_successor_scores(model):
    seqs = [[5, 6, 7, 8, 9], [30, 31, 32]]
    scores, count = successor_scores(model, seqs)
    assert count == 4 + 2 and scores.shape == (2, 2)
    # direct: head output W_O^h v_k read through LN_f's weight and W_U over the sequence's tokens
    l, h, dh = 1, 1, model.cfg.d_head
    hits = 0
    for seq in seqs:
        _, cache = model.run_with_cache(torch.tensor([seq]), names_filter=f"blocks.{l}.attn.hook_v")
        W_O = model.blocks[l].attn.c_proj.weight[:, h * dh : (h + 1) * dh]
        for k in range(len(seq) - 1):
            o = W_O @ cache[f"blocks.{l}.attn.hook_v"][0, k, h]
            o = (o - o.mean()) * model.ln_final.weight
            hits += int((o @ model.W_U[:, seq]).argmax() == k + 1)
    assert scores[l, h] == pytest.approx(hits / count)
    # no tokenizer and no sequences: skipped with a clear message
    r = detect_heads(model, n_random=4, copy_suppression=False)
    assert np.isnan(r["successor"]).all()
    assert (
        "ordinal_sequences" in r.meta["skipped"]["successor"] and r.meta["sources"]["successor"] == "skipped"
    )
    assert "skipped: successor scores need ordinal sequences" in r.table()
    with pytest.raises(ValueError, match="need a tokenizer"):
        successor_scores(model, [["one", "two", "three"]])
    with pytest.raises(ValueError, match="repeats"):
        successor_scores(model, [[1, 2, 1]])
    with pytest.raises(ValueError, match=">= 3"):
        successor_scores(model, [[1, 2]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        successor_scores(model, [[1, 2, 99]])


def test_bad_input(model, corpus):
    with pytest.raises(IndexError, match="head index 2 out of range"):
        head_ablation_hook(model, 0, 2)
    with pytest.raises(IndexError, match="layer index -1 out of range"):
        head_ablation_hook(model, -1, 0)
    with pytest.raises(IndexError, match="head index 5"):
        detect_heads(model, corpus, heads=[(0, 1), (1, 5)])
    with pytest.raises(IndexError, match="out of range"):
        run_probes(model, HeadDetector(heads=[(2, 0)]), corpus, progress=False)
    with pytest.raises(TypeError, match="pairs"):
        HeadDetector(heads=[3]).setup(model)
    with pytest.raises(ValueError, match="empty"):
        HeadDetector(heads=[]).setup(model)
    with pytest.raises(TypeError, match="HookedMHC"):
        detect_heads(torch.nn.Linear(3, 3))
    odd = perturbed_model(tiny_config("mhc"), seed=0)
    odd.blocks[1].attn = MLPSublayer(odd.cfg)
    with pytest.raises(TypeError, match="blocks.1.attn.*MLPSublayer"):
        detect_heads(odd)
    with pytest.raises(ValueError, match="half_len"):
        repeated_random_tokens(model, half_len=6)  # n_ctx 12: 1 + 2 * 6 > 12


def test_result_save_load_plot(model, corpus, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    r = detect_heads(model, corpus, n_random=4, ordinal_sequences=[[1, 2, 3]])
    assert set(HEAD_SCORES) <= set(r.arrays) and all(r[s].shape == (2, 2) for s in HEAD_SCORES)
    back = ProbeResult.load(r.save(tmp_path / "heads"))
    assert isinstance(back, HeadScores)
    assert back.top_heads("previous_token", 2) == r.top_heads("previous_token", 2)
    text = back.table(k=2)
    assert all(s in text for s in HEAD_SCORES) and "reads (H_pre)" in text
    with pytest.raises(KeyError, match="unknown score"):
        back.top_heads("name_mover")
    paths = back.save_figures(tmp_path / "png")
    assert {p.stem for p in paths} == {"scores", "layer_distribution", "read_write"}
    assert all(p.stat().st_size > 0 for p in paths)


def test_default_ordinal_sequences_are_runs_of_single_tokens():
    """A built-in ordinal word that splits into several tokens ends the run: the sequence never
    skips a step (the demo tokenizer used to give " one two three ten"), and a list with no run
    of 3 is left out; with no usable list the skip reason says so (not "no tokenizer")."""
    from types import SimpleNamespace

    from mhc_interp.probes.head_inputs import DEFAULT_ORDINAL_WORDS, _default_ordinal_ids

    split = {" four", " five", " six", " seven", " eight", " nine", " March", " 4"}
    vocab = {w: i for i, w in enumerate(w for ws in DEFAULT_ORDINAL_WORDS.values() for w in ws)}
    tok = SimpleNamespace(encode=lambda w: [vocab[w], vocab[w]] if w in split else [vocab[w]])
    model = SimpleNamespace(tokenizer=tok, cfg=SimpleNamespace(d_vocab=len(vocab)))
    got = _default_ordinal_ids(model)
    ids = lambda words: [vocab[w] for w in words]
    assert got == [
        ids(DEFAULT_ORDINAL_WORDS["days"]),
        ids(DEFAULT_ORDINAL_WORDS["months"][3:]),  # " March" splits: the run starts after it
        ids([" one", " two", " three"]),
        ids([" 5", " 6", " 7", " 8", " 9"]),
    ]
    assert (
        _default_ordinal_ids(
            SimpleNamespace(tokenizer=SimpleNamespace(encode=lambda w: [0, 1]), cfg=model.cfg)
        )
        == []
    )
