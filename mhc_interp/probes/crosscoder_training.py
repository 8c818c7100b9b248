"""Training a sparse crosscoder: Adam, constant lr then linear decay to 0 over the last
`lr_decay_frac` of the steps, gradient clipping, L1 warm-up, the dead-latent tracker and the
BatchTopK inference threshold theta (an EMA of the smallest kept score); float32 on CPU, bf16
autocast of the matmuls on CUDA. The maths: docs/crosscoder.md."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .crosscoder_buffer import ActivationBuffer, ActivationSource
from .crosscoder_model import Crosscoder, CrosscoderConfig, as_activation_source
from .sites import site_label


def _lr_factor(step: int, n_steps: int, decay_frac: float) -> float:
    """1 until the last `decay_frac` of the steps (0 <= step < n_steps), then linearly down to 1 / decay."""
    decay = int(decay_frac * n_steps)
    return min(1.0, (n_steps - step) / decay) if decay else 1.0


def _source_and_crosscoder(data, config) -> Tuple[ActivationSource, Crosscoder]:
    """(the data as a source, the crosscoder to train: the one given, or a new one whose config
    has n_sites, d_model and sites filled from the data); refuses data that does not fit it."""
    cc = config if isinstance(config, Crosscoder) else None
    cfg = config.cfg if cc is not None else config or CrosscoderConfig()
    src = as_activation_source(data, sites=cfg.sites)
    if cc is None:
        n_sites = cfg.n_sites or src.n_sites
        cfg = replace(
            cfg,
            n_sites=n_sites,
            d_model=cfg.d_model or src.d_model,
            sites=list(src.sites) if cfg.sites is None and len(src.sites) == n_sites else cfg.sites,
        )
    src.check_fits(cfg.n_sites, cfg.d_model)
    if isinstance(src, ActivationBuffer) and cfg.sites is not None and list(cfg.sites) != list(src.sites):
        raise ValueError(f"the buffer's sites {src.sites} differ from the crosscoder's {cfg.sites}")
    return src, cc if cc is not None else Crosscoder(cfg)


def _run_length(n_steps: Optional[int], n_tokens: Optional[int], batch_size: int) -> int:
    if n_steps is None:
        if n_tokens is None:
            raise ValueError("give n_steps or n_tokens")
        n_steps = max(1, int(n_tokens) // batch_size)
    if int(n_steps) < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    return int(n_steps)


@torch.no_grad()
def _set_normalization(cc: Crosscoder, src: ActivationSource) -> None:
    """Once per crosscoder: c_s = sqrt(d) / E||a^s|| (normalize=True) and b_dec = mean of the
    normalised sample (init_b_dec_from_data), from `norm_estimate_tokens` rows of `src`."""
    cfg = cc.cfg
    sample = src.peek(cfg.norm_estimate_tokens).to(cc.device)  # [N, S, d]
    if len(sample) == 0:
        raise ValueError(
            "the activation source has no rows left for the normalisation sample "
            "(a buffer with loop=False that an earlier training run used up?)"
        )
    if not torch.isfinite(sample).all():
        raise FloatingPointError("non-finite values (NaN/inf) in the activations (normalisation sample)")
    if cfg.normalize:
        mean_norm = sample.norm(dim=-1).mean(0)  # [S]
        zero = mean_norm <= 0
        if bool(zero.any()):
            bad = [site_label(cc.sites[j]) for j in torch.nonzero(zero).flatten().tolist()]
            warnings.warn(f"crosscoder: sites {bad} are all zero; their normalisation factor is left at 1")
        cc.norm_factors.copy_(
            torch.where(zero, torch.ones_like(mean_norm), math.sqrt(cfg.d_model) / mean_norm.clamp_min(1e-30))
        )
    if cfg.init_b_dec_from_data and int(cc.steps) == 0:
        cc.b_dec.copy_(cc.normalize(sample).mean(0))
    cc.norm_set.fill_(True)


def _check_loss(out: Dict[str, Tensor], x: Tensor, step: int, cfg: CrosscoderConfig) -> None:
    loss = out["loss"]
    if torch.isfinite(loss):  # the one host sync of a step
        return
    if not torch.isfinite(x).all():
        raise FloatingPointError(
            f"crosscoder training stopped at step {step}: non-finite "
            f"values (NaN/inf) in that step's activations"
        )
    raise FloatingPointError(
        f"crosscoder training: the loss is {float(loss.detach())} at step {step} (reconstruction "
        f"{float(out['recon'].detach()):.4g}, sparsity {float(out['sparsity'].detach()):.4g}, aux "
        f"{float(out['aux'].detach()):.4g}); lower the learning rate (lr={cfg.lr}) or check the "
        f"activations' scale (normalize={cfg.normalize})"
    )


@torch.no_grad()
def _track(cc: Crosscoder, out: Dict[str, Tensor], n_rows: int) -> None:
    """After a step: the dead-latent tracker, step / token counts and (BatchTopK) theta <- EMA of
    the smallest kept score."""
    fired = (out["f"] > 0).any(0)  # [m]
    cc.tokens_since_fired.add_(n_rows)
    cc.tokens_since_fired[fired] = 0
    cc.steps.add_(1)
    cc.tokens_seen.add_(n_rows)
    if cc.cfg.sparsity == "batchtopk":
        rate, s, thr = cc.cfg.threshold_lr, out["smallest"].float(), cc.threshold
        new = torch.where(thr < 0, s, (1 - rate) * thr + rate * s)
        cc.threshold.copy_(torch.where(torch.isfinite(s), new, thr))


@torch.no_grad()
def _log_record(cc: Crosscoder, out: Dict[str, Tensor], xn: Tensor, step: int, lr: float, l1: float) -> Dict:
    var = (xn - xn.mean(0)).pow(2).sum((-2, -1)).mean()  # xn [B, S, d]
    return {
        "step": step,
        "tokens": int(cc.tokens_seen),
        "lr": lr,
        "l1_coeff": l1,
        **{key: float(out[key]) for key in ("loss", "recon", "sparsity", "aux")},
        "l0": float((out["f"] > 0).sum(-1).float().mean()),
        "dead_frac": float(cc.dead_mask().float().mean()),
        "fvu": float(out["recon"] / var.clamp_min(1e-30)),
    }


def train_crosscoder(
    data,
    config: Union[CrosscoderConfig, Crosscoder, None] = None,
    n_steps: Optional[int] = None,
    *,
    n_tokens: Optional[int] = None,
    device=None,
    progress: bool = True,
    log_every: int = 50,
) -> Crosscoder:
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
    src, cc = _source_and_crosscoder(data, config)
    cfg, B = cc.cfg, int(cc.cfg.batch_size)
    src.check_batch_size(B)
    n_steps = _run_length(n_steps, n_tokens, B)
    if device is not None:
        cc.to(device)
    if not bool(cc.norm_set):
        _set_normalization(cc, src)
    l1_warm = cfg.l1_warmup_steps if cfg.l1_warmup_steps is not None else max(1, int(0.05 * n_steps))
    opt = torch.optim.Adam(cc.parameters(), lr=cfg.lr, betas=cfg.betas)
    cc.train()
    bar = tqdm(total=n_steps, unit="step", desc="crosscoder", disable=not progress)
    start = int(cc.steps)
    for i in range(n_steps):
        step = start + i + 1  # 1-based, counted over the crosscoder's life
        try:
            x = src.next_batch(B).to(cc.device, non_blocking=True)  # [B, S, d]
        except StopIteration:
            warnings.warn(f"crosscoder: the activation source is used up after {i} of {n_steps} steps")
            break
        lr = cfg.lr * _lr_factor(i, n_steps, cfg.lr_decay_frac)
        for group in opt.param_groups:
            group["lr"] = lr
        l1 = cfg.l1_coeff * min(1.0, (i + 1) / l1_warm) if cfg.sparsity == "l1" else 0.0
        xn = cc.normalize(x)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cc.device.type == "cuda"):
            out = cc.training_losses(xn, l1)
        _check_loss(out, x, step, cfg)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(cc.parameters(), cfg.grad_clip)
        opt.step()
        _track(cc, out, x.shape[0])
        if i % log_every == 0 or i == n_steps - 1:
            rec = _log_record(cc, out, xn, step, lr, l1)
            cc.history.append(rec)
            bar.set_postfix(
                {
                    "loss": f"{rec['loss']:.4g}",
                    "L0": f"{rec['l0']:.1f}",
                    "dead": f"{100 * rec['dead_frac']:.1f}%",
                    "fvu": f"{rec['fvu']:.3f}",
                }
            )
        bar.update(1)
    bar.close()
    cc.eval()
    return cc
