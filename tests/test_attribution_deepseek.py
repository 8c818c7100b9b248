"""Attribution patching on the DeepSeek-V4 adapter (tiny random model, CPU): both methods and both
mixing modes run (IG resumes hash-routed layers with the base prompts' token ids), report the
exact sweep's baselines, and the frozen-mixing AtP map has the exact map's shape and ordering."""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DeepseekV4Config"):  # pragma: no cover - older transformers
    pytest.skip("this transformers has no DeepSeek-V4", allow_module_level=True)

from mhc_interp.adapters import HookedHFMHC, tiny_deepseek_v4  # noqa: E402
from mhc_interp.probes import activation_patching, attribution_patching  # noqa: E402


def test_attribution_on_deepseek_v4():
    model = HookedHFMHC(tiny_deepseek_v4(seed=0))
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 96, (2, 10), generator=g)
    corrupted = clean.clone()
    corrupted[:, 5] = (corrupted[:, 5] + 1) % 96
    exact = activation_patching(model, clean, corrupted, mixing="frozen")
    for method, mixing in (("atp", "both"), ("ig", "frozen")):
        est = attribution_patching(model, clean, corrupted, mixing=mixing, method=method, steps=2)
        for m in ("recomputed", "frozen") if mixing == "both" else (mixing,):
            assert est[f"attribution_{m}"].shape == exact["kl_frozen"].shape
            assert np.isfinite(est[f"attribution_{m}"]).all()
        np.testing.assert_allclose(est["baseline_corrupted"], exact["baseline_corrupted"], rtol=1e-5)
    a, e = est["attribution_frozen"].ravel(), exact["kl_frozen"].ravel()
    assert np.corrcoef(a, e)[0, 1] > 0.5  # measured 0.92 (IG, 2 steps)
