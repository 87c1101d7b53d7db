"""Counters the runtime keeps for the metrics endpoint (plain data; no Prometheus here)."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from dataclasses import dataclass, field

#: Upper bounds (seconds) of the end-to-end latency histogram buckets.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                     0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)


@dataclass(slots=True)
class Histogram:
    """Cumulative-on-read histogram: ``counts[i]`` = observations in bucket ``i`` (the last
    one is +Inf)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, count in zip(list(self.bounds) + [float("inf")], self.counts):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass(slots=True)
class ModelCounters:
    requests: int = 0
    completions: int = 0
    within_deadline: int = 0
    failures: int = 0
    drops: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    latency_s: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))
    batch_sizes: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    queue_us_total: float = 0.0


class RuntimeStats:
    """Per-model counters, updated from the runtime loop and worker threads."""

    def __init__(self, models: list[str]):
        self._lock = threading.Lock()
        self._models = {m: ModelCounters() for m in models}

    def request(self, model: str) -> None:
        with self._lock:
            self._models[model].requests += 1

    def drop(self, model: str, reason: str) -> None:
        with self._lock:
            self._models[model].drops[reason] += 1

    def failure(self, model: str, n: int = 1) -> None:
        with self._lock:
            self._models[model].failures += n

    def batch(self, model: str, size: int) -> None:
        with self._lock:
            self._models[model].batch_sizes[size] += 1

    def completion(self, model: str, latency_us: float, met_deadline: bool) -> None:
        value = latency_us / 1e6
        with self._lock:
            c = self._models[model]
            c.completions += 1
            c.within_deadline += int(met_deadline)
            hist = c.latency_s  # Histogram.observe, inline: one call per answered request
            hist.counts[bisect.bisect_left(hist.bounds, value)] += 1
            hist.total += value

    def completions(self, model: str, arrivals_us: list[float], finish_us: float,
                    deadlines_us: list[float]) -> None:
        """:meth:`completion` of the requests of one batch, all finished at ``finish_us``."""
        with self._lock:
            c = self._models[model]
            c.completions += len(arrivals_us)
            hist = c.latency_s
            within = 0
            for arrival, deadline in zip(arrivals_us, deadlines_us):
                within += finish_us <= deadline
                hist.observe((finish_us - arrival) / 1e6)
            c.within_deadline += within

    def snapshot(self) -> dict[str, ModelCounters]:
        """A deep copy, safe to read without the lock."""
        with self._lock:
            return {
                m: ModelCounters(c.requests, c.completions, c.within_deadline, c.failures,
                                 dict(c.drops), Histogram(c.latency_s.bounds,
                                                          list(c.latency_s.counts),
                                                          c.latency_s.total),
                                 dict(c.batch_sizes))
                for m, c in self._models.items()}
