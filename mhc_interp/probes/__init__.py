"""Probes: streaming reducers over a corpus, written against the hook API.

    from mhc_interp.probes import run_probes, StreamUsage
    usage = run_probes(model, StreamUsage(), tokens)

See `base.py` for the contract (write your own in one small file) and `runner.py` for token
sources, masking and batching.
"""
from .base import PROBES, Probe, ProbeResult, get_probe, register_probe, register_result, require_streams
from .runner import iter_batches, run_probes
from .cka import CKA, CKAResult, center_gram, cka_from_hsic, gram_linear, gram_rbf, hsic_matrix
from .corruption import DEFAULT_WORD_GROUPS, SymmetricReplacement
from .causal import CausalProbe
from .patching import ActivationPatching, PatchingResult, activation_patching
from .rescue import AblateRescue, RescueResult, ablate_and_rescue
from .curvature import Curvature, CurvatureResult, sequence_curvatures, step_angles
from .stream_usage import StreamUsage, StreamUsageResult

__all__ = ["PROBES", "Probe", "ProbeResult", "get_probe", "register_probe", "register_result",
           "require_streams", "iter_batches", "run_probes", "StreamUsage", "StreamUsageResult",
           "Curvature", "CurvatureResult", "sequence_curvatures", "step_angles",
           "CKA", "CKAResult", "CausalProbe", "ActivationPatching", "PatchingResult",
           "activation_patching", "AblateRescue", "RescueResult", "ablate_and_rescue",
           "SymmetricReplacement", "DEFAULT_WORD_GROUPS", "center_gram", "cka_from_hsic", "gram_linear", "gram_rbf", "hsic_matrix"]
