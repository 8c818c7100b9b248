"""`blocks.{l}.attn`: a hyper-connected sublayer whose branch is multi-head causal attention.

Branch maths (GPT-2 layout, fused `c_attn` -> q, k, v), on `h = LN(read)` [batch, pos, d_model]:
    scores = q k^T / sqrt(d_head) + causal mask,  pattern = softmax(scores),  z = pattern v,
    write  = c_proj(concat_heads(z)).
The fused SDPA kernel is used unless the pattern or scores are observed (a TransformerLens hook,
or nnsight instrumentation) or `cfg.attn_impl == "eager"`; then they are materialised.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformer_lens.hook_points import HookPoint

from ..config import MHCConfig
from .compiled import module_observed
from .sublayer import HyperConnectedSublayer


class AttentionSublayer(HyperConnectedSublayer):
    def __init__(self, cfg: MHCConfig, init_stream: int = 0):
        super().__init__(cfg, init_stream)
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_k = HookPoint()  # [batch, pos, head, d_head]
        self.hook_v = HookPoint()  # [batch, pos, head, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_pattern = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]

    def _eager(self) -> bool:
        return (
            self.cfg.attn_impl == "eager"
            or module_observed(self.hook_pattern)
            or module_observed(self.hook_attn_scores)
        )

    def branch(self, h: Tensor) -> Tensor:  # [batch, pos, d_model] -> [batch, pos, d_model]
        qkv = self.c_attn(h).unflatten(-1, (3, self.cfg.n_heads, self.cfg.d_head)).unbind(-3)
        hooks = (self.hook_q, self.hook_k, self.hook_v)  # each [batch, pos, head, d_head]
        qt, kt, vt = (hook(t).transpose(1, 2) for hook, t in zip(hooks, qkv))  # [batch, head, pos, d_head]
        if self._eager():
            scores = qt @ kt.transpose(-1, -2) / math.sqrt(self.cfg.d_head)
            causal = scores.new_ones(scores.shape[-2:], dtype=torch.bool).tril()  # [query_pos, key_pos]
            scores = self.hook_attn_scores(scores.masked_fill(~causal, float("-inf")))
            pattern = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
            pattern = self.hook_pattern(pattern.to(vt.dtype))
            z = pattern @ vt
        else:
            z = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        z = self.hook_z(z.transpose(1, 2))
        return self.c_proj(z.flatten(-2))
