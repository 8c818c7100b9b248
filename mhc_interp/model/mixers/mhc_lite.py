"""`mhc_lite` / `mhc_lite_lss`: mHC-lite (arXiv 2601.05732), H_res as an exact convex combination
of the n! permutation matrices (Birkhoff-von Neumann), so it is exactly doubly stochastic.

With  y = RMSNorm(flatten_{s,d}(x)) :
    c          = softmax((y W)[n:] * res_scale + static[n:])          # [n!] weights
    h_res[t,s] = sum_r c_r [t == perm_r(s)]                          # papers' target x source
    h_pre[s]   = sigmoid((y W)[s] * pre_scale + static[s])
    h_post     as in mHC.
Permutations are enumerated in `itertools.permutations` order (as the public code does), so the
weight vector of a checkpoint keeps its meaning. `mhc_lite_lss` differs only at stream expansion.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn

from ...config import MHCConfig
from .base import favoured_stream, register_mixer
from .mhc import _ManifoldMixerBase


def permutation_matrices(n: int) -> Tensor:
    """[n!, n(target), n(source)] with P_r[t, s] = 1 iff t == perm_r[s]."""
    perms = torch.tensor(list(itertools.permutations(range(n))))  # [n!, n]
    return torch.eye(n)[perms].transpose(-1, -2).contiguous()


@register_mixer("mhc_lite")
class PermutationMixer(_ManifoldMixerBase):
    max_streams = 8  # a weight per permutation and token: 8! = 40320

    def __init__(self, cfg: MHCConfig, init_stream: int = 0):
        super().__init__(cfg, init_stream)
        n, d = cfg.n_streams, cfg.d_model
        n_perms = math.factorial(n)
        # [n + n!]: the pre logits, then the permutations' (the identity first) (in place: see SinkhornMixer)
        self.static_alpha = nn.Parameter(torch.full((n + n_perms,), -8.0))
        with torch.no_grad():
            self.static_alpha[:n] = favoured_stream(n, init_stream)
            self.static_alpha[n] = 0.0
        self.dynamic_alpha_fn = nn.Parameter(torch.zeros(n * d, n + n_perms))
        self.rebuild_buffers()

    def rebuild_buffers(self) -> None:
        """The permutation matrices [n!, n, n]: computed, never saved (the loader calls this after
        assigning a checkpoint to a model built on the meta device)."""
        self.register_buffer("perms", permutation_matrices(self.n_streams), persistent=False)

    @staticmethod
    def compute(x, w, n, iters):  # x [batch, pos, n, d]
        logits, beta = _ManifoldMixerBase.projections(x, w)  # [b, p, n + n!]
        h_pre = torch.sigmoid(logits[..., :n] * w["pre_branch_scale"] + w["static_alpha"][:n])
        weights = torch.softmax(logits[..., n:] * w["residual_scale"] + w["static_alpha"][n:], dim=-1)
        h_res = torch.einsum("bpr,rts->bpts", weights, w["perms"])
        return h_pre, _ManifoldMixerBase.h_post(beta, w), h_res


@register_mixer("mhc_lite_lss")
class LSSPermutationMixer(PermutationMixer):
    """mHC-lite with learned stream scaling at expansion (`StreamExpand`): the same mixer."""

    default_lss_init = 0.6  # the public code's expand_lss_init
