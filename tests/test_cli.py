"""The command line: report, probe, train, check, hooks - and its errors."""

import json
import os
import time

import pytest
import torch

from mhc_interp import HookedMHC, output_folder, report
from mhc_interp.cli import main
from mhc_interp.shipped import asset
from mhc_interp.token_windows import TokenBudget, corpus_tokens


def test_report_writes_a_complete_folder(tmp_path):
    out = tmp_path / "rep"
    assert main(["report", "--model", "tiny-mhc-n4", "--fast", "--quiet", "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    figures = sorted(str(p.relative_to(out)) for p in (out / "figures").glob("*/*.png"))
    assert {
        "figures/stream_usage/h_res.png",
        "figures/cka/cka_intra.png",
        "figures/curvature/curvature.png",
        "figures/ablate_rescue/rescue_global.png",
        "figures/activation_patching/patching_recomputed.png",
        "figures/logit_lens/kl.png",
        "figures/predictability/matrices.png",
    } <= set(figures)
    for name in figures:
        assert name in page
    assert "<table>" in page and "layer-select" in page
    results = {p.stem for p in (out / "results").glob("*.json")}
    assert results == {
        "stream_usage",
        "cka",
        "curvature",
        "ablate_rescue",
        "activation_patching",
        "logit_lens",
        "head_detector",
        "predictability",
        "attribution_positions",
        "stream_edges",
    }
    written = json.loads((out / "report.json").read_text())
    assert written["sections"]
    timings = {t["phase"]: t["seconds"] for t in written["timings"]}
    worker = {t["phase"]: t["seconds"] for t in written["worker_timings"]}
    for probe in results:  # every probe's work and figures are timed, and the phases add up to the whole
        drawn = [
            s
            for p, s in worker.items()
            if p in (f"{probe}: figures", f"{probe}: figures (drawn in the main process)")
        ]
        assert any(p.startswith(f"{probe}: ") for p in timings) and len(drawn) == 1 and drawn[0] > 0, probe
    assert "forward (shared by the observational probes)" in timings and min(timings.values()) >= 0
    assert abs(sum(t["share"] for t in written["timings"]) - 1) < 0.01
    assert "Where the time went" in page


def test_interrupted_report_leaves_nothing_to_trust(tmp_path, monkeypatch, capsys):
    """Ctrl-C mid-report (here: while the probes run, after they wrote into the partial folder):
    one line on stderr, exit 130, the earlier complete report untouched and no partial folder
    left behind."""
    out = tmp_path / "rep"
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "index.html").write_text("old report")
    output_folder.commit(staged, out)

    def interrupted(model, tokens, folder, cfg, timer, figures):
        (folder / "figures").mkdir()
        (folder / "figures" / "half.png").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "_run_all", interrupted)
    assert main(["report", "--model", "tiny-mhc-n4", "--fast", "--quiet", "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip() == "mhc-interp: interrupted"
    assert (out / "index.html").read_text() == "old report"  # the previous complete report stays
    assert [p.name for p in tmp_path.iterdir()] == ["rep"]  # no partial folder left behind


def test_report_never_replaces_a_folder_of_other_files(tmp_path, monkeypatch):
    """--out on a folder that holds other files (or the working directory) is refused before any
    work, and the files stay; an empty folder or an earlier report is fine."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "important.txt").write_text("data")
    for out in (str(mine), "."):
        monkeypatch.chdir(mine)
        with pytest.raises(SystemExit, match="holds files this program did not write.*important.txt"):
            main(["report", "--model", "tiny-mhc-n4", "--fast", "--quiet", "--out", out])
    assert (mine / "important.txt").read_text() == "data"


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="'cuda' is not available"):
            main(["hooks", "--device", "cuda"])
    short = tmp_path / "short.txt"
    short.write_text("To be.")
    with pytest.raises(SystemExit, match="the corpus has .* tokens: too short"):
        main(["report", "--fast", "--quiet", "--corpus", str(short), "--out", str(tmp_path / "r")])
    longer = tmp_path / "longer.txt"
    longer.write_text("To be, or not to be, that is the question. " * 20)
    with pytest.raises(SystemExit, match="the validation split has .* tokens"):  # before step 0
        main(
            [
                "train",
                "--texts",
                str(longer),
                "--out",
                str(tmp_path / "t"),
                "--steps",
                "2",
                "--seq-len",
                "16",
                "--vocab",
                "260",
                "--n-layers",
                "1",
                "--d-model",
                "16",
                "--n-heads",
                "2",
                "--val-fraction",
                "0.01",
            ]
        )
    assert not (tmp_path / "t").exists()


def test_fast_keeps_an_explicit_max_tokens():
    import argparse

    from mhc_interp.cli import _report_config

    assert _report_config(argparse.Namespace(quiet=True, fast=True, max_tokens=4096)).max_tokens == 4096
    assert _report_config(argparse.Namespace(quiet=True, fast=True, max_tokens=None)).max_tokens == 1024
    assert _report_config(argparse.Namespace(quiet=True, fast=False, max_tokens=None)).max_tokens == 16384


def test_report_samples_for_big_models_from_the_command_line(capsys):
    """--heads-per-layer / --causal-sublayers reach the report's config; 0 is refused by the parser."""
    import pytest

    from mhc_interp.cli import _report_config, build_parser

    args = build_parser().parse_args(["report", "--heads-per-layer", "2", "--causal-sublayers", "8"])
    cfg = _report_config(args)
    assert (cfg.heads_per_layer, cfg.causal_sublayers) == (2, 8)
    assert _report_config(build_parser().parse_args(["report"])).causal_sublayers is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["report", "--causal-sublayers", "0"])
    assert _report_config(build_parser().parse_args(["report"])).lens_token_fraction == 0.25
    lens = _report_config(build_parser().parse_args(["report", "--lens-token-fraction", "1"]))
    assert lens.lens_token_fraction == 1.0
    for bad in ("0", "1.5", "half", "nan"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["report", "--lens-token-fraction", bad])
        assert "expected a number in (0, 1]" in capsys.readouterr().err


def test_probe_command(tmp_path, capsys):
    assert main(["probe", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "stream_usage" in listed and "ablate_rescue" in listed
    with pytest.raises(SystemExit, match="unknown probe 'nope'.*stream_usage"):
        main(["probe", "nope", "--model", "tiny-mhc-n4"])
    assert (
        main(["probe", "curvature", "--model", "tiny-mhc-n4", "--fast", "--quiet", "--out", str(tmp_path)])
        == 0
    )
    assert (tmp_path / "curvature.json").is_file() and (tmp_path / "figures" / "curvature.png").is_file()
    assert (
        main(["probe", "logit_lens", "--model", "tiny-mhc-n4", "--fast", "--quiet", "--out", str(tmp_path)])
        == 0
    )
    assert (
        main(
            [
                "probe",
                "attribution_patching",
                "--model",
                "tiny-mhc-n4",
                "--fast",
                "--quiet",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert (tmp_path / "attribution_patching.json").is_file()
    with pytest.raises(SystemExit, match="sae_features needs --sae FOLDER"):
        main(["probe", "sae_features", "--model", "tiny-mhc-n4", "--fast", "--quiet", "--out", str(tmp_path)])


def test_missing_model_path(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["report", "--model", "./no/such/model.pt", "--fast"])
    with pytest.raises(SystemExit, match="no checkpoint found"):  # an existing folder without one
        main(["check", "--model", str(tmp_path)])
    with pytest.raises(SystemExit, match="corpus path .* does not exist"):
        main(["report", "--model", "tiny-mhc-n4", "--fast", "--corpus", str(tmp_path / "none.txt")])


def test_corpus_too_short(tmp_path):
    model = HookedMHC.from_pretrained(asset("tiny-mhc-n4"))

    class Tok:
        def encode(self, text):
            return [1] * len(text.split())

    model.tokenizer = Tok()
    with pytest.raises(ValueError, match="too short"):
        corpus_tokens(model, ["just a few words"], TokenBudget())


def test_report_says_why_successor_heads_are_not_scored_or_scores_them():
    """The report's head section: successor heads are scored on the built-in ordinal lists that are
    single tokens in full; otherwise the result (and so its empty panel) says why not."""
    import numpy as np

    from mhc_interp.probes.heads import DEFAULT_ORDINAL_WORDS, HeadScores, add_whole_list_successor

    model = HookedMHC.from_pretrained(asset("tiny-mhc-n4"))
    L, H = model.cfg.n_layers, model.cfg.n_heads

    def heads():
        return HeadScores(
            "head_detector",
            {"successor": np.full((L, H), np.nan)},
            {"skipped": {"successor": "successor scores need ordinal sequences"}},
        )

    no_tokenizer = heads()
    add_whole_list_successor(model, no_tokenizer)
    assert "no tokenizer" in no_tokenizer.meta["skipped"]["successor"]

    numbers = DEFAULT_ORDINAL_WORDS["number_words"]

    class Numbers:  # " one" .. " three" single tokens, the rest split: no whole list
        def encode(self, text):
            return [10 + numbers.index(text)] if text in numbers[:3] else [1, 2]

    model.tokenizer = Numbers()
    split = heads()
    add_whole_list_successor(model, split)
    reason = split.meta["skipped"]["successor"]
    assert "no ordinal word list" in reason and "one two three" in reason
    assert np.isnan(split["successor"]).all()

    class Whole(Numbers):  # every number word one token
        def encode(self, text):
            return [10 + numbers.index(text)] if text in numbers else [1, 2]

    model.tokenizer = Whole()
    scored = heads()
    add_whole_list_successor(model, scored)
    assert "successor" not in scored.meta["skipped"] and scored.meta["sources"]["successor"] == "ordinal"
    assert scored["successor"].shape == (L, H) and np.isfinite(scored["successor"]).all()
    assert scored.meta["counts"]["successor"] == len(numbers) - 1


def test_findings_say_only_what_the_results_support():
    """Findings are computed from the result; where it cannot say (NaN, one stream, no effect to
    repair) there is no finding or one that says so - never a made-up ranking."""
    import numpy as np

    from mhc_interp.probes.patching import PatchingResult
    from mhc_interp.probes.rescue import RescueResult
    from mhc_interp.probes.stream_usage import StreamUsageResult

    subs = ["blocks.0.attn", "blocks.0.mlp"]
    usage = StreamUsageResult(
        "stream_usage",
        {
            "read_share_norm": np.array([[0.7, 0.1, 0.1, 0.1], [0.5, 0.2, 0.2, 0.1]]),
            "h_res_dist": np.array([0.1, 1.2]),
        },
        {"sublayers": subs},
    )
    found = {f["key"]: f for f in report.findings(usage)}
    assert found["dominant_stream"]["values"]["stream"] == 0
    assert found["dominant_stream"]["values"]["share"] == pytest.approx(0.6)
    assert (
        "mix the streams partly" in found["mixers"]["text"]
        and "most at blocks.0.mlp (1.20)" in found["mixers"]["text"]
    )
    assert found["mixers"]["values"]["mean_distance"] == pytest.approx(0.65)
    one = StreamUsageResult(
        "stream_usage", {"read_share_norm": np.ones((2, 1)), "h_res_dist": np.zeros(2)}, {"sublayers": subs}
    )
    assert report.findings(one) == []

    nan = np.full((2, 4, 4), np.nan)
    assert report.findings(RescueResult("ablate_rescue", {"global_rescue": nan[0]}, {})) == []

    def patching(corrupted):
        m = np.full((2, 4), 0.5 * corrupted)
        return PatchingResult(
            "activation_patching",
            {
                "kl_recomputed": m,
                "kl_recomputed_sem": m / 10,
                "baseline_clean": np.float64(0),
                "baseline_corrupted": np.float64(corrupted),
            },
            {"metric": "kl", "mixing": ["recomputed"], "prompts": 3},
        )

    quiet = report.findings(patching(1e-5))
    assert len(quiet) == 1 and "nothing to repair" in quiet[0]["text"]
    loud = report.findings(patching(0.1))
    assert loud[0]["values"]["repaired"] == pytest.approx(0.5)
    assert json.loads(json.dumps(loud)) == loud  # plain data


def test_train_and_check(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. the dog ran to the cat. " * 200)
    out = tmp_path / "model"
    assert (
        main(
            [
                "train",
                "--texts",
                str(text),
                "--out",
                str(out),
                "--steps",
                "3",
                "--n-layers",
                "1",
                "--d-model",
                "32",
                "--n-heads",
                "2",
                "--seq-len",
                "16",
                "--batch-size",
                "4",
                "--vocab",
                "300",
            ]
        )
        == 0
    )
    model = HookedMHC.from_pretrained(out)
    assert model.tokenizer is not None and model.to_tokens("the cat").shape[0] == 1
    assert json.loads((out / "train_log.json").read_text())["history"]["val_loss"]
    assert main(["check", "--model", "tiny-mhc-n4"]) == 0
    assert main(["hooks", "--model", "tiny-mhc-n4", "--markdown"]) == 0


def test_model_names_paths_and_tokenizers(tmp_path, monkeypatch):
    """A local folder wins over a shipped model's name; ~ is expanded; a tokenizer larger than the
    model's vocabulary is refused (its ids would index past the embedding)."""
    from mhc_interp.config import MHCConfig
    from mhc_interp.loading import CheckpointError, load_tokenizer
    from mhc_interp.shipped import resolve_model_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo-mhc").mkdir()
    assert resolve_model_path("demo-mhc") == tmp_path.joinpath("demo-mhc").relative_to(tmp_path)
    assert resolve_model_path("tiny-mhc-n4") == asset("tiny-mhc-n4")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_model_path("~/demo-mhc") == tmp_path / "demo-mhc"
    with pytest.raises(CheckpointError, match="tokens but the model's vocabulary only 10"):
        load_tokenizer(asset("demo-mhc"), MHCConfig(n_layers=1, n_heads=1, d_model=8, d_vocab=10))


def _slow_job(seconds):
    time.sleep(seconds)
    return os.getpid()


def _square_job(i):
    return i * i, os.getpid()


def test_figure_pool_draws_the_unstarted_jobs_here_while_waiting():
    """Every job runs exactly once and returns its own value; those still queued behind a slow
    job when `wait()` is called run in this process (at most 2 reach the worker's call queue)."""
    from mhc_interp.figure_pool import FigurePool

    pool = FigurePool(enabled=True)
    try:
        slow = pool.submit("slow", _slow_job, 2.0)
        squares = [pool.submit(f"square {i}", _square_job, i) for i in range(6)]
        pool.wait()
        assert pool.value(slow) != os.getpid()  # the worker drew the first
        values = [pool.value(f) for f in squares]
        assert [v for v, _ in values] == [i * i for i in range(6)]
        here = [i for i, (_, pid) in enumerate(values) if pid == os.getpid()]
        assert len(here) >= 4 and here == list(range(6 - len(here), 6))  # the latest queued
        assert {p for p in pool.seconds if p.endswith("(drawn in the main process)")} == {
            f"square {i} (drawn in the main process)" for i in here
        }
    finally:
        pool.close()
    with pytest.raises(ProcessLookupError):  # closed: the worker has exited (fast, by its atexit os._exit)
        os.kill(pool.value(slow), 0)


def test_console_entry_flushes_before_its_fast_exit():
    """`run` (the console script) leaves by os._exit after main(): piped output must be complete."""
    import subprocess
    import sys

    listed = subprocess.run(
        [sys.executable, "-m", "mhc_interp.cli", "probe", "--list"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    assert main(["probe", "--list"]) == 0  # the same list in-process
    for name in ("logit_lens", "ablate_rescue", "cka"):
        assert name in listed.stdout
    assert listed.stdout.endswith("\n")
