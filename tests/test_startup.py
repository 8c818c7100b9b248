"""The main job's start-up does not pay for libraries it does not use (issue 16): loading the demo
model imports neither torch's compiler (drawn into a meta-device build by `normal_`, `eye`, `cat`
on meta tensors), nor transformers' AutoTokenizer machinery (the shipped tokenizer is a plain fast
tokenizer), and the causal probes' t intervals and the attribution's grading do not import scipy.stats."""

import subprocess
import sys

import numpy as np
import pytest

from mhc_interp.probes.causal import t_half_width

LOAD = r"""
import sys
from mhc_interp.shipped import load
from mhc_interp.probes.causal import t_half_width
import numpy as np
model = load(None)
assert model.tokenizer is not None and model.tokenizer.encode("hello world")
t_half_width(np.array([8.0]), np.array([1.0]))
from mhc_interp.probes.attribution.compare import fidelity
fidelity(np.arange(5.0), np.arange(5.0) ** 2, 0.0)
heavy = sorted(m for m in ("torch._dynamo", "transformers.models.auto", "scipy.stats") if m in sys.modules)
assert not heavy, f"loading the demo model imported {heavy}"
"""


def test_loading_the_demo_model_skips_the_heavy_imports():
    done = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("n", [2, 3, 9, 101])
def test_t_half_width_is_the_student_t_quantile(n):
    stats = pytest.importorskip("scipy.stats")
    want = stats.t.ppf(0.975, n - 1) * 0.5
    assert t_half_width(np.array([float(n)]), np.array([0.5]))[0] == pytest.approx(want, rel=1e-12)
    assert np.isnan(t_half_width(np.array([1.0]), np.array([0.5]))[0])  # one prompt: no interval


PROCESS = r"""
import os, platform
from mhc_interp.process import configure_command_process, keep_freed_memory
configure_command_process()
assert os.environ["OMP_WAIT_POLICY"] == EXPECTED, os.environ["OMP_WAIT_POLICY"]
if platform.libc_ver()[0] == "glibc":
    assert keep_freed_memory()
"""


@pytest.mark.parametrize("preset", [None, "ACTIVE"])
def test_command_process_settings(preset):
    """Passive OpenMP waits unless the user set a policy; glibc keeps freed memory."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = f"EXPECTED = {preset or 'PASSIVE'!r}\n" + PROCESS
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
