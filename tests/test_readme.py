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
