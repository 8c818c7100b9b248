from .hooked_mhc import HookedMHC
from .mixers import MIXERS, Mixer, MixingCoefficients, register_mixer

__all__ = ["HookedMHC", "MIXERS", "Mixer", "MixingCoefficients", "register_mixer"]
