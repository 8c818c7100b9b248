"""Minimal training: schedule, learning, errors; the training experiments run in fast mode."""

import math
import runpy
from pathlib import Path

import pytest
import torch

from mhc_interp import HookedMHC
from mhc_interp.train import TrainConfig, learning_rate, train

from .conftest import tiny_config

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_schedule():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(55, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(100, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize("kind,n", [("mhc", 4), ("mhc_lite_lss", 4), ("hc", 2), ("none", 1)])
def test_training_learns_a_repetitive_sequence(kind, n, tmp_path):
    torch.manual_seed(0)
    model = HookedMHC(tiny_config(kind, n, n_ctx=17))
    ids = torch.arange(40).repeat(60)  # a cycle: perfectly predictable
    cfg = TrainConfig(max_steps=60, batch_size=8, seq_len=16, lr=1e-2, warmup_steps=5, eval_interval=30)
    history = train(model, ids, ids, cfg, out_dir=tmp_path / "run", progress=False)
    assert history["val_loss"][-1] < 0.5 * math.log(40)  # far below the uniform guess
    again = HookedMHC.from_pretrained(tmp_path / "run")
    x = ids[:16][None]
    assert torch.equal(again(x), model(x))


def test_training_errors():
    model = HookedMHC(tiny_config("mhc", n_ctx=9))
    with pytest.raises(ValueError, match="exceeds the model's n_ctx"):
        train(model, torch.arange(100) % 40, torch.arange(100) % 40, TrainConfig(seq_len=16), progress=False)
    with torch.no_grad():
        model.blocks[0].attn.c_attn.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="at step 0"):
        train(
            model,
            torch.arange(100) % 40,
            torch.arange(100) % 40,
            TrainConfig(seq_len=8, max_steps=3),
            progress=False,
        )


@pytest.mark.parametrize(
    "script,figures",
    [
        ("symmetry_breaking.py", ["val_loss.png", "diagnostics.png"]),
        ("stream_count_sweep.py", ["stream_count_sweep.png"]),
    ],
)
def test_training_experiments_fast(script, figures, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    main = runpy.run_path(str(EXAMPLES / script))["main"]
    results = main(
        [
            "--fast",
            "--out",
            str(tmp_path),
            "--texts",
            str(EXAMPLES.parent / "mhc_interp" / "assets" / "corpus"),
        ]
    )
    for f in figures:
        assert (tmp_path / f).stat().st_size > 2000
    assert (tmp_path / "results.json").is_file() and results
