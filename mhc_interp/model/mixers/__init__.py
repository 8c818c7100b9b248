"""Mixers: one file per hyper-connection variant, looked up by `hyper_conn_type`."""
from .base import MIXERS, Mixer, MixingCoefficients, build_mixer, register_mixer, sinkhorn, sinkhorn_log
from . import residual, hc, mhc, mhc_lite  # noqa: F401  (registration side effects)

__all__ = ["MIXERS", "Mixer", "MixingCoefficients", "build_mixer", "register_mixer", "sinkhorn",
           "sinkhorn_log"]
