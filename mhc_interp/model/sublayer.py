"""One hyper-connected sublayer, shared by every variant and by attention and MLP alike.

    x       [batch, pos, n_streams, d_model]          stream state in         (hook_streams_in)
    (h_pre, h_post, h_res) = mixer(x)  or frozen     coefficients            (hook_h_pre/_post/_res)
    read    = sum_s h_pre[s] x[s]                     [batch, pos, d_model]   (hook_read)
    write   = F(LN(read))                             [batch, pos, d_model]   (hook_write)
    mixed   = H_res x                                 [batch, pos, n, d]      (hook_res_mix)
    x'[t]   = mixed[t] + h_post[t] write              [batch, pos, n, d]      (hook_streams_out)

Freezing: when `frozen` holds coefficients (set by `mhc_interp.hooks.freeze.frozen_mixing`),
they replace the mixer's output; the coefficient hook points still fire on the frozen values.

Compiled fast path (`HookedMHC.compile()`): the two regions between hook points - the mixer's
coefficient maths and `apply` (read, branch, write-back) - run `torch.compile`d. The five boundary
hook points (streams_in, h_pre, h_post, h_res, streams_out) are called outside the regions, so
hooks there fire as usual; `apply` falls back to eager whenever anything inside it is observed
(hook_read/write/res_mix, the branch's hook points, any torch hook or nnsight instrumentation).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ..config import MHCConfig
from ..contract import MixingCoefficients
from .compiled import compile_once, global_module_hooks, module_observed
from .mixers import build_mixer

# every sublayer's hook points, in forward order (shapes: hooks.names.HOOK_SPECS)
SUBLAYER_HOOKS = (
    "hook_streams_in",
    "hook_h_pre",
    "hook_h_post",
    "hook_h_res",
    "hook_read",
    "hook_write",
    "hook_res_mix",
    "hook_streams_out",
)
# hook points called outside the compiled `apply` region
BOUNDARY_HOOKS = ("hook_streams_in", "hook_h_pre", "hook_h_post", "hook_h_res", "hook_streams_out")


def mix_streams(coef: Tensor, x: Tensor) -> Tensor:
    """out[..., m, :] = sum_s coef[..., m, s] x[..., s, :]: coef [b, p, m, n], x [b, p, n, d].

    Eager: one batched matmul. Traced by torch.compile: the sum over the n source streams written
    out, which inductor fuses with its neighbours into passes over x (a batched GEMM with inner
    size n would be a separate, memory-bound kernel and a materialised [b, p, m, d] result)."""
    if torch.compiler.is_compiling():
        return sum(coef[..., s, None] * x[..., None, s, :] for s in range(x.shape[-2]))
    return coef @ x


class HookedSublayer(nn.Module):
    """What every hyper-connected sublayer (HookedMHC's, the HF adapter's) has: the hook points
    `SUBLAYER_HOOKS` (made by `hook_point_class`) and a `frozen` coefficients slot; a subclass
    defines `coefficients(x)`."""

    hook_point_class = HookPoint

    def __init__(self):
        super().__init__()
        self.frozen: Optional[MixingCoefficients] = None
        for name in SUBLAYER_HOOKS:
            setattr(self, name, self.hook_point_class())

    def hooked_coefficients(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(x, h_pre, h_post, h_res): the state through hook_streams_in, its coefficients through theirs."""
        x = self.hook_streams_in(x)
        h_pre, h_post, h_res = self.coefficients(x)
        return x, self.hook_h_pre(h_pre), self.hook_h_post(h_post), self.hook_h_res(h_res)


class HyperConnectedSublayer(HookedSublayer):
    """Base class; subclasses define `branch(h [batch, pos, d_model]) -> [batch, pos, d_model]`."""

    compiled = False  # set by HookedMHC.compile(): run `apply` torch.compile'd when unobserved

    def __init__(self, cfg: MHCConfig, init_stream: int = 0):
        super().__init__()
        self.cfg = cfg
        self.mixer = build_mixer(cfg, init_stream)
        # nanoGPT's LayerNorm, (x - mean) / sqrt(var + eps) * w + b, the bias optional
        self.ln = nn.LayerNorm(cfg.d_model, cfg.layer_norm_eps, bias=cfg.bias)

    def coefficients(self, x: Tensor) -> MixingCoefficients:
        """The mixing coefficients for stream state `x`: the mixer's, or the frozen ones.

        Frozen coefficients of batch B serve a run of batch k*B (k replicas stacked along the
        batch axis, replica-major), so batched interventions can share one clean cache."""
        return self.mixer(x) if self.frozen is None else self.frozen.fit(x, self.name)

    def branch(self, h: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        x, h_pre, h_post, h_res = self.hooked_coefficients(x)
        fast = self.compiled and not self.interior_observed()
        apply = compile_once(type(self).apply) if fast else type(self).apply
        return self.hook_streams_out(apply(self, x, h_pre, h_post, h_res))

    def apply(self, x: Tensor, h_pre: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
        """x' = H_res x + H_post^T F(H_pre x), given the coefficients (cast to the state's dtype).
        x [b, p, n, d], h_pre/h_post [b, p, n], h_res [b, p, n, n] -> [b, p, n, d]."""
        h_pre, h_post, h_res = (t.to(x.dtype) for t in (h_pre, h_post, h_res))
        mix = mix_streams(torch.cat([h_pre.unsqueeze(-2), h_res], dim=-2), x)  # [b, p, 1 + n, d]
        read = self.hook_read(mix[:, :, 0])
        write = self.hook_write(self.branch(self.ln(read)))
        mixed = self.hook_res_mix(mix[:, :, 1:])
        return torch.addcmul(mixed, h_post.unsqueeze(-1), write.unsqueeze(-2))

    def interior_observed(self) -> bool:
        """Could anyone see inside `apply` (so that it must run eagerly)? Checks every module
        `apply` runs: all submodules but the mixer and the boundary hook points. (Hooks on the
        sublayer module itself see only its input and output, so they do not count.)"""
        outside = {"mixer", *BOUNDARY_HOOKS}
        return global_module_hooks() or any(
            module_observed(m)
            for name, m in self.named_modules()
            if name and name.split(".")[0] not in outside
        )
