"""Probes declare their report section (`Probe.report = ReportSection(...)`): a toy probe defined
here appears in a built report with its title, caption and figure, in its declared place, and
is left out where its declaration says so; bad declarations are refused."""

import json

import numpy as np
import pytest
import torch

from mhc_interp import report
from mhc_interp.data import read_texts
from mhc_interp.probes import PROBES, Probe, ProbeResult, register_probe
from mhc_interp.probes.base import RESULTS, ReportSection, register_result
from mhc_interp.shipped import default_corpus, load
from mhc_interp.token_windows import corpus_tokens

TITLE, CAPTION = "How large the embedded streams are (toy)", "Mean norm of each stream at the embedding."


class ToyResult(ProbeResult):
    def plot(self):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(3, 2))
        ax.bar(range(len(self["norms"])), self["norms"])
        return {"toy_norms": fig}


class ToyProbe(Probe):
    """Mean L2 norm of each stream of hook_streams_init [batch, pos, n_streams, d_model]."""

    name = "toy_section"
    report = ReportSection(TITLE, captions={"toy_norms": CAPTION}, order=15)

    def setup(self, model):
        self.total, self.count = 0.0, 0

    def hook_names(self, model):
        return ["hook_streams_init"]

    def update(self, acts, mask):
        x = acts["hook_streams_init"][mask].double()  # [tokens, n_streams, d_model]
        self.total = self.total + x.norm(dim=-1).sum(0)
        self.count += x.shape[0]

    def result(self):
        return ToyResult(self.name, {"norms": (self.total / self.count).numpy()}, {"tokens": self.count})


@pytest.fixture
def toy_registered():
    register_probe(ToyProbe)
    register_result(ToyResult)
    try:
        yield ToyProbe
    finally:
        PROBES.pop(ToyProbe.name, None)
        RESULTS.pop(ToyResult.__name__, None)


@pytest.fixture(scope="module")
def model():
    return load("tiny-mhc-n4")


def _everything_but(*labels):
    return tuple(label for label, _, _ in report.report_sections() if label not in labels)


def test_a_declared_probe_appears_in_the_built_report(tmp_path, toy_registered, model):
    labels = [label for label, _, _ in report.report_sections()]
    assert (
        labels.index("stream_usage") < labels.index("toy_section") < labels.index("cka")
    )  # order 10 < 15 < 20
    cfg = report.ReportConfig(progress=False, background_figures=False).fast()
    cfg.skip = _everything_but("toy_section", "curvature")
    index = report.build_report(model, tmp_path / "r", cfg=cfg)
    written = json.loads((index.parent / "report.json").read_text())
    assert [s["probe"] for s in written["sections"]] == ["toy_section", "curvature"]
    toy = written["sections"][0]
    assert toy["title"] == TITLE
    assert [(f["name"], f["caption"]) for f in toy["figures"]] == [("toy_norms", CAPTION)]
    assert (index.parent / toy["figures"][0]["src"]).stat().st_size > 1000
    assert TITLE in index.read_text() and CAPTION in index.read_text()
    # the numbers are the probe's own: the mean stream norm at the embedding, written out
    saved = ProbeResult.load(index.parent / "results" / "toy_section")
    tokens = corpus_tokens(model, read_texts(default_corpus()), cfg)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter="hook_streams_init")
    x = cache["hook_streams_init"][:, 1:].double()  # the runner masks position 0
    np.testing.assert_allclose(saved["norms"], x.norm(dim=-1).mean((0, 1)).numpy(), rtol=1e-6)


def test_without_the_declaration_the_probe_is_not_in_the_report(toy_registered, model, monkeypatch):
    cfg = report.ReportConfig(progress=False)
    assert "toy_section" in [p.name for p in report.shared_forward_probes(model, cfg)]
    monkeypatch.setattr(ToyProbe, "report", None)
    assert "toy_section" not in [p.name for p in report.shared_forward_probes(model, cfg)]


def test_declarations_decide_where_a_probe_runs(toy_registered, model, monkeypatch):
    cfg = report.ReportConfig(progress=False)
    monkeypatch.setattr(ToyProbe, "report", ReportSection(TITLE, min_streams=model.cfg.n_streams + 1))
    assert "toy_section" not in [p.name for p in report.shared_forward_probes(model, cfg)]
    monkeypatch.setattr(ToyProbe, "report", ReportSection(TITLE))
    monkeypatch.setattr(ToyProbe, "for_report", classmethod(lambda cls, cfg: None))
    assert "toy_section" not in [p.name for p in report.shared_forward_probes(model, cfg)]


def test_a_probe_that_runs_itself_shows_its_tables_and_findings(tmp_path, toy_registered, model, monkeypatch):
    """`for_report = None`: not in the shared forward; the report calls `report_run` with the corpus
    windows and shows what its results' `tables()` and `findings()` return, plus the extra fields."""
    calls = []

    def report_run(cls, model, tokens, cfg, timer):
        calls.append(tokens.shape)
        norms = np.array([1.0, 3.0])
        return [(TabledResult("toy_section", {"norms": norms}, {}), {"note": "on its own prompts"})]

    class TabledResult(ToyResult):
        def tables(self):
            return [
                {"title": "toy table", "header": ["0", "1"], "rows": [[f"{v:.1f}" for v in self["norms"]]]}
            ]

        def findings(self):
            return [None, {"key": "toy", "text": f"largest norm {self['norms'].max():.1f}", "values": {}}]

    monkeypatch.setattr(ToyProbe, "for_report", None)
    monkeypatch.setattr(ToyProbe, "report_run", classmethod(report_run))
    cfg = report.ReportConfig(progress=False, background_figures=False).fast()
    assert "toy_section" not in [p.name for p in report.shared_forward_probes(model, cfg)]
    cfg.skip = _everything_but("toy_section")
    written = json.loads(
        (report.build_report(model, tmp_path / "r", cfg=cfg).parent / "report.json").read_text()
    )
    assert len(calls) == 1 and calls[0][0] > 1  # the corpus windows [n_seq, seq_len]
    [toy] = written["sections"]
    assert toy["note"] == "on its own prompts" and toy["title"] == TITLE
    assert toy["tables"] == [{"title": "toy table", "header": ["0", "1"], "rows": [["1.0", "3.0"]]}]
    assert written["summary"]["findings"] == [{"key": "toy", "text": "largest norm 3.0", "values": {}}]


def test_bad_declarations_are_refused(toy_registered, monkeypatch):
    with pytest.raises(ValueError, match="title"):
        ReportSection("")
    with pytest.raises(ValueError, match="captions"):
        ReportSection("t", captions={"fig": 3})
    monkeypatch.setattr(ToyProbe, "report", "a title")
    with pytest.raises(TypeError, match="ToyProbe.report must be a ReportSection"):
        report.report_sections()
    monkeypatch.setattr(ToyProbe, "report", ReportSection("t", result="stream_usage"))
    with pytest.raises(ValueError, match="two probes declare the report section 'stream_usage'"):
        report.report_sections()


def test_the_report_samples_heads_and_sweep_sublayers_and_says_so(tmp_path):
    """At depth the report can ablate k evenly spaced heads per layer and sweep k evenly spaced
    sublayers (`heads_per_layer`, `causal_sublayers`): the results cover exactly those, and each
    section says what was sampled; bad values are refused by name."""
    from mhc_interp.report import ReportConfig, build_report
    from mhc_interp.shipped import default_model_path

    model = load(default_model_path())
    cfg = ReportConfig(
        max_tokens=512,
        seq_len=64,
        causal_prompts=2,
        causal_seq_len=16,
        predictability_tokens=128,
        heads_per_layer=2,
        causal_sublayers=3,
        progress=False,
        background_figures=False,
        skip=("cka", "predictability", "curvature", "logit_lens", "stream_usage"),
    )
    assert cfg.sampled_sublayers(model) == [0, 4, 7]
    assert cfg.sampled_heads(model) == [(l, h) for l in range(4) for h in (0, 3)]
    build_report(model, tmp_path / "r", corpus=default_corpus(), cfg=cfg)
    page = (tmp_path / "r" / "index.html").read_text()
    assert "sampled: 8 of 16 heads (2 evenly spaced per layer)" in page
    assert page.count("sampled: 3 of 8 sublayers (evenly spaced: [0, 4, 7])") == 2  # rescue, patching
    for probe in ("ablate_rescue", "activation_patching"):
        meta = json.loads((tmp_path / "r" / "results" / f"{probe}.json").read_text())
        assert meta["meta"]["sublayers"] == [model.sublayer_names[k] for k in (0, 4, 7)]
    ablated = np.load(tmp_path / "r" / "results" / "head_detector.npz")["copy_suppression"]  # [layer, head]
    assert np.isfinite(ablated[:, [0, 3]]).all() and np.isnan(ablated[:, [1, 2]]).all()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="causal_sublayers"):
            ReportConfig(causal_sublayers=bad)


def test_run_probes_hands_over_each_result_before_computing_the_next(mhc_model, tokens):
    """`on_result` (the report queues figures with it) sees each result in probe order, while the
    later probes' results are not computed yet."""
    from mhc_interp.probes import CKA, StreamUsage, run_probes

    probes = [StreamUsage(), CKA()]
    computed = []
    for p in probes:
        p.result = (lambda f, name: lambda: computed.append(name) or f())(p.result, p.name)
    seen = []
    out = run_probes(
        mhc_model,
        probes,
        tokens,
        batch_size=2,
        progress=False,
        on_result=lambda r: seen.append((r.probe, list(computed))),
    )
    assert seen == [("stream_usage", ["stream_usage"]), ("cka", ["stream_usage", "cka"])]
    assert set(out) == {"stream_usage", "cka"}
