"""The command line: report, probe, train, check, hooks - and its errors."""
import json

import pytest

from mhc_interp import HookedMHC, report
from mhc_interp.cli import asset, main


def test_report_writes_a_complete_folder(tmp_path):
    out = tmp_path / "rep"
    assert main(["report", "--model", "tiny-mhc-n4", "--fast", "--quiet", "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    figures = sorted(str(p.relative_to(out)) for p in (out / "figures").glob("*/*.png"))
    assert {"figures/stream_usage/h_res.png", "figures/cka/cka_intra.png", "figures/curvature/curvature.png",
            "figures/ablate_rescue/rescue_global.png", "figures/activation_patching/patching_recomputed.png",
            "figures/logit_lens/kl.png", "figures/predictability/matrices.png"} <= set(figures)
    for name in figures:
        assert name in page
    assert "<table>" in page and "layer-select" in page
    results = {p.stem for p in (out / "results").glob("*.json")}
    assert results == {"stream_usage", "cka", "curvature", "ablate_rescue", "activation_patching",
                       "logit_lens", "head_detector", "predictability"}
    assert json.loads((out / "report.json").read_text())["sections"]


def test_interrupted_report_leaves_nothing_to_trust(tmp_path, monkeypatch):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "index.html").write_text("old report")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "render_html", boom)
    with pytest.raises(KeyboardInterrupt):
        main(["report", "--model", "tiny-mhc-n4", "--fast", "--quiet", "--out", str(out)])
    assert (out / "index.html").read_text() == "old report"   # the previous complete report stays
    assert [p.name for p in tmp_path.iterdir()] == ["rep"]     # no partial folder left behind


def test_probe_command(tmp_path, capsys):
    assert main(["probe", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "stream_usage" in listed and "ablate_rescue" in listed
    with pytest.raises(SystemExit, match="unknown probe 'nope'.*stream_usage"):
        main(["probe", "nope", "--model", "tiny-mhc-n4"])
    assert main(["probe", "curvature", "--model", "tiny-mhc-n4", "--fast", "--quiet", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "curvature.json").is_file() and (tmp_path / "figures" / "curvature.png").is_file()
    assert main(["probe", "logit_lens", "--model", "tiny-mhc-n4", "--fast", "--quiet", "--out", str(tmp_path)]) == 0


def test_missing_model_path(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["report", "--model", "./no/such/model.pt", "--fast"])
    with pytest.raises(SystemExit, match="no checkpoint found"):   # an existing folder without one
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
        report.corpus_tokens(model, ["just a few words"], report.ReportConfig())


def test_train_and_check(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. the dog ran to the cat. " * 200)
    out = tmp_path / "model"
    assert main(["train", "--texts", str(text), "--out", str(out), "--steps", "3", "--n-layers", "1",
                 "--d-model", "32", "--n-heads", "2", "--seq-len", "16", "--batch-size", "4", "--vocab", "300"]) == 0
    model = HookedMHC.from_pretrained(out)
    assert model.tokenizer is not None and model.to_tokens("the cat").shape[0] == 1
    assert json.loads((out / "train_log.json").read_text())["history"]["val_loss"]
    assert main(["check", "--model", "tiny-mhc-n4"]) == 0
    assert main(["hooks", "--model", "tiny-mhc-n4", "--markdown"]) == 0
