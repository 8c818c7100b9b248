"""Mixers: one file per hyper-connection variant, looked up by `hyper_conn_type` in `MIXERS`.

A variant is one file, in this package or anywhere else: a `Mixer` subclass under
`@register_mixer("name")` that declares what is particular to it as class attributes (see
`Mixer`); the config, loading, hooks, frozen mixing and the probes need nothing else."""

from . import hc, mhc, mhc_lite, residual  # noqa: F401  (registration side effects)
from .base import MIXERS, Mixer, MixingCoefficients, build_mixer, register_mixer, sinkhorn, sinkhorn_log

__all__ = [
    "MIXERS",
    "Mixer",
    "MixingCoefficients",
    "build_mixer",
    "register_mixer",
    "sinkhorn",
    "sinkhorn_log",
]
