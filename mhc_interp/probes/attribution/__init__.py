"""Attribution patching for multi-stream models: gradient estimates of activation patching
(AtP, integrated gradients) over (sublayer, stream[, position]), of patching each sublayer's
mixing coefficients, and of stream edges (writer -> stream -> reader). `core` holds the gradient
machinery, `probe` the registered probe, `mixers` / `edges` the exact oracles, `compare` the
fidelity measures, `rescue` the approximate ablation-and-rescue map."""

from .compare import fidelity
from .core import Gradients, atp_gradients, ig_alphas, ig_gradients, mixing_effects, site_effects
from .edges import EdgeResult, edge_attribution, exact_edge_patching
from .mixers import exact_mixer_patching
from .probe import METHODS, AttributionPatching, AttributionResult, attribution_patching
from .rescue import ApproxAblateRescue, approximate_rescue, exact_rescue_forwards, rescue_fidelity

__all__ = [
    "AttributionPatching",
    "AttributionResult",
    "attribution_patching",
    "METHODS",
    "Gradients",
    "atp_gradients",
    "ig_gradients",
    "ig_alphas",
    "site_effects",
    "mixing_effects",
    "EdgeResult",
    "edge_attribution",
    "exact_edge_patching",
    "exact_mixer_patching",
    "fidelity",
    "ApproxAblateRescue",
    "approximate_rescue",
    "exact_rescue_forwards",
    "rescue_fidelity",
]
