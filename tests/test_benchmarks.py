"""The benchmark suite: a tiny CPU smoke run of the entry point (so it does not rot), its FLOP
counts against the model's real parameter counts, and its clear errors on bad input. Timings are
never asserted."""

import dataclasses
import json

import pytest
import torch
from torch import nn

from benchmarks import run as bench_run
from benchmarks.causal_sweeps import sweep_flops
from benchmarks.common import (
    BenchmarkError,
    batch_fit,
    batch_fit_problem,
    forward_flops_per_token,
    make_config,
    readout_flops_per_token,
    resolve_device,
    sublayer_flops_per_token,
)
from mhc_interp import HookedMHC


def test_entry_point_smoke_run(tmp_path):
    summary = bench_run.main(
        ["--shape", "tiny", "--out-dir", str(tmp_path), "--", "--repeats", "1", "--warmup", "0"]
    )
    assert summary["errors"] == {}
    assert set(summary["results"]) == set(bench_run.BENCHMARKS)
    assert (
        json.loads((tmp_path / "summary-tiny-cpu.json").read_text())["results"].keys()
        == summary["results"].keys()
    )
    fwd = summary["results"]["forward_overhead"]
    assert {"stripped", "hooked", "cache streams", "cache all", "nnsight trace", "residual"} <= set(
        fwd["rows"]
    )
    assert fwd["rows"]["stripped"]["ratio"] == 1.0 and fwd["torch_version"] == torch.__version__
    assert fwd["rows"]["cache all"]["cache_mib"] > fwd["rows"]["cache streams"]["cache_mib"] > 0
    sweeps = summary["results"]["causal_sweeps"]["rows"]
    for kind in ("rescue", "patching"):
        assert sweeps[f"{kind} batched"]["seconds"] > 0 and sweeps[f"{kind} batched"]["efficiency"] > 0
    for name, result in summary["results"].items():
        for row, r in result["rows"].items():
            assert not r["oom"] and r["seconds"] > 0, (name, row)


def test_compiled_rows(tmp_path):
    from benchmarks import forward_overhead

    res = forward_overhead.main(
        [
            "--shape",
            "tiny",
            "--compile",
            "--repeats",
            "1",
            "--warmup",
            "1",
            "--out",
            str(tmp_path / "fo.json"),
        ]
    )
    for row in ("compiled mixers", "compiled", "compiled cache streams", "residual compiled"):
        assert res["rows"][row]["seconds"] > 0
    assert res["rows"]["compiled cache streams"]["cache_mib"] == pytest.approx(
        res["rows"]["cache streams"]["cache_mib"]
    )


def test_flop_counts_match_the_model():
    """2 N + 4 L T d, with N the matmul parameters of the real model (incl. the unembedding)."""
    cfg = make_config("small")
    model = HookedMHC(cfg)
    seq = 100
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    n_matmul += cfg.d_model * cfg.d_vocab
    assert forward_flops_per_token(cfg, seq) == 2 * n_matmul + 4 * cfg.n_layers * seq * cfg.d_model
    # a sweep of one intervention per sublayer, each resumed at its sublayer, on a 1-layer model:
    # (attn + mlp + readout) from sublayer 0, (mlp + readout) from sublayer 1, plus one full run
    one = dataclasses.replace(make_config("tiny"), n_layers=1)
    attn, mlp = sublayer_flops_per_token(one, seq)
    readout = readout_flops_per_token(one)
    expected = 7 * ((attn + mlp + readout) + (attn + mlp + readout) + (mlp + readout))
    assert sweep_flops(one, seq, 7, per_sublayer=1, full_runs=1) == pytest.approx(expected)


def test_bad_input():
    if not torch.cuda.is_available():
        with pytest.raises(BenchmarkError, match="'cuda' is not available.*no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(BenchmarkError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(SystemExit):  # argparse: unknown shape name
        bench_run.main(["--shape", "gpt-5"])
    from benchmarks import forward_overhead

    with pytest.raises(BenchmarkError, match="--seq 40 is longer than the tiny context"):
        forward_overhead.main(["--shape", "tiny", "--seq", "40"])


def test_batch_fit_says_what_it_needs_and_what_fits():
    gib = 2**30
    assert batch_fit(2 * gib, 10 * gib, 4) == (True, 4)
    assert batch_fit(2 * gib, 10 * gib, 8) == (False, 4)
    assert batch_fit_problem("forward", 4, 2 * gib, 3 * gib, 10 * gib, 80 * gib) is None
    msg = batch_fit_problem("forward", 16, 6.5 * gib, 3 * gib, 70 * gib, 80 * gib)
    assert "batch 16 needs about 104.0 GiB" in msg and "70.0 of 80.0 GiB are free" in msg
    assert "10% of that is kept in reserve: at most batch 9 fits (use --batch 9)" in msg
    assert "not even one sequence" in batch_fit_problem("forward", 1, 90 * gib, 0, 70 * gib, 80 * gib)
    # a fixed part (e.g. autocast's weight copies) is paid once, not per sequence
    assert batch_fit(2 * gib, 10 * gib, 4, fixed_bytes=1.5 * gib) == (False, 3)
    msg = batch_fit_problem(
        "sweep", 8, 2 * gib, 0, 10 * gib, 80 * gib, fixed=1.5 * gib, flag="--prompt-batch"
    )
    assert "batch 8 needs about 17.5 GiB of GPU memory (2.00 GiB per sequence + 1.50 GiB fixed)" in msg
    assert msg.endswith("(use --prompt-batch 3)")


def test_naive_sweep_extrapolates_the_loop_not_the_cache_run():
    from benchmarks.causal_sweeps import naive_sweep

    calls = []

    def make_cache(clean, corrupted):
        calls.append(("cache", clean))
        return {"n": 1}

    def loop(clean, corrupted, cache, subset):
        calls.append(("loop", clean, tuple(subset)))

    chunks = [("a", "a'"), ("b", "b'")]
    r = naive_sweep(make_cache, loop, chunks, [0, 3], 9.0, torch.device("cpu"), repeats=2, warmup=1)
    assert [c[0] for c in calls] == ["cache", "loop", "loop", "loop"] * 2  # warm-up + 2 timed loops
    assert calls[1] == ("loop", "a", (0, 3)) and len(r["times"]) == 4
    assert r["seconds"] >= 9.0 * sorted(r["times"][:2])[0]


def test_causal_sweeps_arguments():
    from benchmarks import causal_sweeps

    with pytest.raises(SystemExit):
        causal_sweeps.main(["--shape", "tiny", "--batch", "2", "--prompt-batch", "8"])
    with pytest.raises(SystemExit):
        causal_sweeps.main(["--shape", "tiny", "--naive-sublayers", "0"])


def test_code_size_counts_code_not_docs_or_formatting():
    """benchmarks.code_size (issue 15's size measure): docstrings and comments are not code; a call
    the formatter splits over lines is more lines but the same tokens and statements."""
    from benchmarks.code_size import ruff_formatted, size

    src = (
        '"""Module doc."""\n\n\ndef f(a, b):\n    """Doc\n    more."""\n    # a comment\n    return g(a, b)\n'
    )
    counted = size([src])
    assert counted["statements"] == 4 and counted["docstring_lines"] == 3  # two docstrings, def, return
    assert counted["code_lines"] == 2 and counted["code_tokens"] == 8 + 7  # def f(a, b): / return g(a, b)
    wide = "x = g(" + ", ".join(f"argument_{i}" for i in range(20)) + ")\n"
    split = ruff_formatted(wide)
    assert split.count("\n") > 5  # the formatter put one argument a line
    assert size([split])["statements"] == size([wide])["statements"] == 1
    assert size([split])["code_lines"] > size([wide])["code_lines"] == 1
