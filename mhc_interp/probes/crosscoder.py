"""Sparse crosscoders over (layer, stream) sites, and which stream each feature lives in.

An acausal crosscoder (Lindsey et al. 2024, "Sparse Crosscoders for Cross-Layer Features and
Model Diffing") over S sites - here (hook, stream) pairs, `crosscoder_buffer.Site` - with
activations a^s(x) in R^d (d = d_model) and a dictionary of m latents:

    x^s      = c_s a^s(x)                                   per-source normalisation (below)
    pre(x)   = sum_s W_enc^s (x^s - b_dec^s) + b_enc        W_enc [S, d, m], b_enc [m]: per-source
                                                            encoders summed into ONE latent vector
    f(x)     = sparsify(ReLU(pre(x)))                       [m]
    x^_s     = W_dec^s f(x) + b_dec^s = sum_i f_i W_dec[i, s] + b_dec[s]
                                                            W_dec [m, S, d], b_dec [S, d]
    recon    = sum_s ||x^s - x^_s||^2                       (mean over the batch)
    ||d_i||  = sum_s ||W_dec[i, s]||                        the "sum of per-target decoder norms"

Sparsity (`CrosscoderConfig.sparsity`):

* "batchtopk" (default; Bussmann, Leask & Nanda 2024): over a batch of B rows keep the k*B largest
  scores ReLU(pre_i(x_b)) * ||d_i|| (the decoder-norm weighting makes the choice invariant to
  trading latent scale against decoder scale), zero the rest. loss = recon + aux_coeff * aux, with
  the auxiliary dead-latent loss of Gao et al. 2024: e = stop_grad(x - x^) (the residual), the
  dead latents' own top-`aux_k` ReLU(pre) per row decode it without bias, e^ = sum_{i dead} f_i
  W_dec[i], aux = mean_b sum_s ||e^s - e^^s||^2. A latent is dead when it has not fired in the
  last `dead_after_tokens` training tokens. At inference, f_i = ReLU(pre_i) where
  ReLU(pre_i) * ||d_i|| > theta, theta = EMA (rate `threshold_lr`) of the smallest selected score
  (Bussmann's threshold); `encode(mode="batchtopk" | "topk")` are available too.
* "l1" (Anthropic): f = ReLU(pre), loss = recon + lambda_t * mean_b sum_i f_i ||d_i||, lambda_t
  warmed up linearly from 0 to `l1_coeff` over `l1_warmup_steps` (5% of the run by default).
  L1 crosscoders shrink the decoder of a weakly present source to exactly zero ("complete
  shrinkage", Minder et al. 2025), which makes a feature look stream-exclusive when it is not;
  this is why BatchTopK is the default for stream-assignment claims.

Per-source normalisation (`normalize=True`, default): c_s = sqrt(d) / E||a^s|| estimated once on
`norm_estimate_tokens` rows before training and stored in the crosscoder (`norm_factors` [S]), so
every site has mean norm sqrt(d) (Kissane et al.'s replication). Without it the reconstruction is
dominated by the highest-norm stream (one stream of an mHC model often carries most of the norm)
and every feature trivially "belongs" to it. Inputs are always raw activations: the crosscoder
applies c_s itself (`forward` returns raw-space reconstructions).

Centring the encoder input on b_dec (as Bussmann et al.'s and Gao et al.'s code do) is the
paper's pre = sum_s W_enc^s x^s + b_enc' with b_enc' = b_enc - sum_s W_enc^s b_dec^s, so the
function class is the same; it matters for training: residual-stream states have a large mean, and
with W_enc = W_dec^T every latent anti-aligned with it would start (and, getting no gradient,
stay) dead.

Initialisation: W_dec ~ N(0, 1) with every W_dec[i, s] rescaled to norm `dec_init_norm` (small),
W_enc = W_dec^T, b_enc = 0, b_dec = mean of the (normalised) data. Training: Adam, constant lr
then linear decay to 0 over the last `lr_decay_frac` of the steps, gradient clipping; float32 on
CPU, bf16 autocast of the matmuls on CUDA.

Stream assignment (`analyze_crosscoder`): with n_{i,s} = ||W_dec[i, s]|| (normalised space by
default), the stream share of latent i is share_{i,t} = sum_{s in stream t} n_{i,s} / sum_s n_{i,s},
its layer share sums over the sites of each hook instead; it is assigned to stream
argmax_t share_{i,t} if that share exceeds tau, else "shared"; dead latents are left out
("dead"). Counts per stream are reported for a sweep of tau. With n streams the largest share is
at least 1/n (equality = a perfectly even latent), so a tau below 1/n could never label a latent
shared: thresholds are set relative to 1/n, tau = 1/n + rho (1 - 1/n) with rho in [0, 1) the
fraction of the way from an even split to a single stream (`thresholds_for`); the default sweep is
rho = 0.1 ... 0.9 and the main threshold rho = 1/3 (tau = 0.5 for 4 streams, 0.67 for 2).
Absolute taus may be given instead; one below 1/n is an error.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .base import Probe, ProbeResult, register_result
from .crosscoder_buffer import (ActivationBuffer, ActivationSource, InMemoryActivations, Site,
                                resolve_sites, site_label)

__all__ = ["CrosscoderConfig", "Crosscoder", "train_crosscoder", "analyze_crosscoder",
           "CrosscoderResult", "CrosscoderEval", "match_decoder_directions", "thresholds_for",
           "DEFAULT_RELATIVE_THRESHOLDS", "MAIN_RELATIVE_THRESHOLD", "SHARED", "DEAD"]

SHARED, DEAD = -1, -2   # assignment codes besides stream indices
# assignment thresholds as rho = (tau - 1/n) / (1 - 1/n): 0 = an even split over the n streams
DEFAULT_RELATIVE_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MAIN_RELATIVE_THRESHOLD = 1 / 3       # tau = 0.5 with 4 streams


def _even_share(n: int) -> float:
    """1/n, the share of a latent spread evenly over n streams (0 for one stream: no constraint)."""
    return 1.0 / n if n > 1 else 0.0


def thresholds_for(n_streams: int, relative: Union[float, Sequence[float]]):
    """Absolute share thresholds tau = 1/n + rho (1 - 1/n) for relative ones rho in [0, 1)
    (a float for a float, else a list). One stream (n = 1, every latent is its own): tau = rho."""
    rhos = [relative] if isinstance(relative, (int, float)) else list(relative)
    if any(not 0 <= float(r) < 1 for r in rhos):
        raise ValueError(f"relative thresholds must lie in [0, 1), got {rhos}")
    u = _even_share(int(n_streams))
    taus = [u + float(r) * (1 - u) for r in rhos]
    return taus[0] if isinstance(relative, (int, float)) else taus
_FORMAT = "mhc_interp.crosscoder/1"
_WEIGHTS, _CONFIG = "crosscoder.safetensors", "crosscoder.json"


# ------------------------------------------------------------------------------------ config
@dataclass
class CrosscoderConfig:
    """Hyperparameters. `n_sites`, `d_model` and `sites` may be left None: `train_crosscoder`
    takes them from the data. Defaults follow Bussmann et al. (BatchTopK, aux 1/32) and Kissane
    et al. (decoder-norm init 0.08, L1 coefficient 2, L1 warm-up 5%, lr decay over the last 20%)."""

    dict_size: int = 4096                 # m, latents
    n_sites: Optional[int] = None         # S
    d_model: Optional[int] = None         # d
    sites: Optional[List[Site]] = None    # [(hook name, stream)] * S, for labels and analysis
    sparsity: str = "batchtopk"           # "batchtopk" | "l1"
    k: int = 32                           # BatchTopK: mean active latents per token
    l1_coeff: float = 2.0                 # L1: final lambda
    l1_warmup_steps: Optional[int] = None  # L1: lambda ramp length (None: 5% of the run)
    aux_k: Optional[int] = None           # BatchTopK aux loss: dead latents per row (None: min(512, m // 2))
    aux_coeff: float = 1 / 32
    dead_after_tokens: int = 1_000_000    # dead = not fired in this many training tokens
    threshold_lr: float = 0.01            # EMA rate of the inference threshold theta
    lr: float = 2e-4
    betas: Tuple[float, float] = (0.9, 0.999)
    lr_decay_frac: float = 0.2            # linear lr decay to 0 over the last fraction of steps
    grad_clip: Optional[float] = 1.0
    batch_size: int = 4096
    normalize: bool = True                # per-source normalisation to mean norm sqrt(d)
    norm_estimate_tokens: int = 16384
    dec_init_norm: float = 0.08           # ||W_dec[i, s]|| at init
    init_b_dec_from_data: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.sites is not None:
            self.sites = [(str(h), int(s)) for h, s in self.sites]
            if self.n_sites is None:
                self.n_sites = len(self.sites)
            elif self.n_sites != len(self.sites):
                raise ValueError(f"n_sites={self.n_sites} but {len(self.sites)} sites are given")
        self.betas = tuple(self.betas)
        if self.sparsity not in ("batchtopk", "l1"):
            raise ValueError(f"sparsity must be 'batchtopk' or 'l1', got {self.sparsity!r}")
        if int(self.dict_size) < 1:
            raise ValueError(f"dict_size must be >= 1, got {self.dict_size}")
        if int(self.k) < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.k > self.dict_size:
            raise ValueError(f"k={self.k} is larger than the dictionary (dict_size={self.dict_size}); "
                             f"a token cannot use more latents than exist")
        if self.aux_k is not None and not 1 <= self.aux_k <= self.dict_size:
            raise ValueError(f"aux_k={self.aux_k} must lie in [1, dict_size={self.dict_size}]")
        for name in ("n_sites", "d_model"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.l1_coeff < 0 or self.aux_coeff < 0:
            raise ValueError("l1_coeff and aux_coeff must be >= 0")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if int(self.dead_after_tokens) < 1:
            raise ValueError(f"dead_after_tokens must be >= 1, got {self.dead_after_tokens}")
        if not 0 <= self.lr_decay_frac < 1:
            raise ValueError(f"lr_decay_frac must lie in [0, 1), got {self.lr_decay_frac}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.dec_init_norm > 0:
            raise ValueError(f"dec_init_norm must be > 0, got {self.dec_init_norm}")

    @property
    def resolved_aux_k(self) -> int:
        return int(self.aux_k) if self.aux_k is not None else max(1, min(512, self.dict_size // 2))

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["sites"] = None if self.sites is None else [list(s) for s in self.sites]
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "CrosscoderConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ------------------------------------------------------------------------------------- model
class Crosscoder(nn.Module):
    """The crosscoder of the module docstring. Shapes: W_enc [S, d, m], b_enc [m],
    W_dec [m, S, d], b_dec [S, d]; buffers norm_factors [S] (c_s), threshold [] (theta, -1 until
    set), tokens_since_fired [m] (dead-latent tracker), steps [], tokens_seen []."""

    def __init__(self, cfg: CrosscoderConfig):
        super().__init__()
        if cfg.n_sites is None or cfg.d_model is None:
            raise ValueError("CrosscoderConfig needs n_sites and d_model (train_crosscoder fills "
                             "them from the data)")
        self.cfg = cfg
        S, d, m = int(cfg.n_sites), int(cfg.d_model), int(cfg.dict_size)
        g = torch.Generator().manual_seed(cfg.seed)
        W_dec = torch.randn(m, S, d, generator=g)
        W_dec *= cfg.dec_init_norm / W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)                                      # [m, S, d]
        self.W_enc = nn.Parameter(W_dec.permute(1, 2, 0).contiguous())        # [S, d, m]
        self.b_enc = nn.Parameter(torch.zeros(m))                             # [m]
        self.b_dec = nn.Parameter(torch.zeros(S, d))                          # [S, d]
        self.register_buffer("norm_factors", torch.ones(S))                   # [S]
        self.register_buffer("threshold", torch.tensor(-1.0))                 # [] theta
        self.register_buffer("tokens_since_fired", torch.zeros(m, dtype=torch.long))  # [m]
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))
        self.register_buffer("tokens_seen", torch.tensor(0, dtype=torch.long))
        self.register_buffer("norm_set", torch.tensor(False))
        self.history: List[Dict[str, float]] = []

    # ---------------------------------------------------------------------------- properties
    @property
    def n_sites(self) -> int:
        return int(self.cfg.n_sites)

    @property
    def d_model(self) -> int:
        return int(self.cfg.d_model)

    @property
    def dict_size(self) -> int:
        return int(self.cfg.dict_size)

    @property
    def sites(self) -> List[Site]:
        return list(self.cfg.sites) if self.cfg.sites is not None else [
            (f"site{j}", 0) for j in range(self.n_sites)]

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    def dead_mask(self) -> Tensor:
        """[m] bool: not fired in the last `dead_after_tokens` training tokens."""
        return self.tokens_since_fired >= self.cfg.dead_after_tokens

    # ---------------------------------------------------------------------------------- maths
    def normalize(self, x: Tensor) -> Tensor:
        """raw [B, S, d] -> normalised x^s = c_s a^s."""
        return x * self.norm_factors[:, None].to(x.dtype)

    def denormalize(self, x: Tensor) -> Tensor:
        return x / self.norm_factors[:, None].to(x.dtype)

    def code_norm(self) -> Tensor:
        """||d_i|| = sum_s ||W_dec[i, s]||, [m]."""
        return self.W_dec.norm(dim=-1).sum(-1)

    def _check(self, x: Tensor) -> None:
        if x.ndim != 3 or tuple(x.shape[1:]) != (self.n_sites, self.d_model):
            raise ValueError(f"crosscoder input must be [batch, {self.n_sites}, {self.d_model}] "
                             f"(batch, sites, d_model), got {tuple(x.shape)}")

    def relu_pre(self, xn: Tensor) -> Tensor:
        """ReLU(sum_s W_enc^s (x^s - b_dec^s) + b_enc): normalised [B, S, d] -> [B, m]."""
        B = xn.shape[0]
        W = self.W_enc.reshape(-1, self.dict_size)                 # [S*d, m]
        pre = (xn - self.b_dec).reshape(B, -1).to(W.dtype) @ W + self.b_enc   # [B, m]
        return torch.relu(pre.float())

    def _batchtopk(self, acts: Tensor, code_norm: Tensor) -> Tuple[Tensor, Tensor]:
        """Keep the k*B largest scores acts * ||d_i|| of the batch -> (f [B, m], smallest kept score)."""
        B, m = acts.shape
        score = (acts * code_norm).flatten()                       # [B*m]
        kk = min(self.cfg.k * B, B * m)
        top = score.topk(kk, sorted=False)
        keep = torch.zeros_like(score, dtype=torch.bool)
        keep[top.indices] = True
        keep &= score > 0
        # smallest positive kept score (inf if none), without a device sync
        smallest = torch.where(top.values > 0, top.values, torch.full_like(top.values, float("inf"))).min()
        return acts * keep.view(B, m), smallest

    def encode(self, x: Tensor, *, normalized: bool = False, mode: Optional[str] = None) -> Tensor:
        """Latents f [B, m] of activations x [B, S, d] (raw unless `normalized`).

        mode: "relu" (L1 crosscoders, the default for them); "threshold" (BatchTopK inference:
        keep ReLU(pre_i) where ReLU(pre_i) * ||d_i|| > theta; the default for BatchTopK once theta
        is set); "batchtopk" (k * B largest of this batch; the default before theta is set);
        "topk" (the k largest per row).
        """
        self._check(x)
        xn = x if normalized else self.normalize(x)
        acts = self.relu_pre(xn)
        if mode is None:
            mode = "relu" if self.cfg.sparsity == "l1" else (
                "threshold" if float(self.threshold) >= 0 else "batchtopk")
        if mode == "relu":
            return acts
        cn = self.code_norm().detach()
        if mode == "batchtopk":
            return self._batchtopk(acts, cn)[0]
        if mode == "topk":
            score = acts * cn
            idx = score.topk(min(self.cfg.k, self.dict_size), dim=-1).indices
            keep = torch.zeros_like(acts, dtype=torch.bool).scatter_(-1, idx, True) & (score > 0)
            return acts * keep
        if mode == "threshold":
            if float(self.threshold) < 0:
                raise ValueError("mode='threshold': the inference threshold is not set (train first)")
            return acts * (acts * cn > self.threshold)
        raise ValueError(f"unknown encode mode {mode!r}; use 'relu', 'threshold', 'batchtopk' or 'topk'")

    def decode(self, f: Tensor, *, normalized: bool = True) -> Tensor:
        """f [B, m] -> reconstruction [B, S, d] = f W_dec + b_dec (normalised space unless
        `normalized=False`, which divides by c_s)."""
        B = f.shape[0]
        W = self.W_dec.reshape(self.dict_size, -1)                 # [m, S*d]
        out = (f.to(W.dtype) @ W).float().view(B, self.n_sites, self.d_model) + self.b_dec
        return out if normalized else self.denormalize(out)

    def forward(self, x: Tensor, mode: Optional[str] = None) -> Tensor:
        """Raw activations [B, S, d] -> raw-space reconstruction [B, S, d]."""
        return self.decode(self.encode(x, mode=mode), normalized=False)

    def training_losses(self, xn: Tensor, l1_coeff: float = 0.0) -> Dict[str, Tensor]:
        """One training forward on normalised xn [B, S, d]: {loss, recon, sparsity, aux, f,
        smallest (BatchTopK: smallest kept score)}; recon/aux are mean_b sum_{s,d} squared errors."""
        acts = self.relu_pre(xn)                                   # [B, m]
        cn = self.code_norm()                                      # [m]
        zero = xn.new_zeros(())
        out: Dict[str, Tensor] = {"aux": zero, "sparsity": zero, "smallest": zero}
        if self.cfg.sparsity == "batchtopk":
            f, out["smallest"] = self._batchtopk(acts, cn.detach())
        else:
            f = acts
            out["sparsity"] = (f * cn).sum(-1).mean()
        xh = self.decode(f)                                        # [B, S, d]
        recon = (xn - xh).pow(2).sum((-2, -1)).mean()
        loss = recon + l1_coeff * out["sparsity"]
        if self.cfg.sparsity == "batchtopk" and self.cfg.aux_coeff > 0:
            dead = self.dead_mask()
            n_dead = int(dead.sum())
            if n_dead:
                e = (xn - xh).detach().reshape(xn.shape[0], -1)    # residual [B, S*d]
                a = acts[:, dead]                                  # [B, n_dead]
                top = a.topk(min(self.cfg.resolved_aux_k, n_dead), dim=-1)
                fa = torch.zeros_like(a).scatter_(-1, top.indices, top.values)
                eh = fa @ self.W_dec[dead].reshape(n_dead, -1)     # [B, S*d], no bias
                out["aux"] = (e - eh).pow(2).sum(-1).mean()
                loss = loss + self.cfg.aux_coeff * out["aux"]
        out.update(loss=loss, recon=recon, f=f)
        return out

    def decoder_norms(self, space: str = "normalized") -> Tensor:
        """||W_dec[i, s]|| [m, S]; space="raw" divides by c_s (the decoder in raw units)."""
        n = self.W_dec.detach().norm(dim=-1)
        if space == "normalized":
            return n
        if space == "raw":
            return n / self.norm_factors[None, :]
        raise ValueError(f"space must be 'normalized' or 'raw', got {space!r}")

    def decoder_directions(self, space: str = "raw") -> Tensor:
        """W_dec [m, S, d] in raw (default: / c_s) or normalised units."""
        W = self.W_dec.detach()
        if space == "raw":
            return W / self.norm_factors[None, :, None]
        if space == "normalized":
            return W.clone()
        raise ValueError(f"space must be 'normalized' or 'raw', got {space!r}")

    # --------------------------------------------------------------------------- save / load
    def save(self, path) -> Path:
        """Write `path/crosscoder.safetensors` (parameters and buffers) and `path/crosscoder.json`
        (config, training counters and history); returns the folder."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path / _WEIGHTS), metadata={"format": _FORMAT})
        info = {"format": _FORMAT, "config": self.cfg.to_dict(), "steps": int(self.steps),
                "tokens_seen": int(self.tokens_seen), "history": self.history}
        (path / _CONFIG).write_text(json.dumps(info, indent=2))
        return path

    @classmethod
    def load(cls, path, device=None) -> "Crosscoder":
        """Load what `save` wrote (a folder, or the path of either of its two files)."""
        from safetensors.torch import load_file

        path = Path(path)
        folder = path if path.is_dir() else path.parent
        if not (folder / _CONFIG).is_file() or not (folder / _WEIGHTS).is_file():
            raise FileNotFoundError(f"no crosscoder at {path}: expected {_CONFIG} and {_WEIGHTS}")
        info = json.loads((folder / _CONFIG).read_text())
        if info.get("format") != _FORMAT:
            raise ValueError(f"{folder / _CONFIG} is not a saved crosscoder (format {info.get('format')!r})")
        cc = cls(CrosscoderConfig.from_dict(info["config"]))
        cc.load_state_dict(load_file(str(folder / _WEIGHTS)))
        cc.history = list(info.get("history", []))
        return cc.to(device) if device is not None else cc

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"sites={c.n_sites}, d_model={c.d_model}, dict_size={c.dict_size}, "
                f"sparsity={c.sparsity}" + (f", k={c.k}" if c.sparsity == "batchtopk" else
                                            f", l1_coeff={c.l1_coeff}"))


# ---------------------------------------------------------------------------------- training
def _as_source(data, sites=None) -> ActivationSource:
    if isinstance(data, ActivationSource):
        return data
    if isinstance(data, (Tensor, np.ndarray)):
        return InMemoryActivations(torch.as_tensor(data), sites=sites)
    raise TypeError(f"crosscoder data must be an ActivationBuffer, an ActivationSource or a "
                    f"tensor [N, sites, d_model], got {type(data).__name__}")


def _lr_factor(step: int, n_steps: int, decay_frac: float) -> float:
    decay = int(decay_frac * n_steps)
    if decay == 0 or step < n_steps - decay:
        return 1.0
    return max(0.0, (n_steps - step) / decay)


def train_crosscoder(data, config: Union[CrosscoderConfig, Crosscoder, None] = None,
                     n_steps: Optional[int] = None, *, n_tokens: Optional[int] = None,
                     device=None, progress: bool = True, log_every: int = 50) -> Crosscoder:
    """Train a crosscoder on `data` and return it (with `.history`: one dict per `log_every`
    steps of step, tokens, lr, l1_coeff, loss, recon, sparsity, aux, l0, dead_frac, fvu) and a
    tqdm bar showing loss, L0 and the dead fraction.

    data: an `ActivationBuffer` (model activations), any `ActivationSource`, or a tensor held
        in memory: [N, n_layers, n_streams, d] (sites labelled layer-major), or [N, S, d] with
        `config.sites` (without them every site is labelled stream 0, which makes the stream
        analysis meaningless).
    config: a `CrosscoderConfig` (n_sites / d_model / sites taken from the data when None), or
        a `Crosscoder` to train further (its normalisation factors are kept).
    n_steps or n_tokens (= n_steps * batch_size): the length of the run (sets the lr decay and
        the L1 warm-up). device: where to train (default: the crosscoder's / CPU).
    Raises FloatingPointError naming the step if the batch or the loss is not finite, and
    ValueError for a buffer smaller than a batch or data whose shape does not match the config.
    """
    given = config.cfg.sites if isinstance(config, Crosscoder) else getattr(config, "sites", None)
    src = _as_source(data, sites=given if isinstance(data, (Tensor, np.ndarray)) and np.ndim(data) == 3 else None)
    if isinstance(config, Crosscoder):
        cc = config
        cfg = cc.cfg
    else:
        cfg = config if config is not None else CrosscoderConfig()
        updates = {}
        if cfg.n_sites is None:
            updates["n_sites"] = src.n_sites
        if cfg.d_model is None:
            updates["d_model"] = src.d_model
        if cfg.sites is None and len(src.sites) == (cfg.n_sites or src.n_sites):
            updates["sites"] = list(src.sites)
        if updates:
            cfg = CrosscoderConfig.from_dict({**cfg.to_dict(), **updates})
        cc = None
    if (cfg.n_sites, cfg.d_model) != (src.n_sites, src.d_model):
        raise ValueError(f"the data has {src.n_sites} sites x d_model {src.d_model}, the crosscoder "
                         f"{cfg.n_sites} x {cfg.d_model}")
    if isinstance(src, ActivationBuffer) and cfg.sites is not None and list(cfg.sites) != list(src.sites):
        raise ValueError(f"the buffer's sites {src.sites} differ from the crosscoder's {cfg.sites}")
    B = int(cfg.batch_size)
    src.check_batch_size(B)
    if n_steps is None:
        if n_tokens is None:
            raise ValueError("give n_steps or n_tokens")
        n_steps = max(1, int(n_tokens) // B)
    n_steps = int(n_steps)
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if cc is None:
        cc = Crosscoder(cfg)
    if device is not None:
        cc.to(device)
    device = cc.device
    cuda = device.type == "cuda"

    if not bool(cc.norm_set):
        sample = src.peek(cfg.norm_estimate_tokens).to(device)       # [N, S, d]
        if len(sample) == 0:
            raise ValueError("the activation source has no rows left for the normalisation sample "
                             "(a buffer with loop=False that an earlier training run used up?)")
        if not torch.isfinite(sample).all():
            raise FloatingPointError("non-finite values (NaN/inf) in the activations (normalisation sample)")
        with torch.no_grad():
            if cfg.normalize:
                mean_norm = sample.norm(dim=-1).mean(0)                # [S]
                zero = mean_norm <= 0
                if bool(zero.any()):
                    bad = [site_label(cc.sites[j]) for j in torch.nonzero(zero).flatten().tolist()]
                    warnings.warn(f"crosscoder: sites {bad} are all zero; their normalisation "
                                  f"factor is left at 1")
                cc.norm_factors.copy_(torch.where(zero, torch.ones_like(mean_norm),
                                                  math.sqrt(cfg.d_model) / mean_norm.clamp_min(1e-30)))
            if cfg.init_b_dec_from_data and int(cc.steps) == 0:
                cc.b_dec.copy_(cc.normalize(sample).mean(0))
            cc.norm_set.fill_(True)

    l1_warm = cfg.l1_warmup_steps if cfg.l1_warmup_steps is not None else max(1, int(0.05 * n_steps))
    opt = torch.optim.Adam(cc.parameters(), lr=cfg.lr, betas=cfg.betas)
    cc.train()
    bar = tqdm(total=n_steps, unit="step", desc="crosscoder", disable=not progress)
    start = int(cc.steps)
    for i in range(n_steps):
        step = start + i + 1     # 1-based, counted over the crosscoder's life
        try:
            x = src.next_batch(B).to(device, non_blocking=True)
        except StopIteration:
            warnings.warn(f"crosscoder: the activation source is used up after {i} of {n_steps} steps")
            break
        lr = cfg.lr * _lr_factor(i, n_steps, cfg.lr_decay_frac)
        for group in opt.param_groups:
            group["lr"] = lr
        l1 = cfg.l1_coeff * min(1.0, (i + 1) / l1_warm) if cfg.sparsity == "l1" else 0.0
        xn = cc.normalize(x)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            out = cc.training_losses(xn, l1)
        loss = out["loss"]
        if not torch.isfinite(loss):   # the one host sync of a step
            if not torch.isfinite(x).all():
                raise FloatingPointError(f"crosscoder training stopped at step {step}: non-finite "
                                         f"values (NaN/inf) in that step's activations")
            raise FloatingPointError(
                f"crosscoder training: the loss is {float(loss.detach())} at step {step} (reconstruction "
                f"{float(out['recon'].detach()):.4g}, sparsity {float(out['sparsity'].detach()):.4g}, aux "
                f"{float(out['aux'].detach()):.4g}); lower the learning rate (lr={cfg.lr}) or check the "
                f"activations' scale (normalize={cfg.normalize})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(cc.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            f = out["f"].detach()
            n_rows = x.shape[0]
            fired = (f > 0).any(0)
            cc.tokens_since_fired.add_(n_rows)
            cc.tokens_since_fired[fired] = 0
            cc.steps.add_(1)
            cc.tokens_seen.add_(n_rows)
            if cfg.sparsity == "batchtopk":   # theta <- EMA of the smallest kept score
                s, thr = out["smallest"].float(), cc.threshold
                new = torch.where(thr < 0, s, (1 - cfg.threshold_lr) * thr + cfg.threshold_lr * s)
                cc.threshold.copy_(torch.where(torch.isfinite(s), new, thr))
        if i % log_every == 0 or i == n_steps - 1:
            with torch.no_grad():
                var = (xn - xn.mean(0)).pow(2).sum((-2, -1)).mean()
                rec = {"step": step, "tokens": int(cc.tokens_seen), "lr": lr, "l1_coeff": l1,
                       "loss": float(loss), "recon": float(out["recon"]),
                       "sparsity": float(out["sparsity"]), "aux": float(out["aux"]),
                       "l0": float((f > 0).sum(-1).float().mean()),
                       "dead_frac": float(cc.dead_mask().float().mean()),
                       "fvu": float(out["recon"] / var.clamp_min(1e-30))}
            cc.history.append(rec)
            bar.set_postfix({"loss": f"{rec['loss']:.4g}", "L0": f"{rec['l0']:.1f}",
                             "dead": f"{100 * rec['dead_frac']:.1f}%", "fvu": f"{rec['fvu']:.3f}"})
        bar.update(1)
    bar.close()
    cc.eval()
    return cc


# ---------------------------------------------------------------------------------- analysis
class _EvalStats:
    """Online statistics of a crosscoder over raw activations [T, S, d] (float64 sums):
    per-site squared error and variance (explained variance), firing counts, L0."""

    def __init__(self, cc: Crosscoder, mode: Optional[str] = None, chunk: int = 4096):
        self.cc, self.mode, self.chunk = cc, mode, chunk
        S, d, m = cc.n_sites, cc.d_model, cc.dict_size
        dev = cc.device
        self.n = 0
        self.sq_err = torch.zeros(S, dtype=torch.float64, device=dev)
        self.sum_x = torch.zeros(S, d, dtype=torch.float64, device=dev)
        self.sum_sq = torch.zeros(S, dtype=torch.float64, device=dev)
        self.fires = torch.zeros(m, dtype=torch.float64, device=dev)
        self.l0_sum = 0.0

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        cc = self.cc
        for lo in range(0, x.shape[0], self.chunk):
            xn = cc.normalize(x[lo:lo + self.chunk].to(cc.device, torch.float32))  # [T, S, d]
            f = cc.encode(xn, normalized=True, mode=self.mode)                      # [T, m]
            err = xn - cc.decode(f)
            xd = xn.double()
            self.sq_err += err.double().pow(2).sum((0, 2))
            self.sum_x += xd.sum(0)
            self.sum_sq += xd.pow(2).sum((0, 2))
            active = f > 0
            self.fires += active.double().sum(0)
            self.l0_sum += float(active.sum())
            self.n += xn.shape[0]

    def summary(self) -> Dict[str, np.ndarray]:
        if self.n == 0:
            raise ValueError("crosscoder analysis saw no tokens")
        var = self.sum_sq - self.sum_x.pow(2).sum(-1) / self.n                      # [S]
        ev = 1 - self.sq_err / var.clamp_min(1e-30)
        ev_total = 1 - self.sq_err.sum() / var.sum().clamp_min(1e-30)
        return {"explained_variance": ev.cpu().numpy(),
                "explained_variance_total": np.asarray(float(ev_total)),
                "firing_frequency": (self.fires / self.n).cpu().numpy(),
                "l0": np.asarray(self.l0_sum / self.n)}


def _structure(sites: Sequence[Site]) -> Tuple[List[str], np.ndarray, np.ndarray, int]:
    layers = list(dict.fromkeys(h for h, _ in sites))
    layer_of = np.array([layers.index(h) for h, _ in sites])
    stream_of = np.array([s for _, s in sites])
    return layers, layer_of, stream_of, int(stream_of.max()) + 1


def _resolve_thresholds(n: int, threshold: Optional[float], thresholds: Optional[Sequence[float]]):
    """(main tau, sorted swept taus) for n streams; defaults relative to 1/n (module docstring)."""
    main = thresholds_for(n, MAIN_RELATIVE_THRESHOLD) if threshold is None else float(threshold)
    swept = thresholds_for(n, DEFAULT_RELATIVE_THRESHOLDS) if thresholds is None else [float(t) for t in thresholds]
    swept = sorted(set(swept) | {main})
    u = _even_share(n)
    low = [t for t in swept if not u - 1e-12 <= t < 1]
    if low:
        raise ValueError(
            f"assignment thresholds must lie in [1/n, 1) = [{u:.3g}, 1) for {n} streams, got {low}: "
            f"the largest of n stream shares is at least 1/n, so a lower threshold labels no latent "
            f"'shared'; give relative ones with thresholds_for(n_streams, rho)")
    return main, swept


def _build_result(cc: Crosscoder, stats: Optional[_EvalStats], threshold: Optional[float],
                  thresholds: Optional[Sequence[float]], space: str, probe: str = "crosscoder") -> "CrosscoderResult":
    sites = cc.sites
    layers, layer_of, stream_of, n = _structure(sites)
    threshold, thresholds = _resolve_thresholds(n, threshold, thresholds)
    L = len(layers)
    norms = cc.decoder_norms(space).double().cpu().numpy()                          # [m, S]
    total = norms.sum(-1, keepdims=True)
    safe = np.where(total > 0, total, 1.0)
    stream_share = np.stack([norms[:, stream_of == t].sum(-1) for t in range(n)], -1) / safe  # [m, n]
    layer_share = np.stack([norms[:, layer_of == l].sum(-1) for l in range(L)], -1) / safe    # [m, L]
    arrays: Dict[str, np.ndarray] = {}
    dead_train = cc.dead_mask().cpu().numpy()
    if stats is not None:
        arrays.update(stats.summary())
        dead = arrays["firing_frequency"] == 0
    else:
        dead = dead_train.copy()
        arrays["explained_variance"] = np.full(len(sites), np.nan)
        arrays["explained_variance_total"] = np.asarray(np.nan)
    dead |= total[:, 0] == 0
    best = stream_share.argmax(-1)
    top = stream_share.max(-1)
    assignment = np.stack([np.where(dead, DEAD, np.where(top > t, best, SHARED)) for t in thresholds])
    counts = np.stack([np.concatenate([[(a == s).sum() for s in range(n)], [(a == SHARED).sum()],
                                       [(a == DEAD).sum()]]) for a in assignment])  # [n_thr, n + 2]
    main = thresholds.index(float(threshold))
    ev_grid = np.full((L, n), np.nan)
    ev_grid[layer_of, stream_of] = arrays["explained_variance"]
    # mean layer profile of the alive latents of each group (streams..., shared)
    profile = np.full((n + 1, L), np.nan)
    for g, code in enumerate(list(range(n)) + [SHARED]):
        sel = assignment[main] == code
        if sel.any():
            profile[g] = layer_share[sel].mean(0)
    arrays.update(decoder_norms=norms.astype(np.float32), stream_share=stream_share,
                  layer_share=layer_share, max_share=top, assignment=assignment,
                  thresholds=np.asarray(thresholds),
                  thresholds_relative=(np.asarray(thresholds) - _even_share(n)) / (1 - _even_share(n)),
                  counts=counts, dead=dead, dead_train=dead_train,
                  explained_variance_grid=ev_grid, layer_profile=profile,
                  norm_factors=cc.norm_factors.detach().cpu().numpy(),
                  site_stream=stream_of, site_layer=layer_of)
    labels = [f"stream {s}" for s in range(n)] + ["shared", "dead"]
    meta = {"sites": [list(s) for s in sites], "site_labels": [site_label(s) for s in sites],
            "layers": layers, "n_streams": n, "threshold": float(threshold),
            "threshold_relative": (float(threshold) - _even_share(n)) / (1 - _even_share(n)),
            "even_share": _even_share(n),
            "space": space,
            "count_labels": labels,
            "counts_at_threshold": {lab: int(c) for lab, c in zip(labels, counts[main])},
            "n_alive": int((~dead).sum()), "dict_size": cc.dict_size,
            "tokens_used": int(stats.n) if stats is not None else 0,
            "dead_from": "evaluation tokens (never fired)" if stats is not None else
                         f"training tracker (no firing in {cc.cfg.dead_after_tokens} tokens)",
            "crosscoder_config": cc.cfg.to_dict(), "training_steps": int(cc.steps),
            "training_tokens": int(cc.tokens_seen)}
    if stats is not None:
        meta["l0"] = float(arrays["l0"])
        meta["explained_variance_total"] = float(arrays["explained_variance_total"])
    return CrosscoderResult(probe=probe, arrays=arrays, meta=meta)


def analyze_crosscoder(crosscoder: Crosscoder, data=None, *, n_tokens: int = 65536,
                       batch_size: int = 4096, threshold: Optional[float] = None,
                       thresholds: Optional[Sequence[float]] = None, space: str = "normalized",
                       mode: Optional[str] = None) -> "CrosscoderResult":
    """Feature-to-stream assignment and quality statistics of a trained crosscoder.

    Per latent i: decoder norms n_{i,s} = ||W_dec[i, s]|| (`space`="normalized", the default,
    compares sites in units of their mean norm sqrt(d); "raw" divides by c_s and so favours
    high-norm streams), stream share share_{i,t} = sum_{s in stream t} n_{i,s} / sum_s n_{i,s}
    [m, n], layer share [m, n_layers] (layers = distinct hooks), assignment = argmax_t share if
    max_t share > tau else SHARED (-1), dead latents DEAD (-2), for every tau in `thresholds`
    (plus `threshold`, the one in `meta["counts_at_threshold"]`). Both are absolute shares in
    [1/n, 1); by default tau = 1/n + rho (1 - 1/n) for rho in DEFAULT_RELATIVE_THRESHOLDS, and
    the main threshold rho = 1/3 (0.5 for 4 streams); see `thresholds_for`.

    data: None (dead = the training tracker; no explained variance), or activations (a tensor
    [N, S, d] / [N, L, n, d], an `ActivationBuffer`, any `ActivationSource`) of which `n_tokens`
    rows are used: then dead = never fired on them, and the explained variance per site
    1 - sum ||x^s - x^_s||^2 / sum ||x^s - mean x^s||^2, firing frequencies and L0 are reported.
    For a model corpus, `run_probes(model, CrosscoderEval(crosscoder), tokens)` does the same
    through the runner. mode: the `encode` mode (default: threshold for BatchTopK, relu for L1).
    """
    cc = crosscoder
    stats = None
    if data is not None:
        src = _as_source(data, sites=cc.sites if isinstance(data, Tensor) and data.ndim == 3 else None)
        if (src.n_sites, src.d_model) != (cc.n_sites, cc.d_model):
            raise ValueError(f"the data has {src.n_sites} sites x d_model {src.d_model}, the "
                             f"crosscoder {cc.n_sites} x {cc.d_model}")
        stats = _EvalStats(cc, mode)
        seen = 0
        n_tokens = min(int(n_tokens), src.capacity) if isinstance(src, InMemoryActivations) else int(n_tokens)
        while seen < n_tokens:
            take = min(batch_size, n_tokens - seen, src.capacity)
            try:
                x = src.next_batch(take)
            except StopIteration:
                break
            stats.update(x)
            seen += x.shape[0]
    return _build_result(cc, stats, threshold, thresholds, space)


class CrosscoderEval(Probe):
    """A probe that evaluates a trained crosscoder over a corpus through `run_probes` (position 0
    and padding masked by the runner) and returns its `CrosscoderResult` (see
    `analyze_crosscoder`). The crosscoder's sites must be hooks of the model."""

    name = "crosscoder"

    def __init__(self, crosscoder: Crosscoder, threshold: Optional[float] = None,
                 thresholds: Optional[Sequence[float]] = None, space: str = "normalized",
                 mode: Optional[str] = None):
        self.cc = crosscoder
        self.threshold, self.thresholds, self.space, self.mode = threshold, thresholds, space, mode
        self._stats: Optional[_EvalStats] = None
        self._hooks: Optional[List[str]] = None

    def setup(self, model) -> None:
        sites = resolve_sites(model, self.cc.sites)
        if model.cfg.d_model != self.cc.d_model:
            raise ValueError(f"the crosscoder has d_model {self.cc.d_model}, the model {model.cfg.d_model}")
        self._hooks = list(dict.fromkeys(h for h, _ in sites))
        self._stats = _EvalStats(self.cc, self.mode)

    def hook_names(self, model) -> List[str]:
        if self._hooks is None:
            self.setup(model)
        return list(self._hooks)

    def update(self, acts: Dict[str, Tensor], mask: Tensor) -> None:
        x = torch.stack([acts[h][mask.to(acts[h].device)][:, s] for h, s in self.cc.sites], dim=1)
        self._stats.update(x)                                      # [T, S, d]

    def result(self) -> "CrosscoderResult":
        if self._stats is None:
            raise RuntimeError("CrosscoderEval.result called before setup(model)")
        return _build_result(self.cc, self._stats, self.threshold, self.thresholds, self.space,
                             probe=self.name)


def match_decoder_directions(learned: Tensor, true: Tensor,
                             alive: Optional[Union[Tensor, np.ndarray]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Hungarian matching of ground-truth directions true [F, S, d] (or [F, D]) to learned ones
    [m, S, d] by cosine of the flattened vectors. alive: [m] bool, the latents that may be
    matched (pass `~result["dead"]`: a dead latent never fires, so its decoder direction -
    however well aligned, e.g. left over from the initialisation - recovers nothing).
    Returns (index into the m latents of the matched one [F], its cosine [F]); with fewer
    candidates than true directions the unmatched ones get index -1 and cosine NaN.
    Uses scipy.optimize.linear_sum_assignment."""
    from scipy.optimize import linear_sum_assignment

    a = torch.as_tensor(learned).detach().double().cpu().flatten(1)
    b = torch.as_tensor(true).detach().double().cpu().flatten(1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"direction sizes differ: learned {a.shape[1]}, true {b.shape[1]}")
    cand = np.arange(a.shape[0])
    if alive is not None:
        alive = np.asarray(torch.as_tensor(alive).cpu(), dtype=bool)
        if alive.shape != (a.shape[0],):
            raise ValueError(f"alive must be a [{a.shape[0]}] bool mask, got shape {alive.shape}")
        cand = np.flatnonzero(alive)
    idx = np.full(b.shape[0], -1)
    sim = np.full(b.shape[0], np.nan)
    if cand.size == 0:
        return idx, sim
    a = a[torch.as_tensor(cand)]
    cos = (b / b.norm(dim=1, keepdim=True).clamp_min(1e-30)) @ (a / a.norm(dim=1, keepdim=True).clamp_min(1e-30)).T
    rows, cols = linear_sum_assignment(-cos.numpy())
    idx[rows] = cand[cols]
    sim[rows] = cos.numpy()[rows, cols]
    return idx, sim


# ------------------------------------------------------------------------------------ result
@register_result
class CrosscoderResult(ProbeResult):
    """Arrays: `stream_share` [m, n], `layer_share` [m, L], `max_share` [m], `decoder_norms`
    [m, S], `assignment` [n_thresholds, m] (stream index, -1 shared, -2 dead), `thresholds`,
    `counts` [n_thresholds, n + 2] (streams..., shared, dead), `dead` [m], `dead_train` [m],
    `explained_variance` [S] and `_grid` [L, n] (NaN where no site), `layer_profile` [n + 1, L]
    (mean layer share of the latents assigned to each stream / shared), `norm_factors` [S],
    `site_stream` / `site_layer` [S]; with evaluation data also `firing_frequency` [m], `l0`,
    `explained_variance_total`."""

    @property
    def n_streams(self) -> int:
        return int(self.meta["n_streams"])

    def _thr_index(self, threshold: Optional[float]) -> int:
        t = float(self.meta["threshold"] if threshold is None else threshold)
        thr = self.arrays["thresholds"]
        hit = np.flatnonzero(np.isclose(thr, t))
        if not hit.size:
            raise KeyError(f"threshold {t} was not swept; swept: {thr.tolist()}")
        return int(hit[0])

    def assignment_at(self, threshold: Optional[float] = None) -> np.ndarray:
        """[m] stream index, -1 (shared) or -2 (dead) at one swept threshold (default: main)."""
        return self.arrays["assignment"][self._thr_index(threshold)]

    def counts_at(self, threshold: Optional[float] = None) -> Dict[str, int]:
        row = self.arrays["counts"][self._thr_index(threshold)]
        return {lab: int(c) for lab, c in zip(self.meta["count_labels"], row)}

    def table(self) -> str:
        """Counts per stream / shared / dead for every swept threshold, as text."""
        labs = self.meta["count_labels"]
        n = self.n_streams
        lines = ["tau   rho   " + " ".join(f"{l:>9s}" for l in labs)]
        for t, row in zip(self.arrays["thresholds"], self.arrays["counts"]):
            u = _even_share(n)
            lines.append(f"{t:4.2f}  {(t - u) / (1 - u):4.2f}  " + " ".join(f"{int(c):9d}" for c in row))
        lines.append(f"(rho = (tau - 1/n) / (1 - 1/n) with n = {n} streams: 0 = an even split, 1 = one stream)")
        return "\n".join(lines)

    def plot(self, threshold: Optional[float] = None, max_features: int = 2000):
        """{"stream_share": alive latents x streams heatmap sorted by assignment (features
        concentrating in one stream) + histogram of the max share, "assignment_counts": counts per
        stream at tau and against the tau sweep, "layer_profile": mean layer share per group and
        a latents x layers heatmap, "explained_variance": layers x streams, "firing": firing
        frequency histogram (with evaluation data)}."""
        import matplotlib.pyplot as plt

        n, a = self.n_streams, self.arrays
        ti = self._thr_index(threshold)
        tau = float(a["thresholds"][ti])
        assign = a["assignment"][ti]
        alive = np.flatnonzero(assign != DEAD)
        # order: by group (stream 0..n-1, then shared), then by decreasing max share
        group = np.where(assign[alive] == SHARED, n, assign[alive])
        order = alive[np.lexsort((-a["max_share"][alive], group))][:max_features]
        figs = {}
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 1.3]})
        ax = axes[0]
        if order.size:
            im = ax.imshow(a["stream_share"][order], aspect="auto", vmin=0, vmax=1, cmap="viridis",
                           interpolation="nearest")
            fig.colorbar(im, ax=ax, label="decoder-norm share")
        ax.set_xticks(range(n))
        ax.set_xlabel("stream")
        ax.set_ylabel(f"alive latents ({alive.size}), sorted by assignment")
        ax.set_title("decoder-norm share per stream")
        ax = axes[1]
        if alive.size:
            ax.hist(a["max_share"][alive], bins=40, range=(0, 1), color=colors[0])
        ax.axvline(tau, color="k", ls="--", lw=1, label=f"tau = {tau:g}")
        ax.axvline(1 / n, color="grey", ls=":", lw=1, label=f"1/n = {1 / n:.2f}")
        ax.set_xlabel("max_s stream share")
        ax.set_ylabel("latents")
        ax.legend(fontsize=8)
        ax.set_title("how concentrated is each feature?")
        figs["stream_share"] = fig

        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        labs = self.meta["count_labels"]
        counts = a["counts"][ti]
        axes[0].bar(range(n + 2), counts, color=[colors[s % len(colors)] for s in range(n)] + ["grey", "lightgrey"])
        axes[0].set_xticks(range(n + 2))
        axes[0].set_xticklabels(labs, rotation=30, fontsize=8)
        axes[0].set_ylabel("latents")
        u = _even_share(n)
        axes[0].set_title(f"assignment at tau = {tau:.3g} (rho = {(tau - u) / (1 - u):.2f})")
        for s in range(n):
            axes[1].plot(a["thresholds"], a["counts"][:, s], marker=".", label=f"stream {s}")
        axes[1].plot(a["thresholds"], a["counts"][:, n], marker=".", color="grey", label="shared")
        axes[1].set_xlabel("threshold tau (share of the top stream)")
        top = axes[1].secondary_xaxis("top", functions=(lambda t: (t - u) / (1 - u), lambda r: u + r * (1 - u)))
        top.set_xlabel(f"rho = (tau - 1/n) / (1 - 1/n), n = {n}", fontsize=8)
        axes[1].set_ylabel("latents")
        axes[1].legend(fontsize=7)
        axes[1].set_title("threshold sweep", pad=30)
        figs["assignment_counts"] = fig

        layers = self.meta["layers"]
        short = [l[: -len(".hook_streams_out")] if l.endswith(".hook_streams_out") else l for l in layers]
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for g in range(n + 1):
            if np.isfinite(a["layer_profile"][g]).all():
                axes[0].plot(range(len(layers)), a["layer_profile"][g], marker=".",
                             color="grey" if g == n else colors[g % len(colors)],
                             label="shared" if g == n else f"stream {g}")
        axes[0].set_xticks(range(len(layers)))
        axes[0].set_xticklabels(short, rotation=30, fontsize=7)
        axes[0].set_ylabel("mean layer share")
        axes[0].legend(fontsize=7)
        axes[0].set_title("layer profile per assigned group")
        if order.size:
            im = axes[1].imshow(a["layer_share"][order], aspect="auto", vmin=0, vmax=1,
                                cmap="viridis", interpolation="nearest")
            fig.colorbar(im, ax=axes[1], label="decoder-norm share")
        axes[1].set_xticks(range(len(layers)))
        axes[1].set_xticklabels(short, rotation=30, fontsize=7)
        axes[1].set_ylabel("alive latents (sorted as above)")
        axes[1].set_title("layer share")
        figs["layer_profile"] = fig

        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * n, 1.2 + 0.45 * len(layers)))
        grid = a["explained_variance_grid"]
        im = ax.imshow(grid, vmin=min(0.0, float(np.nanmin(grid))) if np.isfinite(grid).any() else 0,
                       vmax=1, cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="w" if v < 0.6 else "k")
        ax.set_xticks(range(n))
        ax.set_xlabel("stream")
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels(short, fontsize=7)
        fig.colorbar(im, ax=ax, label="explained variance")
        ax.set_title("explained variance per site")
        figs["explained_variance"] = fig

        if "firing_frequency" in a:
            fig, ax = plt.subplots(figsize=(6, 3.4))
            freq = a["firing_frequency"]
            live = freq[freq > 0]
            if live.size:
                ax.hist(np.log10(live), bins=40, color=colors[0])
            ax.set_xlabel("log10 firing frequency")
            ax.set_ylabel("latents")
            ax.set_title(f"{int((freq == 0).sum())} of {freq.size} latents never fired "
                         f"({self.meta.get('tokens_used', '?')} tokens); L0 {float(a['l0']):.1f}")
            figs["firing"] = fig
        return figs
