"""Per-model arrival-rate estimates from cumulative arrival counts (EWMA over windows)."""

from __future__ import annotations

import math
from collections import deque
from typing import Iterable, Mapping

from ppipe_trt.errors import ConfigError


class RateEstimator:
    """EWMA of each model's arrival rate (requests/s), updated once per window.

    The caller samples its cumulative arrival counters (the runtime's statistics, the
    simulator's arrivals so far) and passes them to :meth:`update` with the time (us, the
    caller's clock); nothing is counted per request.  A window's rate is its count over its
    length; the estimate moves towards it with weight ``1 - 0.5 ** (window / half_life)``,
    so a step in the rate is half taken in after ``half_life_s``.  The first window's rate
    is taken as it is."""

    def __init__(self, models: Iterable[str], half_life_s: float = 5.0,
                 recent_windows: int = 3):
        if not half_life_s > 0:
            raise ConfigError(f"half_life_s must be > 0, got {half_life_s!r}")
        self.half_life_s = float(half_life_s)
        self._models = tuple(models)
        self._last_counts: dict[str, int] | None = None
        self._last_us = 0.0
        self._rates: dict[str, float] = {m: 0.0 for m in self._models}
        self._windows = 0
        self._recent: deque[tuple[float, dict[str, int]]] = deque(maxlen=recent_windows + 1)

    def update(self, counts: Mapping[str, int], now_us: float) -> dict[str, float]:
        """Take the cumulative arrival ``counts`` at ``now_us``; returns the new estimates.
        The first call only sets the baseline."""
        if self._last_counts is None:
            self._last_counts = {m: int(counts.get(m, 0)) for m in self._models}
            self._last_us = now_us
            self._recent.append((now_us, dict(self._last_counts)))
            return dict(self._rates)
        span_s = (now_us - self._last_us) / 1e6
        if span_s <= 0:
            return dict(self._rates)
        alpha = 1.0 - math.pow(0.5, span_s / self.half_life_s)
        for m in self._models:
            n = int(counts.get(m, 0))
            rate = (n - self._last_counts[m]) / span_s
            self._last_counts[m] = n
            self._rates[m] = rate if self._windows == 0 else \
                self._rates[m] + alpha * (rate - self._rates[m])
        self._windows += 1
        self._last_us = now_us
        self._recent.append((now_us, dict(self._last_counts)))
        return dict(self._rates)

    @property
    def recent_rps(self) -> dict[str, float]:
        """The plain rate over the last ``recent_windows`` windows (no smoothing): what the
        traffic is now, once a drift was confirmed (the EWMA lags a step behind)."""
        if len(self._recent) < 2:
            return dict(self._rates)
        (t0, c0), (t1, c1) = self._recent[0], self._recent[-1]
        span_s = (t1 - t0) / 1e6
        return {m: (c1[m] - c0[m]) / span_s for m in self._models} if span_s > 0 else \
            dict(self._rates)

    @property
    def rates_rps(self) -> dict[str, float]:
        """The current estimates (0 until two updates were made)."""
        return dict(self._rates)

    @property
    def ready(self) -> bool:
        """Whether at least one window has been measured."""
        return self._windows > 0
