"""The examples run, and the custom-probe example computes what it says."""

import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from mhc_interp.probes import ProbeResult, run_probes

from .conftest import planted_reader_model
from .test_crosscoder import reference_counts

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.fixture
def custom_probe_module():
    """custom_probe.py run as a module; its probe and result class unregistered afterwards (its
    report section would otherwise join every later report in this process)."""
    from mhc_interp.probes.base import PROBES, RESULTS

    try:
        yield runpy.run_path(str(EXAMPLES / "custom_probe.py"))
    finally:
        PROBES.pop("read_entropy", None)
        RESULTS.pop("ReadEntropyResult", None)


def test_custom_probe_example(tmp_path, custom_probe_module):
    module = custom_probe_module
    result = module["main"](["--out", str(tmp_path / "entropy")])
    loaded = ProbeResult.load(tmp_path / "entropy")
    np.testing.assert_array_equal(loaded["entropy_bits"], result["entropy_bits"])
    assert ((0 <= result["entropy_bits"]) & (result["entropy_bits"] <= 2 + 1e-9)).all()
    # planted: a model that reads exactly one stream has zero read entropy
    planted = run_probes(
        planted_reader_model(), module["ReadEntropy"](), torch.randint(0, 40, (2, 6)), progress=False
    )
    np.testing.assert_allclose(planted["entropy_bits"], 0.0, atol=1e-12)
    # its report section captions the figure its result draws
    assert [p.stem for p in result.save_figures(tmp_path / "figures")] == list(
        module["ReadEntropy"].report.captions
    )


def test_crosscoder_assignment_example(tmp_path, monkeypatch):
    from mhc_interp.shipped import asset

    monkeypatch.syspath_prepend(str(EXAMPLES))
    main = runpy.run_path(str(EXAMPLES / "crosscoder_assignment.py"))["main"]
    out = main(["--fast", "--quiet", "--out", str(tmp_path), "--model", str(asset("tiny-mhc-n4"))])
    counts = out.extra["counts"]
    # the summary's counts are those of the saved result, recomputed from its shares, its firing
    # frequencies and its threshold (0.5 = 1/n + (1 - 1/n) / 3 for 4 streams)
    res = out.results["crosscoder"]
    share, dead, tau = res["stream_share"], res["firing_frequency"] == 0, res.meta["threshold"]
    assert tau == pytest.approx(0.5)
    expect, sweep = reference_counts(share, dead, tau, res["thresholds"])  # ... and at every swept threshold
    np.testing.assert_array_equal(res["counts"], sweep)
    assert counts == expect and expect["dead"] < 128
    loaded = ProbeResult.load(tmp_path / "crosscoder")
    assert loaded.counts_at() == counts
    assert (tmp_path / "crosscoder_stream_share.png").stat().st_size > 2000
    table = (tmp_path / "assignment_table.md").read_text().splitlines()
    assert table[0].startswith("tau") and len(table) == len(res["thresholds"]) + 2
