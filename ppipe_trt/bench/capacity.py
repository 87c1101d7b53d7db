"""The capacity of a server: the largest offered rate at which a target fraction (99 %) of the
requests is answered within the SLO.

:func:`search_capacity` takes a probe (rate -> fraction within the SLO, one short load point)
and brackets the capacity by doubling (or halving) from a start rate, then narrows the bracket
by geometric bisection until it is within ``rel_precision`` or the probe budget is spent.  It
assumes the fraction falls as the rate grows; a noisy probe can only move the answer within
the bracket it found.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from ppipe_trt.bench.errors import BenchError


@dataclass(frozen=True, slots=True)
class CapacityProbe:
    """One probe: the offered rate and the fraction of requests answered within the SLO."""

    rate_rps: float
    within_slo: float
    passed: bool


@dataclass(frozen=True, slots=True)
class CapacityResult:
    """``capacity_rps``: the largest rate that passed; ``failed_rps``: the smallest that
    failed above it (None when the budget ran out before one failed)."""

    capacity_rps: float
    failed_rps: float | None
    target: float
    probes: tuple[CapacityProbe, ...]


def search_capacity(within_slo_at: Callable[[float], float], start_rps: float,
                    target: float = 0.99, max_probes: int = 8, rel_precision: float = 0.08,
                    min_rps: float = 0.5) -> CapacityResult:
    """Search the largest rate whose fraction within the SLO is >= ``target``, with at most
    ``max_probes`` calls of ``within_slo_at(rate_rps)``.  Raises :class:`BenchError` when even
    ``min_rps`` (halving from ``start_rps``) fails."""
    if not start_rps > 0 or max_probes < 2:
        raise BenchError(f"capacity search from {start_rps} req/s with {max_probes} probes; "
                         "expected a positive start rate and >= 2 probes")
    probes: list[CapacityProbe] = []

    def probe(rate: float) -> bool:
        fraction = within_slo_at(rate)
        probes.append(CapacityProbe(rate, fraction, fraction >= target))
        return probes[-1].passed

    low: float | None = None
    high: float | None = None
    rate = start_rps
    if probe(rate):
        low = rate
        while len(probes) < max_probes:
            rate *= 2
            if probe(rate):
                low = rate
            else:
                high = rate
                break
    else:
        high = rate
        while len(probes) < max_probes and rate / 2 >= min_rps:
            rate /= 2
            if probe(rate):
                low = rate
                break
            high = rate
        if low is None:
            tried = ", ".join(f"{p.rate_rps:.1f} -> {p.within_slo:.3f}" for p in probes)
            raise BenchError(f"no rate passed: {target:.0%} within the SLO failed from "
                             f"{start_rps:.1f} down to {rate:.1f} req/s (probes: {tried})")
    while high is not None and len(probes) < max_probes and high / low > 1 + rel_precision:
        middle = math.sqrt(low * high)
        if probe(middle):
            low = middle
        else:
            high = middle
    return CapacityResult(low, high, target, tuple(probes))


__all__ = ["CapacityProbe", "CapacityResult", "search_capacity"]
