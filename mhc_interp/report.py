"""`mhc-interp report`: run every probe that declares a report section (`Probe.report`) on a
model over a corpus and write a report folder: figures (PNG), results (JSON + NPZ), and an
offline `index.html` that shows them with one-line explanations.

The folder is built under a temporary name and renamed into place only when complete, so an
interrupted run never leaves a half-written report that a re-run (or a reader) would trust.
"""

from __future__ import annotations

import html
import json
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Type

from torch import Tensor

from . import output_folder
from .data import read_texts
from .figure_pool import FigurePool
from .probes import PROBES, Probe, ProbeResult, run_probes
from .probes.base import ReportSection
from .probes.sites import evenly_spaced
from .timing import PhaseTimer
from .token_windows import TokenBudget, corpus_tokens

# The summary's findings (`ProbeResult.findings()`), in this order, at most MAX_FINDINGS of them.
FINDING_ORDER = ("dominant_stream", "mixers", "cka_last", "needed_rescue", "needed_patching", "logit_lens")
MAX_FINDINGS = 5


@dataclass
class ReportConfig(TokenBudget):
    """The token budgets (`TokenBudget`), plus: probes or results to leave out (`skip`), an SAE
    folder in SAELens's format (adds the SAEFeatures section), figures drawn in a worker process."""

    skip: Sequence[str] = ()
    sae: Optional[str] = None
    background_figures: bool = True
    heads_per_layer: Optional[int] = None  # head detector: k evenly spaced heads per layer (None: all)
    causal_sublayers: Optional[int] = None  # rescue / patching sweeps: k evenly spaced sublayers (None: all)

    def __post_init__(self):
        for name in ("heads_per_layer", "causal_sublayers"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None (all), got {value!r}")

    def sampled_sublayers(self, model) -> Optional[List[int]]:
        """The sublayers the causal sweeps cover: k evenly spaced ones, or None (all)."""
        k = self.causal_sublayers
        return None if k is None or k >= model.cfg.n_sublayers else evenly_spaced(model.cfg.n_sublayers, k)

    def sample_note(self, model, what: str) -> Dict[str, str]:
        """A section's note when its sweep covers a sample (`what`: "heads" or "sublayers"), else {}."""
        if what == "heads":
            picked, total = self.sampled_heads(model), model.cfg.n_layers * model.cfg.n_heads
            note = f"{len(picked or [])} of {total} heads ({self.heads_per_layer} evenly spaced per layer)"
        else:
            picked, total = self.sampled_sublayers(model), model.cfg.n_sublayers
            note = f"{len(picked or [])} of {total} sublayers (evenly spaced: {picked})"
        return {} if picked is None else {"note": f"sampled: {note}; the others are not run"}

    def sampled_heads(self, model) -> Optional[List[Tuple[int, int]]]:
        """The (layer, head) pairs the head detector ablates: k evenly spaced per layer, or None (all)."""
        k = self.heads_per_layer
        if k is None or k >= model.cfg.n_heads:
            return None
        return [(l, h) for l in range(model.cfg.n_layers) for h in evenly_spaced(model.cfg.n_heads, k)]


def report_sections() -> List[Tuple[str, Optional[Type[Probe]], ReportSection]]:
    """(result label, probe class or None, section) of every report section registered probes
    declare (`Probe.report`), in page order. The class is None for a result another probe's run
    yields."""
    found: Dict[str, Tuple[Optional[Type[Probe]], ReportSection]] = {}
    for cls in PROBES.values():
        declared = cls.report if isinstance(cls.report, tuple) else (cls.report,) if cls.report else ()
        for sec in declared:
            if not isinstance(sec, ReportSection):
                raise TypeError(
                    f"{cls.__name__}.report must be a ReportSection or a tuple of them, got {sec!r}"
                )
            label = sec.result or cls.name
            if label in found:
                raise ValueError(
                    f"two probes declare the report section {label!r}: {cls.__name__} and "
                    f"{found[label][0].__name__ if found[label][0] else 'another'}"
                )
            found[label] = (cls if label == cls.name else None, sec)
    return sorted(((label, cls, sec) for label, (cls, sec) in found.items()), key=lambda item: item[2].order)


def shared_forward_probes(model, cfg: "ReportConfig") -> List[Probe]:
    """The probes the report runs in its shared forward over the corpus windows: every section's
    probe that fits the model's stream count, is not skipped, and is built by its `for_report(cfg)`
    as not None (a probe whose `for_report` is None runs itself: `Probe.report_run`)."""
    if cfg.sae is not None:
        from .interop import sae_features  # noqa: F401 - registers SAEFeatures (its imports are SAELens's)
    return [
        probe
        for label, cls, sec in report_sections()
        if _runs(model, cfg, label, cls, sec) and cls.for_report
        for probe in [cls.for_report(cfg)]
        if probe is not None
    ]


def _runs(model, cfg: "ReportConfig", label: str, cls: Optional[Type[Probe]], sec: ReportSection) -> bool:
    """Whether the report runs a section's probe: one of its own, not skipped, enough streams."""
    return cls is not None and label not in cfg.skip and model.cfg.n_streams >= sec.min_streams


def figure_pool(cfg: ReportConfig) -> FigurePool:
    """The pool the report draws its figures in; its worker imports the report's figure code."""
    return FigurePool(cfg.background_figures, preload=(__name__,))


def build_report(
    model,
    out: Path,
    corpus: Optional[Sequence[Path]] = None,
    cfg: Optional[ReportConfig] = None,
    model_name: str = "",
    force: bool = False,
    figures: Optional[FigurePool] = None,
) -> Path:
    """Run the probes and write the report folder `out`; returns its index.

    figures: the `figure_pool(cfg)` to draw in, if already started (the CLI starts it before it
    loads the model, so that the worker's imports overlap the load); closed here either way.

    `out` is built under a hidden partial folder and put in place when complete
    (`output_folder.commit`). A folder that holds anything but an earlier, unchanged report is
    refused before any work unless `force`; even then only the report's own files are replaced."""
    cfg = cfg or ReportConfig()
    timer = PhaseTimer()
    out = Path(out).expanduser().resolve()
    figures = figures or figure_pool(cfg)
    tmp = None
    try:
        output_folder.check(out, force)
        with timer("corpus: read and tokenize"):
            texts = read_texts(corpus) if corpus else []
            tokens = corpus_tokens(model, texts, cfg)
        tmp = output_folder.staging_folder(out)
        sections = _run_all(model, tokens, tmp, cfg, timer, figures)
        with timer("figures: waiting for the worker"):
            figures.wait()
            _resolve_figures(sections, figures)
        worker = [
            {"phase": p, "seconds": round(sec, 3)}
            for p, sec in sorted(figures.seconds.items(), key=lambda kv: -kv[1])
        ]
        corpus_line = (
            f"{_corpus_note(model, corpus)}; "
            f"{tokens.numel():,} tokens in {tokens.shape[0]} windows of {tokens.shape[1]}"
        )
        notes = [
            f"model: {model_name} - {model.summary()}",
            f"corpus: {corpus_line}",
            f"written {time.strftime('%Y-%m-%d %H:%M:%S')}",
        ]
        summary = {
            "model": model_name,
            "model_summary": model.summary(),
            "corpus": corpus_line,
            "tokens": int(tokens.numel()),
            "findings": collect_findings(sections),
        }
        with timer("page (index.html, report.json)"):
            timings = [
                {"phase": p, "seconds": round(sec, 3), "share": round(f, 4)} for p, sec, f in timer.rows()
            ]
            (tmp / "index.html").write_text(render_html(sections, notes, timings, summary, worker))
            (tmp / "report.json").write_text(
                json.dumps(
                    {
                        "notes": notes,
                        "summary": summary,
                        "sections": sections,
                        "timings": timings,
                        "worker_timings": worker,
                    },
                    indent=1,
                )
            )
        output_folder.check(out, force)  # again: files may have appeared while the probes ran
        output_folder.commit(tmp, out)
    finally:
        figures.close()  # before the partial folder goes: a running job writes into it
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out / "index.html"


def _resolve_figures(sections: List[Dict], figures: FigurePool) -> None:
    """Replace the figure lists still being drawn (Futures) by what the pool returned."""
    for sec in sections:
        for key in ("figures", "layer_figures"):
            if isinstance(sec.get(key), Future):
                sec[key] = figures.value(sec[key])


def _corpus_note(model, corpus: Optional[Sequence[Path]]) -> str:
    if model.tokenizer is None:
        unused = f" ({', '.join(str(c) for c in corpus)} unused)" if corpus else ""
        return f"random token ids: the model has no tokenizer{unused}"
    return ", ".join(str(c) for c in corpus) if corpus else "random token ids"


def _figures(result: ProbeResult, folder: Path, captions: Dict[str, str]) -> List[Dict[str, str]]:
    """Save the result's figures under figures/<probe>/ (figure names are only unique per probe)."""
    try:
        paths = result.save_figures(folder / "figures" / result.probe)
    except NotImplementedError:  # a result class without plot(): a section without figures
        return []
    return [
        {"src": f"figures/{result.probe}/{p.name}", "name": p.stem, "caption": captions.get(p.stem, "")}
        for p in paths
    ]


def _layer_figures(result: ProbeResult, folder: Path) -> List[Dict[str, str]]:
    """The result's per-sublayer figures (`save_layer_figures`) under figures/layers/, for the
    page's layer selector."""
    return [
        {"src": f"figures/layers/{p.name}", "label": label}
        for p, label in result.save_layer_figures(folder / "figures" / "layers")
    ]


def _section(
    result: ProbeResult,
    folder: Path,
    timer: PhaseTimer,
    figures: FigurePool,
    sections: Dict[str, ReportSection],
    **extra,
) -> Dict:
    """Save the result (timed) and queue its figures -> the page section that shows them, titled
    and captioned by its declared `ReportSection`, with the findings the summary may quote
    (removed again by `collect_findings`); its figure lists are Futures until `_resolve_figures`."""
    with timer(f"{result.probe}: save results"):
        result.save(folder / "results" / result.probe)
    declared = sections.get(result.probe)
    page = {
        "id": f"sec-{result.probe}",
        "probe": result.probe,
        "title": declared.title if declared else result.probe.replace("_", " "),
        "figures": figures.submit(
            f"{result.probe}: figures", _figures, result, folder, dict(declared.captions) if declared else {}
        ),
        "tables": result.tables(),
        "findings": findings(result),
        **extra,
    }
    if hasattr(result, "save_layer_figures"):
        page["layer_figures"] = figures.submit(
            f"{result.probe}: per-sublayer figures", _layer_figures, result, folder
        )
    return page


def _run_all(
    model, tokens: Tensor, folder: Path, cfg: ReportConfig, timer: PhaseTimer, figures: FigurePool
) -> List[Dict]:
    """Every section's probe on the model: the probes that run themselves (`Probe.report_run`:
    the causal sweeps, whose figures the worker draws meanwhile) first, then the shared forward
    over `tokens` [n_seq, seq_len]; the page sections in order."""
    figures.start()
    declared = report_sections()
    sections_of = {label: sec for label, _, sec in declared}
    pages: Dict[str, Dict] = {}
    for label, cls, sec in declared:
        if _runs(model, cfg, label, cls, sec) and cls.for_report is None:
            for result, extra in cls.report_run(model, tokens, cfg, timer):
                pages[result.probe] = _section(result, folder, timer, figures, sections_of, **extra)

    def add(result: ProbeResult) -> None:  # queued for the worker while the next result is computed
        pages[result.probe] = _section(result, folder, timer, figures, sections_of)

    shared = shared_forward_probes(model, cfg)
    if shared:
        run_probes(
            model,
            shared,
            tokens,
            batch_size=cfg.batch_size,
            progress=cfg.progress,
            timer=timer,
            on_result=add,
        )
    rank = {label: i for i, (label, _, _) in enumerate(declared)}
    return sorted(pages.values(), key=lambda page: rank.get(page["probe"], len(rank)))


# ------------------------------------------------------------------------------ findings
def findings(result: ProbeResult) -> List[Dict]:
    """The one-line findings a probe's result supports, each {"key", "text", "values"} (plain
    data: numbers, strings and lists); none where the result cannot say (NaN, one stream)."""
    return [f for f in result.findings() if f is not None]


def collect_findings(sections: List[Dict]) -> List[Dict]:
    """Take the findings out of the sections; the first MAX_FINDINGS in FINDING_ORDER."""
    found = [f for s in sections for f in s.pop("findings", [])]
    rank = {k: i for i, k in enumerate(FINDING_ORDER)}
    found.sort(key=lambda f: rank.get(f["key"], len(rank)))
    return found[:MAX_FINDINGS]


# ------------------------------------------------------------------------------ the page
CSS = (
    "body{font-family:sans-serif;max-width:1300px;margin:auto;padding:1em;line-height:1.4}"
    "figure{margin:1em 0}img{max-width:100%}figcaption{color:#444;font-size:0.9em}"
    "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #bbb;padding:2px 8px;"
    "text-align:right}#summary{background:#f4f6f8;border:1px solid #d8dde3;padding:0.2em 1.2em 0.8em}"
    "#summary ul.notes{color:#333;padding-left:1.2em}ol.findings li{margin:0.3em 0}"
    "nav#toc ol{columns:2;padding-left:1.5em}nav#toc a{text-decoration:none}nav#toc a:hover{text-decoration:underline}"
    "section.probe{border-top:1px solid #ccc;margin-top:2em}.probe-id{color:#666;font-size:0.85em;margin-top:-0.6em}"
)


def _section_html(s_i: int, sec: Dict, section_id: str) -> List[str]:
    """One probe's section (number s_i, anchor section_id): title, probe id, note, figures, the
    per-sublayer selector and tables, every string escaped."""
    esc = html.escape
    parts = []
    parts.append(f"<section class='probe' id='{esc(section_id)}'><h2>{esc(sec['title'])}</h2>")
    if sec.get("probe"):
        parts.append(f"<p class='probe-id'>probe <code>{esc(sec['probe'])}</code></p>")
    if sec.get("note"):
        parts.append(f"<p>{esc(sec['note'])}</p>")
    for fig in sec["figures"]:
        parts.append(
            f"<figure><img src='{esc(fig['src'])}' alt='{esc(fig['name'])}'>"
            f"<figcaption>{esc(fig['caption'])}</figcaption></figure>"
        )
    if sec.get("layer_figures"):
        opts = "".join(
            f"<option value='{esc(f['src'])}'>{esc(f['label'])}</option>" for f in sec["layer_figures"]
        )
        first = esc(sec["layer_figures"][0]["src"])
        parts.append(
            f"<p>Per sublayer: <select id='layer-select-{s_i}' onchange=\"document.getElementById("
            f"'layer-img-{s_i}').src=this.value\">{opts}</select></p>"
            f"<figure><img id='layer-img-{s_i}' src='{first}' alt='per-sublayer figure'></figure>"
        )
    for table in sec["tables"]:
        parts.append(
            f"<table><caption>{esc(table['title'])}</caption><tr><th></th>"
            + "".join(f"<th>{esc(h)}</th>" for h in table["header"])
            + "</tr>"
        )
        for i, row in enumerate(table["rows"]):
            parts.append(f"<tr><th>{i}</th>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
        parts.append("</table>")
    parts.append("</section>")
    return parts


def _timings_html(timings: Sequence[Dict], worker_timings: Sequence[Dict]) -> List[str]:
    """The footer: wall time and share per phase, and the figures drawn in the worker process."""
    esc = html.escape
    parts = []
    parts.append(
        "<footer><h2 id='timings'>Where the time went</h2><table><caption>wall time per phase "
        "(the page itself is written after this table)</caption><tr><th>phase</th><th>seconds</th>"
        "<th>share</th></tr>"
    )
    parts += [
        f"<tr><td style='text-align:left'>{esc(t['phase'])}</td><td>{t['seconds']:.2f}</td>"
        f"<td>{100 * t['share']:.1f}%</td></tr>"
        for t in timings
    ]
    parts.append("</table>")
    if worker_timings:
        parts.append(
            "<table class='worker'><caption>figures drawn in a worker process, overlapped with the "
            "phases above (the last ones, if the worker had not started them, in the main process "
            "while waiting for it)</caption><tr><th>phase</th><th>seconds</th></tr>"
        )
        parts += [
            f"<tr><td style='text-align:left'>{esc(t['phase'])}</td><td>{t['seconds']:.2f}</td></tr>"
            for t in worker_timings
        ]
        parts.append("</table>")
    parts.append("</footer>")
    return parts


def render_html(
    sections: List[Dict],
    notes: List[str],
    timings: Sequence[Dict] = (),
    summary: Optional[Dict] = None,
    worker_timings: Sequence[Dict] = (),
) -> str:
    """A self-contained page (no external resources): a summary (model, corpus, findings), a table
    of contents, one section per probe named for what it shows (figures with captions, tables, a
    layer selector for per-sublayer figures), and a footer table of where the run's time went."""
    esc = html.escape  # every string that reaches the page: names of files, models and hooks included
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>mhc-interp report</title>",
        f"<style>{CSS}</style></head><body><h1>mhc-interp report</h1>",
    ]
    ids = [sec.get("id") or f"section-{s_i}" for s_i, sec in enumerate(sections)]
    found = (summary or {}).get("findings", [])
    parts.append("<section id='summary'><h2>Summary</h2><ul class='notes'>")
    parts += [f"<li>{esc(n)}</li>" for n in notes]
    parts.append("</ul>")
    if found:
        parts.append("<h3>Findings</h3><ol class='findings'>")
        parts += [f"<li data-key='{esc(f['key'])}'>{esc(f['text'])}</li>" for f in found]
        parts.append("</ol>")
    parts.append("</section>")
    toc = [("summary", "Summary")] + list(zip(ids, [s["title"] for s in sections]))
    if timings:
        toc.append(("timings", "Where the time went"))
    parts.append("<nav id='toc'><h2>Contents</h2><ol>")
    parts += [f"<li><a href='#{esc(i)}'>{esc(t)}</a></li>" for i, t in toc]
    parts.append("</ol></nav>")
    for s_i, sec in enumerate(sections):
        parts += _section_html(s_i, sec, ids[s_i])
    if timings:
        parts += _timings_html(timings, worker_timings)
    parts.append("</body></html>")
    return "\n".join(parts)
