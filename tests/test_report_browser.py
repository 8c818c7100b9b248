"""The report page (`mhc-interp report` -> index.html) in a real headless browser: Debian's chromium
driven by Playwright at 1400 px wide, the page served from a localhost http.server.

Checks: the page loads without console errors, page errors, failed or non-local requests; every
<img> decodes (naturalWidth > 0), is visible and is not shrunk below 75% of its size (its text stays
readable); a summary at the top names the model and the corpus and lists the findings of
report.json (at least three); the table of contents links every section, each link lands on its
section; the sections are headed by what they show, not by probe ids; the figures carry their
captions; the tables render (the global rescue table has one row per stream); and the per-sublayer
selector swaps the figure for one that loads. A full-page screenshot is written to the test's tmp
dir and copied to /tmp/report_screenshot.png for a person to look at.

Needs a chromium binary (CI installs Debian's `chromium` in .ci/run) and the `playwright` package;
skipped with a message when either is missing. Playwright's own browser download is not used.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from mhc_interp.cli import main

SCREENSHOT_COPY = Path("/tmp/report_screenshot.png")
TIMEOUT_MS = 15_000
VIEWPORT_WIDTH = 1400  # the width the report is designed for
# No network: chromium otherwise reaches out (component updates, QUIC probes, sync, ...).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def _chromium() -> str | None:
    """$MHC_CHROMIUM, else Debian's /usr/bin/chromium, else a chromium on PATH."""
    for cand in (
        os.environ.get("MHC_CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


CHROMIUM = _chromium()
if CHROMIUM is None:
    pytest.skip(
        "no chromium binary (looked at $MHC_CHROMIUM, /usr/bin/chromium, PATH): install it with "
        "`apt-get install -y chromium chromium-driver` to run the report's browser test",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="the `playwright` package is missing: `python -m pip install playwright` (its browser download "
    "is not needed; the test drives the system chromium)",
)


# a corpus file whose name is markup: it reaches the page (as an unused corpus: tiny-mhc-n4 has no
# tokenizer) and must show as text, not run
HOSTILE_NAME = "<img src=x onerror=\"document.title='pwned'\">.txt"


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("report")
    corpus = base / HOSTILE_NAME
    corpus.write_text("To be, or not to be, that is the question. " * 50)
    out = base / "report"
    assert (
        main(
            [
                "report",
                "--model",
                "tiny-mhc-n4",
                "--fast",
                "--quiet",
                "--out",
                str(out),
                "--corpus",
                str(corpus),
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def report_json(report_dir) -> dict:
    return json.loads((report_dir / "report.json").read_text())


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def origin(report_dir):
    """http://127.0.0.1:<free port> serving the report folder; shut down at teardown."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(report_dir))
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    """One headless chromium for the module, with a fresh profile (--user-data-dir)."""
    pw = sync_api.sync_playwright().start()
    try:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": VIEWPORT_WIDTH, "height": 900},
            timeout=TIMEOUT_MS,
        )
    except Exception:
        pw.stop()
        raise
    context.set_default_timeout(TIMEOUT_MS)
    try:
        yield context
    finally:
        context.close()
        pw.stop()


class LoadedPage:
    """index.html opened in a new tab, with everything that went wrong recorded: console errors, page
    errors (uncaught exceptions), failed requests, HTTP errors and requests that left the server."""

    def __init__(self, context, origin: str):
        self.origin = origin
        self.problems: list[str] = []
        self.page = page = context.new_page()
        page.on("console", lambda m: m.type == "error" and self.problems.append(f"console error: {m.text}"))
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.url} ({r.failure})"))
        page.on("response", lambda r: r.status >= 400 and self.problems.append(f"HTTP {r.status}: {r.url}"))
        page.route("**/*", self._local_only)
        page.goto(f"{origin}/index.html", wait_until="load")

    def _local_only(self, route):
        """The page must be self-contained: anything not served by our server is a problem (and aborted)."""
        url = route.request.url
        if url.startswith(self.origin + "/") or url.startswith("data:"):
            route.continue_()
        else:
            self.problems.append(f"non-local request: {url}")
            route.abort()

    def images(self) -> list[dict]:
        return self.page.evaluate("""() => Array.from(document.images).map(i => ({
            id: i.id, src: i.getAttribute('src'), complete: i.complete,
            width: i.naturalWidth, height: i.naturalHeight}))""")


@pytest.fixture
def loaded(browser_context, origin):
    lp = LoadedPage(browser_context, origin)
    yield lp
    lp.page.close()


def test_page_loads_without_errors_and_every_image_resolves(loaded, report_json, tmp_path):
    page = loaded.page
    assert page.title() == "mhc-interp report"
    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    shutil.copyfile(shot, SCREENSHOT_COPY)  # for a person to look at
    assert shot.stat().st_size > 10_000

    images = loaded.images()
    figures = [f["src"] for s in report_json["sections"] for f in s["figures"]]
    layer_figures = [s["layer_figures"][0]["src"] for s in report_json["sections"] if s.get("layer_figures")]
    assert [i["src"] for i in images if not i["id"]] == figures
    assert [i["src"] for i in images if i["id"]] == layer_figures
    assert len(figures) >= 20 and layer_figures
    broken = [i["src"] for i in images if not (i["complete"] and i["width"] > 0 and i["height"] > 0)]
    assert not broken, f"images that did not load: {broken}"
    hidden = [images[k]["src"] for k in range(len(images)) if not page.locator("img").nth(k).is_visible()]
    assert not hidden, f"images not shown: {hidden}"
    assert loaded.problems == []


def test_names_from_the_user_show_as_text_and_never_run(loaded):
    page = loaded.page
    assert page.title() == "mhc-interp report"  # the onerror handler never ran
    assert page.locator("img[src='x']").count() == 0
    notes = page.locator("li").all_inner_texts()
    assert any(HOSTILE_NAME in n for n in notes), notes
    assert loaded.problems == []


def test_figures_are_not_shrunk_below_readable_size(loaded):
    """At 1400 px every figure is shown at >= 75% of its pixel width (its fonts were sized for that)."""
    scales = loaded.page.eval_on_selector_all(
        "figure img",
        "is => is.map(i => [i.getAttribute('src'), i.getBoundingClientRect().width / i.naturalWidth])",
    )
    shrunk = [(src, round(scale, 2)) for src, scale in scales if scale < 0.75]
    assert scales and not shrunk, f"figures shown too small to read: {shrunk}"


def test_summary_at_the_top_names_model_corpus_and_findings(loaded, report_json):
    page = loaded.page
    summary = report_json["summary"]
    assert summary["model"] == "tiny-mhc-n4" and HOSTILE_NAME in summary["corpus"]
    findings = summary["findings"]
    assert 3 <= len(findings) <= 5
    assert all(
        f["text"].strip() and "\n" not in f["text"] and isinstance(f["values"], dict) for f in findings
    )
    # one finding per kind, in the report's order; for tiny-mhc-n4 (4 streams) every multi-stream kind is there
    keys = [f["key"] for f in findings]
    assert keys == ["dominant_stream", "mixers", "cka_last", "needed_rescue", "needed_patching"]
    box = page.locator("#summary")
    assert box.is_visible()
    assert box.locator("li").all_inner_texts()[:2] == report_json["notes"][:2]
    assert box.locator("ol.findings > li").all_inner_texts() == [f["text"] for f in findings]
    # the summary comes first: above the table of contents and every section
    top = page.evaluate(
        "() => Array.from(document.querySelectorAll('#summary, nav#toc, section.probe'))"
        ".map(e => [e.id, e.getBoundingClientRect().top + window.scrollY])"
    )
    assert top[0][0] == "summary" and top[1][0] == "toc"
    assert [t for _, t in top] == sorted(t for _, t in top)
    assert loaded.problems == []


def test_findings_are_computed_from_the_results(report_json, report_dir):
    """The numbers a finding quotes are those of the saved results (not made up by the page)."""
    import numpy as np

    values = {f["key"]: f["values"] for f in report_json["summary"]["findings"]}
    usage = np.load(report_dir / "results" / "stream_usage.npz")
    share = usage["read_share_norm"].mean(0)
    assert values["dominant_stream"]["stream"] == int(share.argmax())
    assert values["dominant_stream"]["share"] == pytest.approx(float(share.max()))
    assert values["mixers"]["mean_distance"] == pytest.approx(float(usage["h_res_dist"].mean()))
    rescue = np.load(report_dir / "results" / "ablate_rescue.npz")["global_rescue"].copy()
    np.fill_diagonal(rescue, np.nan)
    assert values["needed_rescue"]["most_needed"] == int(np.nanargmax(np.nanmean(rescue, 0)))


def test_table_of_contents_links_land_on_their_sections(loaded, report_json):
    page = loaded.page
    links = page.eval_on_selector_all(
        "nav#toc a", "as => as.map(a => [a.getAttribute('href'), a.textContent])"
    )
    ids = ["summary"] + [s["id"] for s in report_json["sections"]] + ["timings"]
    assert [h for h, _ in links] == [f"#{i}" for i in ids]
    assert [t for _, t in links][1:-1] == [s["title"] for s in report_json["sections"]]
    for href, _ in links:  # every target exists, once
        assert page.locator(href).count() == 1, href
    for k in (len(links) - 2, 1, len(links) - 1):  # following a link scrolls its section to the top
        page.locator("nav#toc a").nth(k).click()
        page.wait_for_function("id => location.hash === '#' + id", arg=ids[k])
        top = page.evaluate("id => document.getElementById(id).getBoundingClientRect().top", ids[k])
        assert abs(top) < 5 or page.evaluate(
            "() => window.innerHeight + window.scrollY >= document.body.scrollHeight - 2"
        )
    assert loaded.problems == []


def test_sections_are_named_for_what_they_show(loaded, report_json):
    page = loaded.page
    sections = report_json["sections"]
    titles = page.locator("section.probe > h2").all_inner_texts()
    assert titles == [s["title"] for s in sections]
    probes = [s["probe"] for s in sections]
    assert len(set(titles)) == len(titles)
    for title, probe in zip(titles, probes):  # a phrase about what is shown, not the id (a method may follow)
        assert probe not in title and not title.lower().startswith(probe.replace("_", " ")), title
        assert len(title.split()) >= 4, title
    assert [s["id"] for s in sections] == [f"sec-{p}" for p in probes]


def test_figures_have_their_captions_and_sections_their_headings(loaded, report_json):
    page = loaded.page
    assert page.locator("section.probe > h2").all_inner_texts() == [
        s["title"] for s in report_json["sections"]
    ]
    assert page.locator("footer > h2").all_inner_texts() == ["Where the time went"]
    captions = page.eval_on_selector_all(
        "figure:has(> figcaption)",
        "fs => fs.map(f => [f.querySelector('img').getAttribute('src'), "
        "f.querySelector('figcaption').textContent])",
    )
    expected = [[f["src"], f["caption"]] for s in report_json["sections"] for f in s["figures"]]
    assert captions == expected
    described = sum(1 for _, text in captions if text.strip())
    assert described >= 0.8 * len(captions), f"most figures should have a caption: {captions}"


def test_tables_render(loaded, report_json):
    page = loaded.page
    tables = page.eval_on_selector_all(
        "table:not(footer table)",
        """ts => ts.map(t => ({
        caption: t.caption ? t.caption.textContent : null,
        rows: Array.from(t.rows).map(r => Array.from(r.cells).map(c => c.textContent)),
        height: t.getBoundingClientRect().height}))""",
    )
    expected = [t for s in report_json["sections"] for t in s["tables"]]
    assert [t["caption"] for t in tables] == [t["title"] for t in expected]
    rescue = next(t for t in tables if t["caption"].startswith("global rescue"))
    n = 4  # tiny-mhc-n4: four streams
    assert len(rescue["rows"]) == n + 1  # header + one row per ablated stream
    assert rescue["rows"][0] == ["", *map(str, range(n))]
    for i, row in enumerate(rescue["rows"][1:]):
        assert row[0] == str(i) and len(row) == n + 1
        assert row[1 + i] == "-"  # the diagonal is not defined
        assert all(0 <= float(v) <= 100 for j, v in enumerate(row[1:]) if j != i), row
    for table, exp in zip(tables, expected):
        assert [r[1:] for r in table["rows"][1:]] == exp["rows"]
        assert table["height"] > 0
    assert loaded.problems == []


def test_footer_says_where_the_time_went(loaded, report_json):
    rows = loaded.page.eval_on_selector_all(
        "footer table:not(.worker) tr", "rs => rs.map(r => Array.from(r.cells).map(c => c.textContent))"
    )
    assert rows[0] == ["phase", "seconds", "share"]
    assert [r[0] for r in rows[1:]] == [t["phase"] for t in report_json["timings"]]
    worker = loaded.page.eval_on_selector_all(
        "footer table.worker tr td:first-child", "ds => ds.map(d => d.textContent)"
    )
    assert worker == [t["phase"] for t in report_json["worker_timings"]] and worker


def test_layer_selector_swaps_the_figure(loaded, report_json):
    page = loaded.page
    section = next(k for k, s in enumerate(report_json["sections"]) if s.get("layer_figures"))
    layer_figures = report_json["sections"][section]["layer_figures"]
    select, img = page.locator(f"#layer-select-{section}"), page.locator(f"#layer-img-{section}")
    assert select.is_visible() and img.is_visible()
    options = select.locator("option")
    assert options.all_inner_texts() == [f["label"] for f in layer_figures]
    assert img.get_attribute("src") == layer_figures[0]["src"]
    first_pixels = img.screenshot()
    for k in (len(layer_figures) - 1, 1):
        target = layer_figures[k]
        select.select_option(value=target["src"])
        assert select.input_value() == target["src"]
        assert img.get_attribute("src") == target["src"]
        page.wait_for_function(
            """img => img.complete && img.naturalWidth > 0 &&
                                  img.currentSrc.endsWith(img.getAttribute('src'))""",
            arg=img.element_handle(),
        )
        assert img.evaluate("i => i.naturalHeight") > 0
        assert img.screenshot() != first_pixels  # the figure shown changed
    assert loaded.problems == []
