"""Attribution patching for multi-stream models: gradient estimates of activation patching
(AtP, integrated gradients) over (sublayer, stream[, position]) and of patching each sublayer's
mixing coefficients. `core` holds the gradient machinery, `probe` the registered probe."""
from .core import Gradients, atp_gradients, ig_alphas, ig_gradients, mixing_effects, site_effects
from .probe import METHODS, AttributionPatching, AttributionResult, attribution_patching

__all__ = ["AttributionPatching", "AttributionResult", "attribution_patching", "METHODS", "Gradients",
           "atp_gradients", "ig_gradients", "ig_alphas", "site_effects", "mixing_effects"]
