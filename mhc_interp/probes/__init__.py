"""Probes: streaming reducers over a corpus, written against the hook API.

    from mhc_interp.probes import run_probes, StreamUsage
    usage = run_probes(model, StreamUsage(), tokens)

See `base.py` for the contract (write your own in one small file) and `runner.py` for token
sources, masking and batching.
"""

from .attribution import AttributionPatching, AttributionResult, attribution_patching
from .base import PROBES, Probe, ProbeResult, get_probe, register_probe, register_result, require_streams
from .causal import CausalProbe
from .cka import CKA, CKAResult, center_gram, cka_from_hsic, gram_linear, gram_rbf, hsic_matrix
from .corpus_mean import CorpusMean, corpus_mean
from .corruption import DEFAULT_WORD_GROUPS, SymmetricReplacement
from .crosscoder import (
    Crosscoder,
    CrosscoderConfig,
    CrosscoderEval,
    CrosscoderResult,
    analyze_crosscoder,
    match_decoder_directions,
    train_crosscoder,
)
from .crosscoder_buffer import ActivationBuffer, InMemoryActivations, default_sites, grid_sites
from .curvature import Curvature, CurvatureResult, sequence_curvatures, step_angles
from .heads import (
    DEFAULT_ORDINAL_WORDS,
    HEAD_SCORES,
    HeadDetector,
    HeadScores,
    check_attention_model,
    detect_heads,
    head_ablation_hook,
    repeated_random_tokens,
    successor_scores,
)
from .logit_lens import (
    LogitLens,
    LogitLensResult,
    all_subsets,
    check_subsets,
    decompose_logits,
    lens_sites,
    stream_contributions,
)
from .logit_lens_prompt import PromptLensResult, logit_lens
from .patching import ActivationPatching, PatchingResult, activation_patching
from .predictability import (
    CrossStreamPredictability,
    PredictabilityResult,
    predictability_sites,
    ridge_r2_matrix,
)
from .rescue import AblateRescue, RescueResult, ablate_and_rescue
from .runner import iter_batches, run_probes
from .sites import resolve_sites
from .stream_usage import StreamUsage, StreamUsageResult

__all__ = [
    "PROBES",
    "Probe",
    "ProbeResult",
    "get_probe",
    "register_probe",
    "register_result",
    "require_streams",
    "iter_batches",
    "run_probes",
    "StreamUsage",
    "StreamUsageResult",
    "Curvature",
    "CurvatureResult",
    "sequence_curvatures",
    "step_angles",
    "CKA",
    "CKAResult",
    "CausalProbe",
    "CorpusMean",
    "corpus_mean",
    "ActivationPatching",
    "PatchingResult",
    "activation_patching",
    "AttributionPatching",
    "AttributionResult",
    "attribution_patching",
    "AblateRescue",
    "RescueResult",
    "ablate_and_rescue",
    "SymmetricReplacement",
    "DEFAULT_WORD_GROUPS",
    "HeadDetector",
    "HeadScores",
    "detect_heads",
    "repeated_random_tokens",
    "successor_scores",
    "head_ablation_hook",
    "check_attention_model",
    "HEAD_SCORES",
    "DEFAULT_ORDINAL_WORDS",
    "LogitLens",
    "LogitLensResult",
    "PromptLensResult",
    "logit_lens",
    "decompose_logits",
    "stream_contributions",
    "lens_sites",
    "check_subsets",
    "all_subsets",
    "Crosscoder",
    "CrosscoderConfig",
    "CrosscoderEval",
    "CrosscoderResult",
    "analyze_crosscoder",
    "match_decoder_directions",
    "train_crosscoder",
    "ActivationBuffer",
    "InMemoryActivations",
    "default_sites",
    "grid_sites",
    "resolve_sites",
    "CrossStreamPredictability",
    "PredictabilityResult",
    "ridge_r2_matrix",
    "predictability_sites",
    "center_gram",
    "cka_from_hsic",
    "gram_linear",
    "gram_rbf",
    "hsic_matrix",
]
