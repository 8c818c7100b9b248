"""What every hyper-connection variant computes, and the registry that maps
`hyper_conn_type` to the module computing it (one file per variant, SAELens-style).

A mixer turns the current stream state of one sublayer into its three coefficient tensors, in
the papers' convention and in float32:

    h_pre  [batch, pos, n_streams]                     read weights:  read = sum_s h_pre[s] x[s]
    h_post [batch, pos, n_streams]                     write weights: x'[t] += h_post[t] * F(read)
    h_res  [batch, pos, n_streams(target), n_streams(source)]
                                                       stream mixer:  x'[t] += sum_s h_res[t, s] x[s]

so that the hyper-connected sublayer computes  x' = H_res x + H_post^T F(H_pre x).
(The public mHC code stores the residual mixer as alpha[source, target]; mixers transpose it.)
"""

from __future__ import annotations

import math
from typing import Callable, ClassVar, Dict, Optional, Tuple, Type

import torch
from torch import Tensor, nn

from ...config import MHCConfig, mixer_class
from ...contract import MixingCoefficients
from ...registry import register
from ..compiled import compile_once


class Mixer(nn.Module):
    """Base class: `forward(x [batch, pos, n_streams, d_model]) -> MixingCoefficients`.

    Parameters keep the names and layouts of the public mHC code (`static_alpha`,
    `dynamic_alpha_fn`, ...) so checkpoints load by renaming keys only; `norm.gamma` there is
    `norm_gamma` here. A non-persistent buffer (computed, not in a checkpoint) is made by a
    `rebuild_buffers()` method, which the loader calls on a model built on the meta device.
    """

    # What a variant declares about its configs, read by `MHCConfig` (config.py keeps no list of
    # variants): a new variant states here, in its own file, what differs from these defaults.
    n_streams_required: ClassVar[Optional[int]] = None  # the only stream count it takes (`none`: 1)
    max_streams: ClassVar[Optional[int]] = None  # a limit below config.MAX_STREAMS, if any
    default_lss_init: ClassVar[Optional[float]] = None  # not None: the variant *is* learned stream
    # scaling - `lss_init` when the config gives none, and the checkpoint's expand_lss_init is read
    uses_sinkhorn_iters: ClassVar[bool] = False  # `compute` gets cfg.sinkhorn_iters (else 0)

    def __init__(self, cfg: MHCConfig, init_stream: int = 0):
        super().__init__()
        self.n_streams = cfg.n_streams
        self.sinkhorn_iters = cfg.sinkhorn_iters if self.uses_sinkhorn_iters else 0

    compiled = False  # set by HookedMHC.compile() / compile_mixers(): use the torch.compile'd `compute`

    @staticmethod
    def compute(x: Tensor, w: Dict[str, Tensor], n: int, iters: int) -> Tuple[Tensor, Tensor, Tensor]:
        """The maths of a variant as a pure function of the state x [b, p, n, d] (in the model's
        dtype) and the mixer's tensors `w` (parameters and buffers, in the compute dtype)
        -> (h_pre, h_post, h_res), each contiguous (row-major), whichever variant, path or
        frozen cache they come from: a compiled `apply` guards on its inputs' strides, so one
        layout means one graph. x stays in its dtype: it is only read by `normed_projection`,
        which never materialises a normed (or float32) copy of the stream state."""
        raise NotImplementedError  # pragma: no cover - abstract

    def forward(self, x: Tensor) -> MixingCoefficients:
        # one compiled graph per variant, shared by all its sublayers (tensors are arguments)
        compute = compile_once(type(self).compute) if self.compiled else type(self).compute
        return MixingCoefficients(*compute(x, self.tensors_for(x), self.n_streams, self.sinkhorn_iters))

    def tensors_for(self, x: Tensor) -> Dict[str, Tensor]:
        """This mixer's parameters and buffers in the compute dtype for state `x`: float32 for
        bf16/fp16/fp32 models (coefficients never in half precision), float64 for float64."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        tensors = (*self.named_parameters(recurse=False), *self.named_buffers(recurse=False))
        return {k: v.to(dtype) for k, v in tensors}


def favoured_stream(n: int, init_stream: int, rest: float = -1.0) -> Tensor:
    """[n]: 1.0 at stream init_stream % n, `rest` elsewhere (the public code's static inits
    favour one stream per sublayer)."""
    out = torch.full((n,), rest)
    out[init_stream % n] = 1.0
    return out


def normed_projection(x: Tensor, gamma: Tensor, weight: Tensor) -> Tensor:
    """RMSNorm(x) @ weight, with the public code's RMSNorm  x / ||x||_2 * sqrt(dim) * (1 + gamma)
    over the last axis, computed as

        s * (x @ W'),   s = sqrt(dim) / ||x||_2 (per row),   W' = (1 + gamma)[:, None] * weight

    so the normed state is never materialised: the GEMM reads x once, in its own dtype (for a
    bf16 state a bf16 GEMM, W' and the product rounded to bf16 - the precision of the state and of
    the stored weights), and s and the result are in gamma's dtype (the compute dtype)."""
    dtype = gamma.dtype
    scaled = ((gamma + 1)[:, None] * weight).to(x.dtype)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=dtype).clamp_min(1e-12)
    return (x @ scaled).to(dtype) * (x.shape[-1] ** 0.5 / norm)


def sinkhorn_log(logits: Tensor, iters: int) -> Tensor:
    """Sinkhorn-Knopp in the log domain on `logits [..., target, source]`.

    Alternates normalising each target row over sources and each source column over targets,
    `iters` times, and returns exp(.) - a matrix whose columns sum to 1 exactly and whose rows
    sum to 1 up to the Sinkhorn residual (the order matches the public mHC code)."""
    for _ in range(iters):
        logits = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        logits = logits - torch.logsumexp(logits, dim=-2, keepdim=True)
    return logits.exp()


def sinkhorn_exp(logits: Tensor, iters: int) -> Tensor:
    """The same iterations as `sinkhorn_log`, in the linear domain: P = exp(L - max L) once, then
    `iters` times  P <- P / P.sum(rows),  P <- P / P.sum(columns).  Equal to `sinkhorn_log` in
    exact arithmetic (subtracting logsumexp = dividing by the sum; the constant max L cancels in
    the first normalisation) for iters >= 1; a third of its time on the CPU (no exp/log per step).
    Safe only where `exp_domain_safe` holds: otherwise whole rows or columns can underflow to 0."""
    p = (logits - logits.detach().amax(dim=(-1, -2), keepdim=True)).exp()  # the max cancels: no gradient
    for _ in range(iters):
        p = p / p.sum(dim=-1, keepdim=True)
        p = p / p.sum(dim=-2, keepdim=True)
    return p


def exp_safe_range(dtype: torch.dtype, n: int) -> float:
    """The largest logit range R = max L - min L of an n x n matrix for which every iterate of
    `sinkhorn_exp` stays a normal float of `dtype`: with K = exp(L - max L) in [e^-R, 1], the
    scalings' ratios are bounded by e^R, so every entry of every iterate is >= e^(-2R) / n, which
    is >= the smallest normal number `tiny` iff  R <= (ln(1 / tiny) - ln n) / 2
    (42.3 for float32 at n = 4; the trained checkpoints here stay below 22)."""
    return (-math.log(torch.finfo(dtype).tiny) - math.log(n)) / 2


def exp_domain_safe(logits: Tensor) -> Tensor:
    """Per matrix of `logits [..., n, n]`: may `sinkhorn_exp` be used (see `exp_safe_range`)?
    False for non-finite logits (NaN, +-inf), which stay on the log-domain path."""
    logits = logits.detach()
    spread = logits.amax(dim=(-1, -2)) - logits.amin(dim=(-1, -2))
    return spread <= exp_safe_range(logits.dtype, logits.shape[-1])


def sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """Sinkhorn-Knopp on `logits [..., target, source]` (see `sinkhorn_log`), by the fastest path
    that is exact to float rounding: `sinkhorn_exp` for every matrix where `exp_domain_safe` holds,
    `sinkhorn_log` for the others (chosen per matrix, so a matrix's result does not depend on the
    rest of the batch; agreement ~3e-7 in float32).

    The choice reads the logits on the host, so it is made only for CPU tensors in eager mode; on
    accelerators (where it would cost a device sync per sublayer) and inside torch.compile (whose
    fused kernel makes the log domain cheap) the log-domain path runs."""
    if iters < 1 or logits.device.type != "cpu" or torch.compiler.is_compiling():
        return sinkhorn_log(logits, iters)
    ok = exp_domain_safe(logits)
    if bool(ok.all()):
        return sinkhorn_exp(logits, iters)
    if not bool(ok.any()):
        return sinkhorn_log(logits, iters)
    bad = ~ok
    # the unsafe matrices enter the linear path as zeros (finite, so no NaN reaches any gradient)
    # and are then replaced by their log-domain result
    linear = sinkhorn_exp(logits.masked_fill(bad[..., None, None], 0.0), iters)
    return linear.index_put((bad,), sinkhorn_log(logits[bad], iters))


MIXERS: Dict[str, Type[Mixer]] = {}  # the one list of variants: MHCConfig validates against it


def register_mixer(*names: str) -> Callable[[Type[Mixer]], Type[Mixer]]:
    """Class decorator: make a mixer available under one or more `hyper_conn_type` names. A name
    another class holds is refused (registering the same class again, e.g. from a reloaded module,
    is not)."""

    def deco(cls: Type[Mixer]) -> Type[Mixer]:
        names_taken = dict(MIXERS)
        for name in names:  # every name checked before any is taken
            register(names_taken, name, cls, "mixer")
        MIXERS.update(names_taken)
        return cls

    return deco


def build_mixer(cfg: MHCConfig, init_stream: int = 0) -> Mixer:
    return mixer_class(cfg.hyper_conn_type)(cfg, init_stream=init_stream)
