"""The README and docs/ stay true: the hook table is the one generated from the shipped model, the
Python examples run, every relative link points to a file (and heading) that exists, and every test
docs/reliability.md names exists."""

import re
import runpy
from pathlib import Path

import torch

from mhc_interp import HookedMHC
from mhc_interp.hooks import hook_table_markdown
from mhc_interp.shipped import default_model_path

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
# pages whose ```python blocks illustrate what needs a checkpoint, several processes or another
# environment (SAELens); every other page's blocks run, after the README's (they use its `model`, `tokens`)
ILLUSTRATION_PAGES = {"adapters.md", "attribution.md", "saelens.md"}


def python_blocks(page: Path):
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def test_hook_table_is_generated_from_the_model():
    table = hook_table_markdown(HookedMHC.from_pretrained(default_model_path()))
    assert table in (DOCS / "hooks.md").read_text(), (
        "docs/hooks.md's hook table is stale: paste `mhc-interp hooks --markdown`"
    )


def test_python_examples_run(tmp_path):
    pages = [ROOT / "README.md"] + sorted(p for p in DOCS.glob("*.md") if p.name not in ILLUSTRATION_PAGES)
    blocks = {page.name: python_blocks(page) for page in pages}
    assert len(blocks["README.md"]) >= 3 and len(blocks["probes.md"]) >= 3
    # a real file: nnsight reads a trace's source back from the file it was compiled from
    script = tmp_path / "doc_examples.py"
    script.write_text("\n".join(block for page in pages for block in blocks[page.name]))
    ns = runpy.run_path(str(script))
    assert not torch.equal(ns["ablated"], ns["clean"])
    assert not torch.allclose(ns["patched"], ns["clean"])
    assert ns["results"]["logit_lens"]["kl"].shape[0] == ns["model"].cfg.n_layers + 1  # "layers" by default


def heading_anchors(page: Path):
    """GitHub's anchors: lower case, punctuation dropped, spaces to '-', repeats numbered."""
    anchors, seen = set(), {}
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for heading in re.findall(r"^#+ +(.+?) *$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def broken_links(page: Path, root: Path = ROOT):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)[^)]*\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            yield f"{page.relative_to(root)}: {target} (no such file)"
        elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file):
            yield f"{page.relative_to(root)}: {target} (no such heading)"


def test_relative_links_resolve():
    pages = [ROOT / "README.md"] + sorted(DOCS.rglob("*.md"))
    assert len(pages) >= 8
    broken = [link for page in pages for link in broken_links(page)]
    assert not broken, f"broken links: {broken}"


def test_broken_links_are_found(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# A heading: with `code`\n\n## Twice\n\n## Twice\n")
    page.write_text(
        "[ok](other.md#a-heading-with-code) [ok](other.md#twice-1) [ok](https://x.org/y)\n"
        "[bad](missing.md) [bad](other.md#nope) [bad](#none)\n"
    )
    found = list(broken_links(page, root=tmp_path))
    assert [f.split(": ")[1] for f in found] == [
        "missing.md (no such file)",
        "other.md#nope (no such heading)",
        "#none (no such heading)",
    ]


def test_every_test_the_reliability_table_names_exists():
    named = re.findall(r"`(tests/\w+\.py)::(\w+)`", (DOCS / "reliability.md").read_text())
    assert len(named) >= 20
    missing = [
        f"{f}::{t}"
        for f, t in named
        if not (ROOT / f).is_file() or not re.search(rf"^def {t}\(", (ROOT / f).read_text(), flags=re.M)
    ]
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"
