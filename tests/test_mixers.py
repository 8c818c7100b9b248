"""The mixers' shared maths against slow, obvious references; the two Sinkhorn paths."""

import pytest
import torch

from mhc_interp.model.mixers import MIXERS
from mhc_interp.model.mixers.base import (
    exp_domain_safe,
    exp_safe_range,
    normed_projection,
    sinkhorn,
    sinkhorn_exp,
    sinkhorn_log,
)

from .conftest import perturbed_model, tiny_config


def rms_norm_then_project(x, gamma, weight):
    """The public code's RMSNorm written out, then the projection (all in float64)."""
    x, gamma, weight = x.double(), gamma.double(), weight.double()
    y = x / x.pow(2).sum(-1, keepdim=True).sqrt() * x.shape[-1] ** 0.5 * (1 + gamma)
    return y @ weight


def test_normed_projection_is_rmsnorm_then_projection():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64)
    gamma, weight = 0.3 * torch.randn(64), torch.randn(64, 7)
    ref = rms_norm_then_project(x, gamma, weight)
    torch.testing.assert_close(
        normed_projection(x.double(), gamma.double(), weight.double()), ref, atol=1e-12, rtol=1e-12
    )
    got = normed_projection(x, gamma, weight)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    # a bf16 state: a bf16 GEMM, but the result in the compute dtype and bf16-accurate
    got = normed_projection(x.bfloat16(), gamma, weight)
    assert got.dtype == torch.float32
    ref_rounded = rms_norm_then_project(x.bfloat16(), gamma, weight)
    assert ((got.double() - ref_rounded).abs().max() / ref_rounded.abs().mean()).item() < 2e-2
    # scale invariance of the norm, and no division by zero on an all-zero row
    torch.testing.assert_close(
        normed_projection(7.0 * x, gamma, weight), normed_projection(x, gamma, weight), atol=1e-5, rtol=1e-5
    )
    assert torch.equal(normed_projection(torch.zeros(2, 64), gamma, weight), torch.zeros(2, 7))


@pytest.mark.parametrize("shape", [(4, 16), (2, 3, 4, 16)])
def test_normed_projection_keeps_leading_axes(shape):
    x = torch.randn(shape)
    assert normed_projection(x, torch.zeros(16), torch.randn(16, 5)).shape == (*shape[:-1], 5)


def test_sinkhorn_linear_path_equals_log_domain_on_ordinary_logits():
    torch.manual_seed(0)
    logits = 4 * torch.randn(3, 7, 4, 4)  # spread ~20, as on trained checkpoints
    assert exp_domain_safe(logits).all()
    ref = sinkhorn_log(logits, 20)
    assert torch.equal(sinkhorn(logits, 20), sinkhorn_exp(logits, 20))  # the linear path is taken
    torch.testing.assert_close(sinkhorn(logits, 20), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        sinkhorn(logits.double(), 20), sinkhorn_log(logits.double(), 20), atol=1e-12, rtol=1e-12
    )
    torch.testing.assert_close(sinkhorn(logits, 20).sum(-2), torch.ones(3, 7, 4))  # columns last


def test_sinkhorn_linear_path_stays_normal_up_to_its_range_limit():
    """The worst case the bound allows: diagonal 0, off-diagonal -R at R = exp_safe_range."""
    r = exp_safe_range(torch.float32, 4)
    assert 40 < r < 45 and exp_safe_range(torch.float64, 4) > 300
    logits = torch.full((4, 4), -r).fill_diagonal_(0.0)
    logits[0, 1] = 0.0  # not symmetric: rows and columns differ
    assert exp_domain_safe(logits)
    assert not exp_domain_safe(torch.full((4, 4), -1.01 * r).fill_diagonal_(0.0))
    linear, ref = sinkhorn_exp(logits, 20), sinkhorn_log(logits, 20)
    assert (linear >= torch.finfo(torch.float32).tiny).all()  # no underflow, not even to subnormals
    torch.testing.assert_close(linear, ref, atol=1e-6, rtol=1e-4)


def test_sinkhorn_keeps_the_log_domain_at_extreme_logits():
    """Where a whole column underflows in exp(L - max L), the linear path divides 0 by 0; `sinkhorn`
    sends exactly those matrices down the log-domain path, and neither result holds a NaN."""
    extreme = torch.zeros(4, 4)
    extreme[:, 0] = -200.0  # column 0: exp(-200) = 0 in float32
    assert not exp_domain_safe(extreme)
    assert sinkhorn_exp(extreme, 20).isnan().any()  # why the log domain is kept there
    assert torch.equal(sinkhorn(extreme, 20), sinkhorn_log(extreme, 20))
    assert not sinkhorn(extreme, 20).isnan().any()
    far = torch.full((4, 4), -1e4).fill_diagonal_(0.0)  # off-diagonal weight exp(-1e4)
    torch.manual_seed(1)
    ordinary = 3 * torch.randn(4, 4)
    batch = torch.stack([ordinary, extreme, far]).requires_grad_()
    assert exp_domain_safe(batch).tolist() == [True, False, False]
    out = sinkhorn(batch, 20)
    assert not out.isnan().any()
    # chosen per matrix: each result is what that matrix gets alone
    assert torch.equal(out[0], sinkhorn_exp(ordinary, 20))
    assert torch.equal(out[1], sinkhorn_log(extreme, 20)) and torch.equal(out[2], sinkhorn_log(far, 20))
    torch.testing.assert_close(out[2], torch.eye(4))
    (out * torch.randn(3, 4, 4)).sum().backward()
    assert batch.grad.isfinite().all()
    # non-finite logits stay on the log-domain path (which propagates them as before)
    for bad in (float("nan"), float("inf")):
        weird = ordinary.clone()
        weird[2, 3] = bad
        assert not exp_domain_safe(weird)
        torch.testing.assert_close(
            sinkhorn(weird, 20), sinkhorn_log(weird, 20), atol=0, rtol=0, equal_nan=True
        )


@pytest.mark.parametrize("variant", sorted(MIXERS))
def test_every_mixer_returns_contiguous_coefficients(variant):
    """One memory layout for every variant (the compiled `apply` guards on strides)."""
    model = perturbed_model(tiny_config(variant, MIXERS[variant].n_streams_required or 4), seed=0)
    x = torch.randn(2, 5, model.cfg.n_streams, model.cfg.d_model)
    coefficients = model.sublayers[0].mixer(x)
    assert all(t.is_contiguous() for t in coefficients)
