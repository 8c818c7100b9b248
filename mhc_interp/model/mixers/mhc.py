"""`mhc`: Manifold-Constrained Hyper-Connections (Xie et al., arXiv 2512.24880).

With  y = RMSNorm(flatten_{s,d}(x))  (one norm over all n*d values of the token):
    a[s, :]     = (y W_alpha)[s, :] * (pre_scale, res_scale, ..., res_scale) + static_alpha[s, :]
    h_pre[s]    = sigmoid(a[s, 0])
    h_res       = SinkhornKnopp(exp(L)),  L[t, s] = a[s, 1 + t]  (`sinkhorn_iters` iterations)
    h_post[s]   = 2 sigmoid((y W_beta)[s] * post_scale + static_beta[s])
H_res is doubly stochastic up to the Sinkhorn residual (columns exactly, rows approximately).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...config import MHCConfig
from .base import Mixer, favoured_stream, normed_projection, register_mixer, sinkhorn


class _ManifoldMixerBase(Mixer):
    """Shared parts of mHC and mHC-lite: the flattened RMSNorm and its projections, H_post."""

    def __init__(self, cfg: MHCConfig, init_stream: int = 0):
        super().__init__(cfg, init_stream)
        n, d = cfg.n_streams, cfg.d_model
        self.pre_branch_scale = nn.Parameter(torch.full((1,), 1e-2))
        self.residual_scale = nn.Parameter(torch.full((1,), 1e-2))
        self.static_beta = nn.Parameter(favoured_stream(n, init_stream))
        self.dynamic_beta_fn = nn.Parameter(torch.zeros(n * d, n))
        self.h_post_scale = nn.Parameter(torch.tensor(1e-2))
        self.norm_gamma = nn.Parameter(torch.zeros(n * d))

    @staticmethod
    def projections(x: Tensor, w) -> tuple:
        """RMSNorm(flatten(x)) projected by W_alpha and W_beta in one GEMM over the state:
        x [b, p, n, d] -> (y W_alpha [b, p, k], y W_beta [b, p, n])."""
        both = normed_projection(
            x.flatten(-2), w["norm_gamma"], torch.cat([w["dynamic_alpha_fn"], w["dynamic_beta_fn"]], dim=-1)
        )
        return both.split([w["dynamic_alpha_fn"].shape[-1], w["dynamic_beta_fn"].shape[-1]], dim=-1)

    @staticmethod
    def h_post(beta_logits: Tensor, w) -> Tensor:  # [b, p, n]
        return 2 * torch.sigmoid(beta_logits * w["h_post_scale"] + w["static_beta"])


@register_mixer("mhc")
class SinkhornMixer(_ManifoldMixerBase):
    uses_sinkhorn_iters = True

    def __init__(self, cfg: MHCConfig, init_stream: int = 0):
        super().__init__(cfg, init_stream)
        n, d = cfg.n_streams, cfg.d_model
        # [n(src), 1+n]: the pre logit, then H_res's (0 on the diagonal, -8 off it); filled in place,
        # as cat / eye on the loader's meta device would import torch's compiler (~1 s)
        self.static_alpha = nn.Parameter(torch.full((n, 1 + n), -8.0))
        with torch.no_grad():
            self.static_alpha[:, 0] = favoured_stream(n, init_stream)
            self.static_alpha[:, 1:].diagonal().zero_()
        self.dynamic_alpha_fn = nn.Parameter(torch.zeros(n * d, n * (n + 1)))

    @staticmethod
    def compute(x, w, n, iters):  # x [batch, pos, n, d]
        dyn, beta = _ManifoldMixerBase.projections(x, w)
        dyn = dyn.unflatten(-1, (n, n + 1))  # [b, p, s, 1+n]
        alpha = dyn * torch.cat([w["pre_branch_scale"], w["residual_scale"].expand(n)]) + w["static_alpha"]
        # contiguous [t, s] logits: Sinkhorn's elementwise steps run on dense memory, and h_res
        # comes out in the row-major layout every mixer returns (see `Mixer.compute`)
        h_res = sinkhorn(alpha[..., 1:].transpose(-1, -2).contiguous(), iters)  # [b, p, t, s]
        return torch.sigmoid(alpha[..., 0]), _ManifoldMixerBase.h_post(beta, w), h_res
