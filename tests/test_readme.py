"""The README stays true: its hook table is the one generated from the shipped model, and its
Python examples run."""
import re
import runpy
from pathlib import Path

import torch

from mhc_interp import HookedMHC
from mhc_interp.cli import default_model_path
from mhc_interp.hooks import hook_table_markdown

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_hook_table_is_generated_from_the_model():
    table = hook_table_markdown(HookedMHC.from_pretrained(default_model_path()))
    assert table in README, "README hook table is stale: run `mhc-interp hooks --markdown`"


def test_python_examples_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 2
    # a real file: nnsight reads a trace's source back from the file it was compiled from
    script = tmp_path / "readme_examples.py"
    script.write_text("\n".join(blocks))
    ns = runpy.run_path(str(script))
    assert not torch.equal(ns["ablated"], ns["clean"])
    assert not torch.allclose(ns["patched"], ns["clean"])


def test_every_test_the_reliability_table_names_exists():
    root = Path(__file__).parent.parent
    named = re.findall(r"`(tests/\w+\.py)::(\w+)`", (root / "docs" / "reliability.md").read_text())
    assert len(named) >= 20
    missing = [f"{f}::{t}" for f, t in named
               if not (root / f).is_file() or not re.search(rf"^def {t}\(", (root / f).read_text(), flags=re.M)]
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"
