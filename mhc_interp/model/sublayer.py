"""One hyper-connected sublayer, shared by every variant and by attention and MLP alike.

    x       [batch, pos, n_streams, d_model]          stream state in         (hook_streams_in)
    (h_pre, h_post, h_res) = mixer(x)  or frozen     coefficients            (hook_h_pre/_post/_res)
    read    = sum_s h_pre[s] x[s]                     [batch, pos, d_model]   (hook_read)
    write   = F(LN(read))                             [batch, pos, d_model]   (hook_write)
    mixed   = H_res x                                 [batch, pos, n, d]      (hook_res_mix)
    x'[t]   = mixed[t] + h_post[t] write              [batch, pos, n, d]      (hook_streams_out)

Freezing: when `frozen` holds coefficients (set by `mhc_interp.hooks.freeze.frozen_mixing`),
they replace the mixer's output; the coefficient hook points still fire on the frozen values.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ..config import MHCConfig
from .components import LayerNorm
from .mixers import MixingCoefficients, build_mixer


class HyperConnectedSublayer(nn.Module):
    """Base class; subclasses define `branch(h [batch, pos, d_model]) -> [batch, pos, d_model]`."""

    def __init__(self, cfg: MHCConfig, init_stream: int = 0):
        super().__init__()
        self.cfg = cfg
        self.mixer = build_mixer(cfg, init_stream)
        self.ln = LayerNorm(cfg.d_model, cfg.bias, cfg.layer_norm_eps)
        self.frozen: Optional[MixingCoefficients] = None
        self.hook_streams_in = HookPoint()   # [batch, pos, n_streams, d_model]
        self.hook_h_pre = HookPoint()        # [batch, pos, n_streams]
        self.hook_h_post = HookPoint()       # [batch, pos, n_streams]
        self.hook_h_res = HookPoint()        # [batch, pos, n_streams(target), n_streams(source)]
        self.hook_read = HookPoint()         # [batch, pos, d_model]
        self.hook_write = HookPoint()        # [batch, pos, d_model]
        self.hook_res_mix = HookPoint()      # [batch, pos, n_streams, d_model]
        self.hook_streams_out = HookPoint()  # [batch, pos, n_streams, d_model]

    def coefficients(self, x: Tensor) -> MixingCoefficients:
        """The mixing coefficients for stream state `x`: the mixer's, or the frozen ones.

        Frozen coefficients of batch B serve a run of batch k*B (k replicas stacked along the
        batch axis, replica-major), so batched interventions can share one clean cache."""
        if self.frozen is None:
            return self.mixer(x)
        return self.frozen.fit(x, self.name)

    def branch(self, h: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        x = self.hook_streams_in(x)
        coeffs = self.coefficients(x)
        h_pre = self.hook_h_pre(coeffs.h_pre).to(x.dtype)
        h_post = self.hook_h_post(coeffs.h_post).to(x.dtype)
        h_res = self.hook_h_res(coeffs.h_res).to(x.dtype)
        # read and residual mix in one batched matmul: [1 + n, n] @ [n, d] per token
        mix = torch.cat([h_pre.unsqueeze(-2), h_res], dim=-2) @ x              # [b, p, 1 + n, d]
        read = self.hook_read(mix[:, :, 0])
        write = self.hook_write(self.branch(self.ln(read)))
        mixed = self.hook_res_mix(mix[:, :, 1:])
        return self.hook_streams_out(torch.addcmul(mixed, h_post.unsqueeze(-1), write.unsqueeze(-2)))
