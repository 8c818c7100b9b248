"""The mixers' shared maths against slow, obvious references."""
import pytest
import torch

from mhc_interp.model.mixers.base import normed_projection


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
    torch.testing.assert_close(normed_projection(x.double(), gamma.double(), weight.double()), ref,
                               atol=1e-12, rtol=1e-12)
    got = normed_projection(x, gamma, weight)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    # a bf16 state: a bf16 GEMM, but the result in the compute dtype and bf16-accurate
    got = normed_projection(x.bfloat16(), gamma, weight)
    assert got.dtype == torch.float32
    ref_rounded = rms_norm_then_project(x.bfloat16(), gamma, weight)
    assert ((got.double() - ref_rounded).abs().max() / ref_rounded.abs().mean()).item() < 2e-2
    # scale invariance of the norm, and no division by zero on an all-zero row
    torch.testing.assert_close(normed_projection(7.0 * x, gamma, weight), normed_projection(x, gamma, weight),
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(normed_projection(torch.zeros(2, 64), gamma, weight), torch.zeros(2, 7))


@pytest.mark.parametrize("shape", [(4, 16), (2, 3, 4, 16)])
def test_normed_projection_keeps_leading_axes(shape):
    x = torch.randn(shape)
    assert normed_projection(x, torch.zeros(16), torch.randn(16, 5)).shape == (*shape[:-1], 5)
