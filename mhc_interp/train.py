"""Minimal training for small hyper-connected models (tests, examples, the demo model and the
symmetry-breaking experiment): AdamW (decay on matrices only), linear warm-up then cosine decay,
gradient clipping, bf16 autocast on CUDA, periodic validation loss, checkpoints in our format.

    model = HookedMHC(cfg)
    history = train(model, train_ids, val_ids, TrainConfig(max_steps=2000), out_dir="runs/demo")
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .data import random_windows


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_batches: int = 8
    seed: int = 0
    device: str = "cpu"


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at `max_steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.betas,
    )


@torch.no_grad()
def evaluate(model, ids: Tensor, cfg: TrainConfig, generator: torch.Generator) -> float:
    model.eval()
    losses = []
    for _ in range(cfg.eval_batches):
        x = random_windows(ids, cfg.batch_size, cfg.seq_len + 1, generator)[0].to(cfg.device)
        with _autocast(cfg.device):
            losses.append(float(model(x, return_type="loss", tokens=x)))
    model.train()
    return sum(losses) / len(losses)


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))


def train(
    model,
    train_ids: Tensor,
    val_ids: Tensor,
    cfg: TrainConfig,
    out_dir: Optional[str] = None,
    progress: bool = True,
) -> Dict[str, List]:
    """Train `model` in place on random windows of `train_ids`; returns the history
    {"step", "train_loss", "val_step", "val_loss", "lr"} (also written to out_dir/train_log.json
    with the config, and the final model saved there with `save_pretrained`)."""
    if cfg.seq_len + 1 > model.cfg.n_ctx:
        raise ValueError(
            f"seq_len {cfg.seq_len} (+1 for targets) exceeds the model's n_ctx {model.cfg.n_ctx}"
        )
    for split, ids in (
        ("training", train_ids),
        ("validation", val_ids),
    ):  # before any step, not at the first eval
        if len(ids) < cfg.seq_len + 3:
            raise ValueError(
                f"the {split} split has {len(ids)} tokens, too few for windows of {cfg.seq_len + 1}: "
                f"use more text, a shorter seq_len or a larger validation fraction"
            )
    torch.manual_seed(cfg.seed)
    gen_train = torch.Generator().manual_seed(cfg.seed)
    gen_val = torch.Generator().manual_seed(cfg.seed + 1)
    model.to(cfg.device).train()
    opt = make_optimizer(model, cfg)
    history: Dict[str, List] = {key: [] for key in ("step", "train_loss", "val_step", "val_loss", "lr")}
    bar = tqdm(range(cfg.max_steps), desc="train", disable=not progress)
    t0 = time.time()
    for step in bar:
        lr = learning_rate(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        x, _ = random_windows(train_ids, cfg.batch_size, cfg.seq_len + 1, gen_train)
        x = x.to(cfg.device)
        with _autocast(cfg.device):
            loss = model(x, return_type="loss", tokens=x)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        history["step"].append(step)
        history["train_loss"].append(loss.item())
        history["lr"].append(lr)
        if (step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.max_steps:
            history["val_step"].append(step + 1)
            history["val_loss"].append(evaluate(model, val_ids, cfg, gen_val))
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{history['val_loss'][-1]:.3f}")
    model.eval()
    history["seconds"] = [time.time() - t0]
    if out_dir is not None:
        out = Path(out_dir)
        model.save_pretrained(out)
        (out / "train_log.json").write_text(
            json.dumps(
                {"train_config": asdict(cfg), "model_config": model.cfg.to_dict(), "history": history},
                indent=1,
            )
        )
    return history
