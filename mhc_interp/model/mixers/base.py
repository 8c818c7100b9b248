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

from typing import Callable, Dict, NamedTuple, Tuple, Type

import torch
from torch import Tensor, nn

from ...config import MHCConfig
from ..compiled import compile_once


class MixingCoefficients(NamedTuple):
    """A mixer's output. A NamedTuple (not a dataclass) so that tools which walk containers -
    nnsight's per-invoke batching, torch.compile, pytree - see the three tensors inside."""

    h_pre: Tensor   # [batch, pos, n_streams]
    h_post: Tensor  # [batch, pos, n_streams]
    h_res: Tensor   # [batch, pos, n_streams(target), n_streams(source)]

    def fit(self, x: Tensor, name: str) -> "MixingCoefficients":
        """These (frozen) coefficients for a run on state x [batch, pos, ...]: cached on batch B,
        they serve a run of batch k*B (k replicas stacked along the batch axis, replica-major)."""
        fb, fp = self.h_pre.shape[:2]
        b, p = x.shape[:2]
        if fp != p or b % fb:
            raise ValueError(
                f"frozen mixing for {name!r} was cached on batch {fb} x pos {fp}, but the run "
                f"has batch {b} x pos {p}; the positions must match and the batch be a multiple"
            )
        k = b // fb
        # always a copy: the hooks may edit these in place, and they must not reach the cache
        return MixingCoefficients(*(t.to(x.device).repeat(k, *([1] * (t.ndim - 1))) if k > 1 else t.to(x.device, copy=True)
                                    for t in (self.h_pre, self.h_post, self.h_res)))


class Mixer(nn.Module):
    """Base class: `forward(x [batch, pos, n_streams, d_model]) -> MixingCoefficients`.

    Parameters keep the names and layouts of the public mHC code (`static_alpha`,
    `dynamic_alpha_fn`, ...) so checkpoints load by renaming keys only; `norm.gamma` there is
    `norm_gamma` here.
    """

    def __init__(self, cfg: MHCConfig, init_stream: int = 0):
        super().__init__()
        self.n_streams = cfg.n_streams
        self.d_model = cfg.d_model

    compiled = False  # set by HookedMHC.compile() / compile_mixers(): use the torch.compile'd `compute`

    @staticmethod
    def compute(x: Tensor, w: Dict[str, Tensor], n: int, iters: int) -> Tuple[Tensor, Tensor, Tensor]:
        """The maths of a variant as a pure function of the state x [b, p, n, d] (in the model's
        dtype) and the mixer's tensors `w` (parameters and buffers, in the compute dtype)
        -> (h_pre, h_post, h_res). x stays in its dtype: it is only read by `normed_projection`,
        which never materialises a normed (or float32) copy of the stream state."""
        raise NotImplementedError  # pragma: no cover - abstract

    def forward(self, x: Tensor) -> MixingCoefficients:
        # one compiled graph per variant, shared by all its sublayers (tensors are arguments)
        compute = compile_once(type(self).compute) if self.compiled else type(self).compute
        return MixingCoefficients(*compute(x, self.tensors_for(x), self.n_streams, getattr(self, "sinkhorn_iters", 0)))

    def tensors_for(self, x: Tensor) -> Dict[str, Tensor]:
        """This mixer's parameters and buffers in the compute dtype for state `x`: float32 for
        bf16/fp16/fp32 models (coefficients never in half precision), float64 for float64."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        tensors = dict(self.named_parameters(recurse=False), **dict(self.named_buffers(recurse=False)))
        return {k: v.to(dtype) for k, v in tensors.items()}


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


MIXERS: Dict[str, Type[Mixer]] = {}


def register_mixer(*names: str) -> Callable[[Type[Mixer]], Type[Mixer]]:
    """Class decorator: make a mixer available under one or more `hyper_conn_type` names."""

    def deco(cls: Type[Mixer]) -> Type[Mixer]:
        for name in names:
            MIXERS[name] = cls
        return cls

    return deco


def build_mixer(cfg: MHCConfig, init_stream: int = 0) -> Mixer:
    try:
        cls = MIXERS[cfg.hyper_conn_type]
    except KeyError:
        raise ValueError(
            f"no mixer registered for hyper_conn_type {cfg.hyper_conn_type!r}; "
            f"registered: {sorted(MIXERS)}"
        ) from None
    return cls(cfg, init_stream=init_stream)
