"""Small shared pieces: nanoGPT's LayerNorm and the "is this hook point observed" test."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformer_lens.hook_points import HookPoint



class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (nanoGPT): (x - mean) / sqrt(var + eps) * w + b."""

    def __init__(self, d: int, bias: bool, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def hook_point_observed(hp: HookPoint) -> bool:
    """True if anyone may read this hook point: a TransformerLens hook is attached, or nnsight
    has instrumented the module (it installs its own `forward` on the instance)."""
    return bool(hp._forward_hooks or hp._backward_hooks or hp.fwd_hooks or hp.bwd_hooks) or (
        "forward" in hp.__dict__
    )
