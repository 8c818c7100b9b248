"""The paper-figure scripts in examples/ run (--fast, on the shipped tiny model), write non-trivial
PNGs and results, and what they compute has the properties it should."""

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mhc_interp.probes import ProbeResult
from mhc_interp.shipped import asset

EXAMPLES = Path(__file__).parent.parent / "examples"
TINY = str(asset("tiny-mhc-n4"))  # mhc, 3 layers (6 sublayers), 4 streams, no tokenizer
N_SUB, N = 6, 4
SCRIPTS = [
    "h_res_matrices",
    "read_write_share",
    "stream_norms",
    "curvature",
    "cka_intra",
    "cka_inter",
    "patching_heatmap",
    "rescue_table",
    "rescue_difference",
    "h_post_stats",
]


def run(name, tmp_path, *extra):
    """Run examples/NAME.py's main in-process; check its PNGs; returns (Output, out folder)."""
    out = tmp_path / name
    output = runpy.run_path(str(EXAMPLES / f"{name}.py"))["main"](
        ["--fast", "--quiet", "--out", str(out), "--model", TINY, *extra]
    )
    pngs = sorted(out.glob("*.png"))
    assert pngs, f"{name} wrote no PNG"
    for png in pngs:
        assert png.stat().st_size > 2048, f"{png} is suspiciously small"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(output.figures) == {str(p) for p in pngs}
    assert all(output.figures.values()), "every figure needs a caption"
    assert output.summary.startswith(f"{name}: ")
    for key, result in output.results.items():  # saved results load back identically
        loaded = ProbeResult.load(out / key)
        assert type(loaded) is type(result)
        for k, v in result.arrays.items():
            np.testing.assert_array_equal(loaded[k], v)
    return output, out


def test_every_script_has_a_docstring_naming_its_paper():
    for name in SCRIPTS:
        text = (EXAMPLES / f"{name}.py").read_text()
        doc = text.split('"""')[1]
        assert "Ablate and Rescue" in doc or "Stream Collapse" in doc, name
        assert f"python examples/{name}.py" in doc, name


def test_h_res_matrices(tmp_path):
    output, out = run("h_res_matrices", tmp_path)
    usage = output.results["stream_usage"]
    assert output.extra["picks"] == [0, N_SUB - 1]
    h = usage["mean_h_res"]  # mHC, 20 Sinkhorn iterations ending on the target axis:
    assert h.shape == (N_SUB, N, N)  # every source's column sums to 1, every row nearly
    np.testing.assert_allclose(h.sum(-2), 1, atol=1e-5)
    np.testing.assert_allclose(h.sum(-1), 1, atol=2e-2)
    output, _ = run("h_res_matrices", tmp_path, "--early", "1", "--deep", "blocks.1.mlp")
    assert output.extra["picks"] == [1, 3]
    with pytest.raises(SystemExit):
        run("h_res_matrices", tmp_path, "--deep", "blocks.9.mlp")


def test_read_write_share(tmp_path):
    output, _ = run("read_write_share", tmp_path, "--max-tokens", "256")
    usage = output.results["stream_usage"]
    assert usage.meta["tokens"] == 4 * 63  # 4 windows of 64, position 0 masked
    for key in ("read_share", "read_share_norm", "write_share"):
        assert usage[key].shape == (N_SUB, N)
        np.testing.assert_allclose(usage[key].sum(-1), 1, atol=1e-9)
    top = np.bincount(usage["read_share_norm"].argmax(-1), minlength=N)  # sublayers each stream leads
    dominant = output.extra["dominant_stream"]
    assert top[dominant] == top.max() and dominant == top.argmax()  # the stream the saved result names
    assert (
        f"stream {dominant} has the largest norm-weighted read share at {top.max()}/{N_SUB}" in output.summary
    )


def test_stream_norms(tmp_path):
    output, _ = run("stream_norms", tmp_path)
    norms = output.results["stream_usage"]["stream_norm"]
    assert norms.shape == (N_SUB + 1, N) and (norms > 0).all()
    assert output.extra["norm_imbalance"] == pytest.approx(norms[-1].max() / norms[-1].mean())


def test_curvature(tmp_path):
    output, _ = run("curvature", tmp_path)
    result = output.results["curvature"]
    mean = result["mean"]
    assert mean.shape == (3 + 1, N + 1)  # embedding + 3 blocks; streams + sum
    assert ((0 <= mean) & (mean <= 180)).all()
    assert abs(mean[0, -1] - 120) < 5  # random token ids: ~i.i.d. points
    np.testing.assert_array_equal(result["change_from_first"][0], 0)


def test_cka_intra(tmp_path):
    output, _ = run("cka_intra", tmp_path)
    result = output.results["cka"]
    for key in ("cka_debiased", "cka_biased"):
        M = result[key]
        assert M.shape == ((3 + 1) * N, (3 + 1) * N)  # the embedding and 3 block outputs
        np.testing.assert_allclose(np.diag(M), 1, atol=1e-9)
        np.testing.assert_allclose(M, M.T, atol=1e-12)
        assert (M <= 1 + 1e-9).all()


def test_cka_inter(tmp_path):
    output, _ = run("cka_inter", tmp_path)
    M = output.results["cka"]["cka"]
    assert M.shape == ((3 + 1) * N, (3 + 1) * N)  # the embedding and 3 block outputs
    np.testing.assert_allclose(np.diag(M), 1, atol=1e-9)
    output, _ = run("cka_inter", tmp_path, "--sites", "sublayers")
    assert output.results["cka"]["cka"].shape == ((N_SUB + 1) * N, (N_SUB + 1) * N)


def test_patching_heatmap(tmp_path):
    output, _ = run("patching_heatmap", tmp_path, "--mixing", "both")
    result = output.results["activation_patching"]
    assert len(output.figures) == 3  # recomputed, frozen, routing
    for mixing in ("recomputed", "frozen"):
        kl = result[f"kl_{mixing}"]
        assert kl.shape == (N_SUB, N) and (kl > -1e-6).all()
        assert (result[f"kl_{mixing}_ci_low"] <= kl + 1e-12).all()
        assert (kl <= result[f"kl_{mixing}_ci_high"] + 1e-12).all()
    np.testing.assert_allclose(result["kl_routing"], result["kl_recomputed"] - result["kl_frozen"])
    assert abs(float(result["baseline_clean"])) < 1e-6 < float(result["baseline_corrupted"])
    assert result.meta["prompts"] == 4


def test_rescue_table(tmp_path, capsys):
    output, out = run("rescue_table", tmp_path)
    result = output.results["ablate_rescue"]
    table = (out / "rescue_table.md").read_text()
    assert str(out / "rescue_table.md") in output.files
    rows = [line for line in table.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 2 * N  # mean and damage-weighted tables
    assert result.table() in table and result.table() in capsys.readouterr().out
    g = result["global_rescue"]
    assert np.isnan(np.diag(g)).all()
    off = g[~np.eye(N, dtype=bool)]
    assert np.isfinite(off).all() and (off <= 1 + 1e-6).all()
    assert result.meta["mode"] == "one_shot" and result.meta["prompts"] == 4


def test_rescue_difference(tmp_path):
    output, _ = run("rescue_difference", tmp_path)
    result = output.results["ablate_rescue"]
    scores = {}
    for i in range(N):
        for j in range(i + 1, N):
            scores[(i, j)] = np.nanmean(np.abs(result.pair_difference(i, j)))
    sym, asym = output.extra["symmetric"], output.extra["asymmetric"]
    assert scores[sym] == pytest.approx(min(scores.values()))
    assert scores[asym] == pytest.approx(max(scores.values()))
    assert sym != asym
    caption = next(iter(output.figures.values()))
    assert f"({sym[0]},{sym[1]})" in caption and f"({asym[0]},{asym[1]})" in caption


def test_h_post_stats(tmp_path):
    output, _ = run("h_post_stats", tmp_path)
    usage = output.results["stream_usage"]
    fro = usage["h_post_fro"]
    assert fro.shape == (N_SUB,)
    assert ((0 < fro) & (fro <= 2 * np.sqrt(N))).all()  # mHC: H_post = 2 sigma(.) in (0, 2)
    assert (usage["h_post_var_tokens"] >= 0).all() and (usage["h_post_var_streams"] >= 0).all()


def test_make_gallery(tmp_path):
    main = runpy.run_path(str(EXAMPLES / "make_gallery.py"))["main"]
    gallery = tmp_path / "gallery"
    assert (
        main(
            [
                "--fast",
                "--quiet",
                "--out",
                str(gallery),
                "--model",
                TINY,
                "--only",
                "h_res_matrices",
                "rescue_table",
            ]
        )
        == 0
    )
    readme = (gallery / "README.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert links == ["h_res_matrices/h_res_matrices.png", "rescue_table/rescue_table.png"]
    assert all((gallery / link).stat().st_size > 2048 for link in links)
    assert "| ablated \\ recovered |" in readme  # the rescue table is inlined
    # a failing script is reported, and the others still run
    assert (
        main(
            [
                "--fast",
                "--quiet",
                "--out",
                str(gallery),
                "--model",
                str(tmp_path / "missing.pt"),
                "--only",
                "stream_norms",
            ]
        )
        == 1
    )
    assert "**failed**" in (gallery / "README.md").read_text()


def test_script_runs_as_a_file(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "stream_norms.py"),
            "--fast",
            "--quiet",
            "--model",
            TINY,
            "--out",
            str(tmp_path / "norms"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("stream_norms: ") and len(proc.stdout.strip().splitlines()) == 1
    assert (tmp_path / "norms" / "stream_norms.png").stat().st_size > 2048
