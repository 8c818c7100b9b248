"""The generic HF adapter's seam: a second model family is one `HyperConnectionSpec`.

A toy HF-style hyper-connection model is defined here (its own module tree, names and maths: a
causal attention branch, an MLP branch that also routes by token id, a static readout head) with
its spec, loaded into `HookedHFMHC` and probed. Planted ground truth: every sublayer and the head
read stream 0 only (H_pre and the head weights one-hot) and no other stream feeds stream 0
(H_res row 0 = e_0), so with the mixing frozen nothing that happens to streams 1.. can reach the
logits; H_post depends on the whole state, so with the mixing recomputed it can."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mhc_interp.adapters import HookedHFMHC, HyperConnectionSpec, UnsupportedModelError
from mhc_interp.probes import StreamUsage, ablate_and_rescue, run_probes

N, D, VOCAB, LAYERS = 3, 16, 32, 2


def toy_coefficients(hc: nn.Module, x: torch.Tensor):
    """(H_pre, H_post [b, p, n], H_res [b, p, n(target), n(source)]): static, plus an
    input-dependent H_post (gain * tanh of a projection of the whole state)."""
    b, p = x.shape[:2]
    post = hc.post + hc.gain * torch.tanh(x.reshape(b, p, -1).float() @ hc.w_post)
    return hc.pre.expand(b, p, -1).float(), post, hc.res.expand(b, p, -1, -1).float()


class ToyHyperConnection(nn.Module):
    def __init__(self, n: int, d: int):
        super().__init__()
        self.hc_mult, self.gain = n, 0.5
        self.pre = nn.Parameter(torch.rand(n))
        self.post = nn.Parameter(torch.rand(n))
        self.res = nn.Parameter(torch.softmax(torch.randn(n, n), -1))  # [target, source]
        self.w_post = nn.Parameter(torch.randn(n * d, n) / d)


class ToyAttention(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, h):  # [b, p, d]
        q, k, v = self.qkv(h).chunk(3, -1)
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True))


class ToyTokenMLP(nn.Module):
    """An MLP plus a per-token-id bias: the branch routes by token id, like a hash MoE."""

    def __init__(self, d: int, vocab: int):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.token_bias = nn.Parameter(torch.randn(vocab, d) * 0.5)

    def forward(self, h, ids):
        return self.down(F.gelu(self.up(h))) + self.token_bias[ids]


class ToyLayer(nn.Module):
    def __init__(self, n: int, d: int, vocab: int):
        super().__init__()
        self.mix_a, self.norm_a, self.attention = ToyHyperConnection(n, d), nn.LayerNorm(d), ToyAttention(d)
        self.mix_m, self.norm_m, self.ffn = ToyHyperConnection(n, d), nn.LayerNorm(d), ToyTokenMLP(d, vocab)

    def forward(self, x, ids):  # the toy's own forward
        for hc, norm, branch in (
            (self.mix_a, self.norm_a, self.attention),
            (self.mix_m, self.norm_m, self.ffn),
        ):
            pre, post, res = toy_coefficients(hc, x)
            out = norm((pre.unsqueeze(-1) * x).sum(2))
            out = branch(out, ids) if branch is self.ffn else branch(out)
            x = res @ x + post.unsqueeze(-1) * out.unsqueeze(-2)
        return x


class ToyHead(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.weights = nn.Parameter(torch.rand(n))

    def forward(self, x):  # [b, p, n, d] -> [b, p, d]
        return (self.weights.unsqueeze(-1) * x).sum(2)


class ToyForCausalLM(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.model = nn.Module()
            self.model.embed_tokens = nn.Embedding(VOCAB, D)
            self.model.layers = nn.ModuleList([ToyLayer(N, D, VOCAB) for _ in range(LAYERS)])
            self.model.final = nn.RMSNorm(D, eps=1e-6)
            self.model.collapse = ToyHead(N)
            self.lm_head = nn.Linear(D, VOCAB, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, ids):
        x = self.model.embed_tokens(ids).unsqueeze(2).expand(-1, -1, N, -1)
        for layer in self.model.layers:
            x = layer(x, ids)
        return self.lm_head(self.model.final(self.model.collapse(x)))


TOY = HyperConnectionSpec(
    name="toy",
    description="the toy model of tests/test_hf_adapter_spec.py",
    layout={"attn": ("mix_a", "norm_a", "attention"), "mlp": ("mix_m", "norm_m", "ffn")},
    hc_attrs=("hc_mult", "pre", "post", "res", "w_post"),
    head_attrs=("weights",),
    coefficients=toy_coefficients,
    head_weights=lambda head, x: head.weights.float().expand(*x.shape[:2], -1),
    branch=lambda kind, module, h, context, ids: module(h) if kind == "attn" else module(h, ids),
    layer_forward=lambda layer, x, context, ids: layer(x, ids),
    routes_by_token=lambda branch: isinstance(branch, ToyTokenMLP),
    parts=dict(embed="embed_tokens", layers="layers", final_norm="final", head="collapse"),
)


def planted(seed: int = 0) -> ToyForCausalLM:
    """Every read and the head one-hot on stream 0; stream 0 fed by itself only."""
    toy = ToyForCausalLM(seed)
    with torch.no_grad():
        for layer in toy.model.layers:
            for hc in (layer.mix_a, layer.mix_m):
                hc.pre.copy_(F.one_hot(torch.tensor(0), N).float())
                hc.res[0] = F.one_hot(torch.tensor(0), N).float()
        toy.model.collapse.weights.copy_(F.one_hot(torch.tensor(0), N).float())
    return toy.eval()


@pytest.fixture(scope="module")
def toks():
    return torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))


def test_toy_family_loads_and_matches_its_own_forward(toks):
    toy = ToyForCausalLM(1).eval()
    model = HookedHFMHC(toy, spec=TOY)  # the parity check runs here
    assert (
        model.cfg.n_streams == N and model.cfg.n_sublayers == 2 * LAYERS and model.cfg.hash_layers == (0, 1)
    )
    with torch.no_grad():
        logits, cache = model.run_with_cache(toks)
        torch.testing.assert_close(logits, toy(toks), atol=1e-5, rtol=1e-5)
        state = cache["blocks.1.attn.hook_streams_in"]
        torch.testing.assert_close(
            model(state, start_at_sublayer=2, tokens=toks), logits, atol=1e-5, rtol=1e-5
        )
        with pytest.raises(ValueError, match="routes by token id"):
            model(state, start_at_sublayer=2)
        contributions = model.stream_contributions(cache["head.hook_streams_in"])  # [b, p, n, vocab]
        torch.testing.assert_close(contributions.sum(2), logits, atol=1e-4, rtol=1e-4)


def test_a_spec_that_gets_the_maths_wrong_is_caught():
    """H_res read as [source, target] (the transpose): the parity check refuses the model."""

    def transposed(hc, x):
        pre, post, res = toy_coefficients(hc, x)
        return pre, post, res.transpose(-1, -2)

    from dataclasses import replace

    with pytest.raises(UnsupportedModelError, match="does not compute"):
        HookedHFMHC(ToyForCausalLM(2), spec=replace(TOY, coefficients=transposed))
    with pytest.raises(UnsupportedModelError, match="no hyper-connections"):
        HookedHFMHC(ToyForCausalLM(2))  # the default (DeepSeek-V4) spec finds none


def test_stream_usage_sees_the_planted_reads(toks):
    model = HookedHFMHC(planted(), spec=TOY)
    usage = run_probes(model, [StreamUsage()], toks, batch_size=3, progress=False)["stream_usage"]
    expected = np.zeros((2 * LAYERS, N))
    expected[:, 0] = 1
    np.testing.assert_allclose(usage["read_share"], expected, atol=1e-12)
    np.testing.assert_allclose(usage["mean_h_res"][:, 0], np.tile(expected[:1], (2 * LAYERS, 1)), atol=1e-7)
    with torch.no_grad():
        _, cache = model.run_with_cache(toks)
        contributions = model.stream_contributions(cache["head.hook_streams_in"])
    assert contributions[:, :, 1:].abs().max() == 0 and contributions[:, :, 0].abs().max() > 0


def test_ablate_and_rescue_with_frozen_mixing_finds_the_planted_stream(toks):
    """Frozen: ablating streams 1.. does nothing, any pair with 0 is fully rescued by restoring 0
    and not at all by restoring the other. Recomputed: H_post responds to the ablation, so a
    stream that is never read still matters - the freezing is what isolates the content."""
    model = HookedHFMHC(planted(), spec=TOY)
    frozen = ablate_and_rescue(model, toks, batch_size=3)
    kl_pair, kl_rescued = frozen["kl_ablated"], frozen["kl_rescued"]  # [sublayer, a, r]
    for i, j in itertools.combinations(range(1, N), 2):
        np.testing.assert_allclose(kl_pair[:, i, j], 0, atol=1e-7)
    for s in range(1, N):
        assert (kl_pair[:, 0, s] > 1e-3).all()
        np.testing.assert_allclose(frozen["rescue"][:, s, 0], 1, atol=1e-5)  # s stays ablated, 0 restored
        np.testing.assert_allclose(frozen["rescue"][:, 0, s], 0, atol=1e-5)  # 0 stays ablated
        np.testing.assert_allclose(kl_rescued[:, 0, s], kl_pair[:, 0, s], rtol=1e-6)
    recomputed = ablate_and_rescue(model, toks, batch_size=3, frozen=False)
    assert (recomputed["kl_ablated"][:, 1, 2] > 1e-6).all()
