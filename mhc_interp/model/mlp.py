"""`blocks.{l}.mlp`: a hyper-connected sublayer whose branch is the GPT-2 MLP,
write = c_proj(GELU(c_fc(LN(read)))), d_mlp = 4 d_model."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F
from transformer_lens.hook_points import HookPoint

from ..config import MHCConfig
from .sublayer import HyperConnectedSublayer


class MLPSublayer(HyperConnectedSublayer):
    def __init__(self, cfg: MHCConfig, init_stream: int = 0):
        super().__init__(cfg, init_stream)
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.bias)
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    def branch(self, h: Tensor) -> Tensor:
        return self.c_proj(self.hook_post(F.gelu(self.hook_pre(self.c_fc(h)))))
