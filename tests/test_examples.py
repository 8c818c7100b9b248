"""The examples run, and the custom-probe example computes what it says."""
import runpy
from pathlib import Path

import numpy as np
import torch

from mhc_interp.probes import ProbeResult, run_probes

from .conftest import planted_reader_model

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_custom_probe_example(tmp_path):
    module = runpy.run_path(str(EXAMPLES / "custom_probe.py"))
    result = module["main"](["--out", str(tmp_path / "entropy")])
    loaded = ProbeResult.load(tmp_path / "entropy")
    np.testing.assert_array_equal(loaded["entropy_bits"], result["entropy_bits"])
    assert ((0 <= result["entropy_bits"]) & (result["entropy_bits"] <= 2 + 1e-9)).all()
    # planted: a model that reads exactly one stream has zero read entropy
    planted = run_probes(planted_reader_model(), module["ReadEntropy"](), torch.randint(0, 40, (2, 6)), progress=False)
    np.testing.assert_allclose(planted["entropy_bits"], 0.0, atol=1e-12)


def test_crosscoder_assignment_example(tmp_path, monkeypatch):
    from mhc_interp.cli import asset

    monkeypatch.syspath_prepend(str(EXAMPLES))
    main = runpy.run_path(str(EXAMPLES / "crosscoder_assignment.py"))["main"]
    out = main(["--fast", "--quiet", "--out", str(tmp_path), "--model", str(asset("tiny-mhc-n4"))])
    counts = out.extra["counts"]
    assert sum(counts.values()) == 128            # every latent is assigned, shared or dead
    assert (tmp_path / "crosscoder_stream_share.png").stat().st_size > 2000
    assert (tmp_path / "assignment_table.md").read_text().startswith("tau")
