"""A transformer layer = two hyper-connected sublayers, `attn` then `mlp`, and stream expansion."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import MHCConfig
from .attention import AttentionSublayer
from .mlp import MLPSublayer


class TransformerBlock(nn.Module):
    """x [batch, pos, n_streams, d_model] -> mlp(attn(x)), same shape."""

    def __init__(self, cfg: MHCConfig):
        super().__init__()
        # The public code's static mixing init favours one random stream per sublayer (drawn on the
        # CPU generator, also when the model is built on another device, e.g. "meta")
        self.attn = AttentionSublayer(cfg, init_stream=int(torch.randint(cfg.n_streams, (), device="cpu")))
        self.mlp = MLPSublayer(cfg, init_stream=int(torch.randint(cfg.n_streams, (), device="cpu")))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.attn(x))


class StreamExpand(nn.Module):
    """Embedding [batch, pos, d_model] -> initial streams [batch, pos, n_streams, d_model].

    Copies of the embedding (public mHC code), or with learned stream scaling (LSS, the
    stream-collapse paper's symmetry breaking): x_s = x * lss[s], lss init lss_init + Xavier noise.
    """

    def __init__(self, cfg: MHCConfig):
        super().__init__()
        self.n_streams = cfg.n_streams
        self.lss = None
        if cfg.lss_init is not None:
            noise = nn.init.xavier_uniform_(torch.empty(cfg.n_streams, cfg.d_model))
            self.lss = nn.Parameter(noise + cfg.lss_init)

    def forward(self, x: Tensor) -> Tensor:
        x = x.unsqueeze(-2)
        if self.lss is None:
            return x.repeat_interleave(self.n_streams, dim=-2)  # a copy, safe to edit in place
        return x * self.lss
