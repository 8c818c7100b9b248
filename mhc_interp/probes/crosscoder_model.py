"""The sparse crosscoder itself: its hyperparameters (`CrosscoderConfig`) and the module
(`Crosscoder`: per-source normalisation, encode with BatchTopK / threshold / L1 sparsity, decode,
training losses, save / load). The maths: docs/crosscoder.md."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .crosscoder_buffer import ActivationSource, InMemoryActivations, grid_sites
from .sites import Site

_FORMAT = "mhc_interp.crosscoder/1"
_WEIGHTS, _CONFIG = "crosscoder.safetensors", "crosscoder.json"


# ------------------------------------------------------------------------------------ config
@dataclass
class CrosscoderConfig:
    """Hyperparameters. `n_sites`, `d_model` and `sites` may be left None: `train_crosscoder`
    takes them from the data. Defaults follow Bussmann et al. (BatchTopK, aux 1/32) and Kissane
    et al. (decoder-norm init 0.08, L1 coefficient 2, L1 warm-up 5%, lr decay over the last 20%)."""

    dict_size: int = 4096  # m, latents
    n_sites: Optional[int] = None  # S
    d_model: Optional[int] = None  # d
    sites: Optional[List[Site]] = None  # [(hook name, stream)] * S, for labels and analysis
    sparsity: str = "batchtopk"  # "batchtopk" | "l1"
    k: int = 32  # BatchTopK: mean active latents per token
    l1_coeff: float = 2.0  # L1: final lambda
    l1_warmup_steps: Optional[int] = None  # L1: lambda ramp length (None: 5% of the run)
    aux_k: Optional[int] = None  # BatchTopK aux loss: dead latents per row (None: min(512, m // 2))
    aux_coeff: float = 1 / 32
    dead_after_tokens: int = 1_000_000  # dead = not fired in this many training tokens
    threshold_lr: float = 0.01  # EMA rate of the inference threshold theta
    lr: float = 2e-4
    betas: Tuple[float, float] = (0.9, 0.999)
    lr_decay_frac: float = 0.2  # linear lr decay to 0 over the last fraction of steps
    grad_clip: Optional[float] = 1.0
    batch_size: int = 4096
    normalize: bool = True  # per-source normalisation to mean norm sqrt(d)
    norm_estimate_tokens: int = 16384
    dec_init_norm: float = 0.08  # ||W_dec[i, s]|| at init
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
        for name in ("dict_size", "k", "batch_size", "dead_after_tokens", "n_sites", "d_model"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.k > self.dict_size:
            raise ValueError(
                f"k={self.k} is larger than the dictionary (dict_size={self.dict_size}); "
                f"a token cannot use more latents than exist"
            )
        if self.aux_k is not None and not 1 <= self.aux_k <= self.dict_size:
            raise ValueError(f"aux_k={self.aux_k} must lie in [1, dict_size={self.dict_size}]")
        if self.l1_coeff < 0 or self.aux_coeff < 0:
            raise ValueError("l1_coeff and aux_coeff must be >= 0")
        if not 0 <= self.lr_decay_frac < 1:
            raise ValueError(f"lr_decay_frac must lie in [0, 1), got {self.lr_decay_frac}")
        if not (self.lr > 0 and self.dec_init_norm > 0):
            raise ValueError(f"lr and dec_init_norm must be > 0, got {self.lr} and {self.dec_init_norm}")

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
    """The crosscoder of docs/crosscoder.md. Shapes: W_enc [S, d, m], b_enc [m],
    W_dec [m, S, d], b_dec [S, d]; buffers norm_factors [S] (c_s), threshold [] (theta, -1 until
    set), tokens_since_fired [m] (dead-latent tracker), steps [], tokens_seen []."""

    def __init__(self, cfg: CrosscoderConfig):
        super().__init__()
        if cfg.n_sites is None or cfg.d_model is None:
            raise ValueError(
                "CrosscoderConfig needs n_sites and d_model (train_crosscoder fills them from the data)"
            )
        self.cfg = cfg
        S, d, m = int(cfg.n_sites), int(cfg.d_model), int(cfg.dict_size)
        g = torch.Generator().manual_seed(cfg.seed)
        W_dec = torch.randn(m, S, d, generator=g)
        W_dec *= cfg.dec_init_norm / W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)  # [m, S, d]
        self.W_enc = nn.Parameter(W_dec.permute(1, 2, 0).contiguous())  # [S, d, m]
        self.b_enc = nn.Parameter(torch.zeros(m))  # [m]
        self.b_dec = nn.Parameter(torch.zeros(S, d))  # [S, d]
        buffers = dict(
            norm_factors=torch.ones(S),  # [S]
            threshold=torch.tensor(-1.0),  # [] theta
            tokens_since_fired=torch.zeros(m, dtype=torch.long),  # [m]
            steps=torch.tensor(0),  # [] long
            tokens_seen=torch.tensor(0),
            norm_set=torch.tensor(False),
        )
        for name, value in buffers.items():
            self.register_buffer(name, value)
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
        return list(self.cfg.sites or grid_sites(self.n_sites, 1, prefix="site"))

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

    def relu_pre(self, xn: Tensor) -> Tensor:
        """ReLU(sum_s W_enc^s (x^s - b_dec^s) + b_enc): normalised [B, S, d] -> [B, m]."""
        B = xn.shape[0]
        W = self.W_enc.reshape(-1, self.dict_size)  # [S*d, m]
        pre = (xn - self.b_dec).reshape(B, -1).to(W.dtype) @ W + self.b_enc  # [B, m]
        return torch.relu(pre.float())

    def _batchtopk(self, acts: Tensor, code_norm: Tensor) -> Tuple[Tensor, Tensor]:
        """Keep the k*B largest scores acts * ||d_i|| of the batch -> (f [B, m], smallest kept score)."""
        B, m = acts.shape
        score = (acts * code_norm).flatten()  # [B*m]
        top = score.topk(self.cfg.k * B, sorted=False)  # k <= m: the config checks it
        keep = torch.zeros_like(score, dtype=torch.bool).index_fill_(0, top.indices, True) & (score > 0)
        # smallest positive kept score (inf if none), without a device sync
        smallest = top.values.masked_fill(~(top.values > 0), float("inf")).min()
        return acts * keep.view(B, m), smallest

    def encode(self, x: Tensor, *, normalized: bool = False, mode: Optional[str] = None) -> Tensor:
        """Latents f [B, m] of activations x [B, S, d] (raw unless `normalized`).

        mode: "relu" (L1 crosscoders, the default for them); "threshold" (BatchTopK inference:
        keep ReLU(pre_i) where ReLU(pre_i) * ||d_i|| > theta; the default for BatchTopK once theta
        is set); "batchtopk" (k * B largest of this batch; the default before theta is set);
        "topk" (the k largest per row).
        """
        if x.ndim != 3 or tuple(x.shape[1:]) != (self.n_sites, self.d_model):
            raise ValueError(
                f"crosscoder input must be [batch, {self.n_sites}, {self.d_model}] "
                f"(batch, sites, d_model), got {tuple(x.shape)}"
            )
        xn = x if normalized else self.normalize(x)
        acts = self.relu_pre(xn)
        if mode is None:
            mode = (
                "relu"
                if self.cfg.sparsity == "l1"
                else ("threshold" if float(self.threshold) >= 0 else "batchtopk")
            )
        if mode == "relu":
            return acts
        cn = self.code_norm().detach()
        if mode == "batchtopk":
            return self._batchtopk(acts, cn)[0]
        if mode == "topk":
            score = acts * cn
            idx = score.topk(self.cfg.k, dim=-1).indices
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
        W = self.W_dec.reshape(self.dict_size, -1)  # [m, S*d]
        out = (f.to(W.dtype) @ W).float().view(B, self.n_sites, self.d_model) + self.b_dec
        return out if normalized else self.denormalize(out)

    def forward(self, x: Tensor, mode: Optional[str] = None) -> Tensor:
        """Raw activations [B, S, d] -> raw-space reconstruction [B, S, d]."""
        return self.decode(self.encode(x, mode=mode), normalized=False)

    def training_losses(self, xn: Tensor, l1_coeff: float = 0.0) -> Dict[str, Tensor]:
        """One training forward on normalised xn [B, S, d]: {loss, recon, sparsity, aux, f,
        smallest (BatchTopK: smallest kept score)}; recon/aux are mean_b sum_{s,d} squared errors."""
        acts = self.relu_pre(xn)  # [B, m]
        cn = self.code_norm()  # [m]
        zero = xn.new_zeros(())
        out: Dict[str, Tensor] = {"aux": zero, "sparsity": zero, "smallest": zero}
        if self.cfg.sparsity == "batchtopk":
            f, out["smallest"] = self._batchtopk(acts, cn.detach())
        else:
            f = acts
            out["sparsity"] = (f * cn).sum(-1).mean()
        xh = self.decode(f)  # [B, S, d]
        recon = (xn - xh).pow(2).sum((-2, -1)).mean()
        loss = recon + l1_coeff * out["sparsity"]
        if self.cfg.sparsity == "batchtopk" and self.cfg.aux_coeff > 0:
            dead = self.dead_mask()
            n_dead = int(dead.sum())
            if n_dead:
                e = (xn - xh).detach().reshape(xn.shape[0], -1)  # residual [B, S*d]
                a = acts[:, dead]  # [B, n_dead]
                top = a.topk(min(self.cfg.resolved_aux_k, n_dead), dim=-1)
                fa = torch.zeros_like(a).scatter_(-1, top.indices, top.values)
                eh = fa @ self.W_dec[dead].reshape(n_dead, -1)  # [B, S*d], no bias
                out["aux"] = (e - eh).pow(2).sum(-1).mean()
                loss = loss + self.cfg.aux_coeff * out["aux"]
        out.update(loss=loss, recon=recon, f=f)
        return out

    def decoder_norms(self, space: str = "normalized") -> Tensor:
        """||W_dec[i, s]|| [m, S]; space="raw" divides by c_s (the decoder in raw units)."""
        return self.decoder_directions(space).norm(dim=-1)

    def decoder_directions(self, space: str = "raw") -> Tensor:
        """W_dec [m, S, d] in raw (default: / c_s) or normalised units."""
        if space not in ("normalized", "raw"):
            raise ValueError(f"space must be 'normalized' or 'raw', got {space!r}")
        W = self.W_dec.detach()
        return W / self.norm_factors[None, :, None] if space == "raw" else W.clone()

    # --------------------------------------------------------------------------- save / load
    def save(self, path) -> Path:
        """Write `path/crosscoder.safetensors` (parameters and buffers) and `path/crosscoder.json`
        (config, training counters and history); returns the folder."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path / _WEIGHTS), metadata={"format": _FORMAT})
        info = {
            "format": _FORMAT,
            "config": self.cfg.to_dict(),
            "steps": int(self.steps),
            "tokens_seen": int(self.tokens_seen),
            "history": self.history,
        }
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
        return f"sites={c.n_sites}, d_model={c.d_model}, dict_size={c.dict_size}, sparsity={c.sparsity}" + (
            f", k={c.k}" if c.sparsity == "batchtopk" else f", l1_coeff={c.l1_coeff}"
        )


def as_activation_source(data, sites=None) -> ActivationSource:
    """The crosscoder's data as an `ActivationSource`: a source as is, a tensor in memory (`sites`
    label a [N, S, d] one; [N, n_layers, n_streams, d] names its own)."""
    if isinstance(data, ActivationSource):
        return data
    if isinstance(data, (Tensor, np.ndarray)):
        x = torch.as_tensor(data)
        return InMemoryActivations(x, sites=sites if x.ndim == 3 else None)
    raise TypeError(
        f"crosscoder data must be an ActivationBuffer, an ActivationSource or a "
        f"tensor [N, sites, d_model], got {type(data).__name__}"
    )
