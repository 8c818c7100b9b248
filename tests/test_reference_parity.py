"""`from_pretrained` + forward reproduces the public mHC code's logits on every reference
checkpoint (written by that code; see tests/fixtures/reference_checkpoints/README.md)."""

import pytest
import torch

from mhc_interp import HookedMHC

from .conftest import FIXTURES, REFERENCE_NAMES


@pytest.mark.parametrize("name", REFERENCE_NAMES)
def test_logits_match_public_code(name, tokens):
    model = HookedMHC.from_pretrained(FIXTURES / f"{name}.pt")
    reference = torch.load(FIXTURES / f"{name}.logits.pt", weights_only=True)
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == reference.shape
    assert (logits - reference).abs().max().item() <= 1e-4


def test_hub_layout_folder_matches(tokens):
    folder = FIXTURES / "hub_layout_mhc_lite_n4"
    model = HookedMHC.from_pretrained(folder)
    with torch.no_grad():
        logits = model(tokens)
    assert (logits - torch.load(folder / "logits.pt", weights_only=True)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", REFERENCE_NAMES)
def test_variant_and_stream_count_read_from_checkpoint(name):
    ckpt = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    model = HookedMHC.from_pretrained(FIXTURES / f"{name}.pt")
    assert model.cfg.hyper_conn_type == ckpt["model_args"]["hyper_conn_type"]
    assert model.cfg.n_streams == ckpt["model_args"]["hyper_conn_n"]


def test_mhc_h_res_is_doubly_stochastic(mhc_model, tokens):
    _, cache = mhc_model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_h_res"))
    for h in cache.values():
        assert torch.allclose(h.sum(-2), torch.ones(()), atol=1e-5)  # columns: exact
        # rows only up to the residual of 20 Sinkhorn iterations (a few 1e-2 on these weights)
        assert torch.allclose(h.sum(-1), torch.ones(()), atol=5e-2)
        assert (h >= 0).all()


def test_mhc_lite_h_res_is_exactly_doubly_stochastic(tokens):
    model = HookedMHC.from_pretrained(FIXTURES / "mhc_lite_n4.pt")
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_h_res"))
    for h in cache.values():
        assert torch.allclose(h.sum(-2), torch.ones(()), atol=1e-6)
        assert torch.allclose(h.sum(-1), torch.ones(()), atol=1e-6)
