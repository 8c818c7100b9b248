"""`hc`: Hyper-Connections (Zhu et al., arXiv 2409.19606), dynamic, tanh, per-stream norm.

For each stream s, with  y_s = RMSNorm(x_s)  (one norm over d_model, shared by the streams):
    alpha[s, :] = tanh(y_s W_alpha) * a_scale + static_alpha[s, :]      # [n, 1 + n]
    h_pre[s]    = alpha[s, 0]
    h_res[t, s] = alpha[s, 1 + t]                                       # papers' target x source
    h_post[s]   = tanh(y_s . w_beta) * b_scale + static_beta[s]
Unconstrained: coefficients may be negative and H_res is not doubly stochastic.
"""

from __future__ import annotations

import torch
from torch import nn

from ...config import MHCConfig
from .base import Mixer, favoured_stream, normed_projection, register_mixer


@register_mixer("hc")
class HyperConnectionMixer(Mixer):
    def __init__(self, cfg: MHCConfig, init_stream: int = 0):
        super().__init__(cfg, init_stream)
        n, d = cfg.n_streams, cfg.d_model
        # [n, 1+n]: the pre logit, then the identity (in place: see SinkhornMixer)
        self.static_alpha = nn.Parameter(torch.zeros(n, 1 + n))
        with torch.no_grad():
            self.static_alpha[:, 0] = favoured_stream(n, init_stream, rest=0.0)
            self.static_alpha[:, 1:].diagonal().fill_(1.0)
        self.dynamic_alpha_fn = nn.Parameter(torch.zeros(d, n + 1))
        self.dynamic_alpha_scale = nn.Parameter(torch.tensor(1e-2))
        self.static_beta = nn.Parameter(torch.ones(n))
        self.dynamic_beta_fn = nn.Parameter(torch.zeros(d))
        self.dynamic_beta_scale = nn.Parameter(torch.tensor(1e-2))
        self.norm_gamma = nn.Parameter(torch.zeros(d))

    @staticmethod
    def compute(x, w, n, iters):  # x [batch, pos, n, d]
        # both projections of the per-stream RMSNorm in one GEMM: [d, 1 + n] and [d] -> [d, 2 + n]
        weight = torch.cat([w["dynamic_alpha_fn"], w["dynamic_beta_fn"][:, None]], dim=-1)
        both = torch.tanh(normed_projection(x, w["norm_gamma"], weight))  # [b, p, n, 2 + n]
        alpha = both[..., :-1] * w["dynamic_alpha_scale"] + w["static_alpha"]
        h_post = both[..., -1] * w["dynamic_beta_scale"] + w["static_beta"]
        return alpha[..., 0].contiguous(), h_post, alpha[..., 1:].transpose(-1, -2).contiguous()
