"""The 99 %-within-SLO capacity search (ppipe_trt/bench/capacity.py) on fake servers."""

from __future__ import annotations

import pytest

from ppipe_trt.bench.capacity import search_capacity
from ppipe_trt.bench.errors import BenchError


def _server(capacity: float):
    """Fraction within the SLO of a server that keeps up to ``capacity`` req/s."""
    return lambda rate: 1.0 if rate <= capacity else max(0.0, capacity / rate - 0.02)


@pytest.mark.parametrize("start", [10.0, 100.0, 3000.0])
def test_finds_the_capacity_within_the_precision(start):
    result = search_capacity(_server(437.0), start, max_probes=12, rel_precision=0.05)
    assert result.capacity_rps <= 437.0 < result.failed_rps
    assert result.failed_rps / result.capacity_rps <= 1.05
    assert all(p.passed == (p.rate_rps <= 437.0) for p in result.probes)
    assert result.capacity_rps == max(p.rate_rps for p in result.probes if p.passed)


def test_stays_within_the_probe_budget():
    calls = []

    def probe(rate):
        calls.append(rate)
        return _server(437.0)(rate)

    result = search_capacity(probe, 50.0, max_probes=6)
    assert len(calls) == len(result.probes) == 6
    assert result.capacity_rps <= 437.0 < result.failed_rps


def test_a_server_that_never_passes_is_an_error():
    with pytest.raises(BenchError, match="no rate passed"):
        search_capacity(lambda rate: 0.5, 100.0, max_probes=5)


def test_a_server_that_never_fails_reports_no_failing_rate():
    result = search_capacity(lambda rate: 1.0, 10.0, max_probes=4)
    assert result.capacity_rps == 80.0 and result.failed_rps is None
