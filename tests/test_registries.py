"""Registries are the source of truth and refuse collisions: a second class under a taken name is
an error naming both, never a silent replacement of the built-in."""
import pytest

from mhc_interp.probes import PROBES, Probe, ProbeResult, StreamUsage, register_probe, register_result
from mhc_interp.probes.base import RESULTS


def test_a_probe_name_taken_by_a_builtin_is_refused():
    class MyUsage(Probe):
        name = "stream_usage"

    with pytest.raises(ValueError, match="probe 'stream_usage' is already registered by "
                                         "mhc_interp.probes.stream_usage.StreamUsage"):
        register_probe(MyUsage)
    assert PROBES["stream_usage"] is StreamUsage


def test_a_result_class_name_taken_is_refused_and_a_new_one_registers():
    before = RESULTS["StreamUsageResult"]

    class StreamUsageResult(ProbeResult):
        pass

    with pytest.raises(ValueError, match="result class 'StreamUsageResult' is already registered"):
        register_result(StreamUsageResult)
    assert RESULTS["StreamUsageResult"] is before

    class FreshProbe(Probe):
        name = "fresh_probe_for_the_registry_test"

    try:
        assert register_probe(FreshProbe) is FreshProbe and register_probe(FreshProbe) is FreshProbe   # idempotent
        assert PROBES[FreshProbe.name] is FreshProbe
    finally:
        PROBES.pop(FreshProbe.name)
