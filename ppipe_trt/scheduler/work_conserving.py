"""When waiting for a fuller batch cannot help: the reservation policy's work-conserving test.

PPipe's reservation policy (Alg. 1-2) holds a request that is alone in its queue until the
last moment at which a batch with it still meets the deadline.  Under load that wait forms
the planned batches; at low load it only adds latency.  :class:`WorkConservingRule` decides,
from an arrival-rate estimate and the model's capacity per batch size, whether the queued
requests may be dispatched now (or as soon as their route is free) instead:

    dispatch the ``n`` queued requests early  iff  nothing of the model is in flight
                                                  or rate <= max_load x capacity(n)

(the first test is the scheduler's: with no batch of the model running, no arrival can be
waiting behind one to join the queue, and holding only idles the pools -- a closed-loop
client whose next request waits for this answer, or a lull)

``capacity(n)`` (req/s) is what the model's pipelines serve if every batch has ``n``
requests (per pipeline the bottleneck stage's ``workers x n / latency(n)``, ``n`` capped at
the pipeline's planned batch; summed over pipelines).  With ``max_load`` well below 1 the
pools stay far from saturation even when every batch is as small as the queue is now, so the
early dispatch takes no capacity that later requests need; near the planned load
(``rate ~ capacity(planned)``, above ``max_load x capacity(n)`` for every ``n``) the rule
never fires and the policy is PPipe's.

With ``min_gain`` set, queued requests also go early when a fuller batch would not serve
materially more: ``capacity(planned) <= (1 + min_gain) x capacity(n)``.  Holding a request
for a fuller batch only pays where batching raises throughput (a GPU); where it does not (a
CPU worker, whose time per sample is flat in the batch size) the wait only spends the
request's slack, and a reservation made at the last moment has none left for a worker that
runs slower than its estimate.  Off (``None``) by default: PPipe's rule.

The rate is an exponentially decayed count of arrivals (time constant ``window_us``):
``level <- level x exp(-dt / window) + 1`` per arrival, ``rate = level / window``.  It is
told the arrival times; it never reads a clock.  Queued requests the rule holds are looked at
again when the decaying estimate would let them go (:meth:`WorkConservingRule.allowed_at`),
not only at the next event: a closed-loop client (its next request waits for this answer)
sends nothing while its request is held, and would otherwise wait for the last moment.
"""

from __future__ import annotations

import math
from typing import Sequence

from ppipe_trt.errors import ConfigError
from ppipe_trt.scheduler.tables import PipelineTable


def capacity_by_batch_rps(pipelines: Sequence[PipelineTable]) -> list[float]:
    """``out[n]`` (req/s, ``n`` = 1 .. largest planned batch; ``out[0]`` = 0): what the
    pipelines serve together when every batch holds ``n`` requests."""
    b_max = max((pt.planned_batch for pt in pipelines), default=0)
    out = [0.0] * (b_max + 1)
    for n in range(1, b_max + 1):
        total = 0.0
        for pt in pipelines:
            b = min(n, pt.planned_batch)
            cap = math.inf
            for st in pt.stages:
                lat = st.latency_us[b]
                if lat > 0:
                    cap = min(cap, len(st.worker_ids) * b * 1e6 / lat)
            total += 0.0 if cap == math.inf else cap
        out[n] = total
    return out


class WorkConservingRule:
    """Arrival-rate estimate and the early-dispatch test of one model (see module doc).

    ``max_load``: fraction of ``capacity(n)`` below which ``n`` queued requests may go early.
    ``window_us``: time constant of the rate estimate (microseconds).
    ``min_gain``: ``n`` queued requests may also go early when the planned batch serves at
    most ``1 + min_gain`` times what batches of ``n`` serve (``None``: never).
    """

    __slots__ = ("max_load", "window_us", "min_gain", "_capacity_rps", "_level",
                 "_level_at_us")

    def __init__(self, pipelines: Sequence[PipelineTable], max_load: float = 0.5,
                 window_us: float = 100_000.0, min_gain: float | None = None):
        if not 0.0 < max_load <= 1.0:
            raise ConfigError(f"work_conserving_max_load must be in (0, 1], got {max_load!r}")
        if not window_us > 0:
            raise ConfigError(f"work_conserving_window_us must be > 0, got {window_us!r}")
        if min_gain is not None and not min_gain >= 0.0:
            raise ConfigError(f"work_conserving_min_gain must be >= 0 or None, got "
                              f"{min_gain!r}")
        self.max_load = float(max_load)
        self.window_us = float(window_us)
        self.min_gain = None if min_gain is None else float(min_gain)
        self._capacity_rps = capacity_by_batch_rps(pipelines)
        self._level = 0.0
        self._level_at_us = -math.inf

    def set_pipelines(self, pipelines: Sequence[PipelineTable]) -> None:
        """Take the capacities from ``pipelines`` from now on (their latencies were
        re-measured); the rate estimate stays."""
        self._capacity_rps = capacity_by_batch_rps(pipelines)

    def observe(self, arrival_us: float) -> None:
        """Count one arrival at ``arrival_us`` (call in non-decreasing time order; an
        earlier time counts as the latest seen)."""
        if arrival_us > self._level_at_us:
            if self._level:
                self._level *= math.exp((self._level_at_us - arrival_us) / self.window_us)
            self._level_at_us = arrival_us
        self._level += 1.0

    def rate_rps(self, now_us: float) -> float:
        """The estimated arrival rate (req/s) at ``now_us``."""
        level = self._level
        if level and now_us > self._level_at_us:
            level *= math.exp((self._level_at_us - now_us) / self.window_us)
        return level * 1e6 / self.window_us

    def capacity_rps(self, n: int) -> float:
        """``capacity(n)`` (req/s); ``n`` beyond the largest planned batch counts as it."""
        caps = self._capacity_rps
        return caps[min(n, len(caps) - 1)] if n > 0 else 0.0

    def batching_gains_little(self, queued: int) -> bool:
        """Whether the planned batch serves at most ``1 + min_gain`` times what batches of
        ``queued`` serve (never without ``min_gain``)."""
        if self.min_gain is None or queued <= 0:
            return False
        caps = self._capacity_rps
        return caps[-1] <= (1.0 + self.min_gain) * self.capacity_rps(queued)

    def allows(self, queued: int, now_us: float) -> bool:
        """Whether ``queued`` requests may be dispatched before their batch is full."""
        return (self.rate_rps(now_us) <= self.max_load * self.capacity_rps(queued)
                or self.batching_gains_little(queued))

    def allowed_at(self, queued: int, now_us: float) -> float:
        """The earliest time (>= ``now_us``) at which :meth:`allows` holds for ``queued``
        requests if nothing else arrives: the estimate decays between arrivals, so a queue
        that no arrival fills (a closed-loop client waiting for this very answer) goes
        early once the estimate says the traffic is light, instead of waiting for its last
        moment; ``inf`` when no rate would allow it."""
        threshold = self.max_load * self.capacity_rps(queued)
        rate = self.rate_rps(now_us)
        if rate <= threshold or self.batching_gains_little(queued):
            return now_us
        if threshold <= 0.0:
            return math.inf
        # rate x exp(-dt / window) <= threshold; 1 us later, so that allows() holds then
        return now_us + self.window_us * math.log(rate / threshold) + 1.0
