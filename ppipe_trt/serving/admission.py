"""Overload control at the door: admit what the host can serve, refuse the rest at once.

The schedulers see a request from the moment it is admitted; what happens before (the
bytes waiting in the socket, the front end's event loop parsing them) and after (the answer
waiting to be written) they cannot see.  On a host whose cores the workers share with the
front end (a CPU server, a GPU server's host threads), an offered load past capacity keeps
every worker busy, the front end falls behind, and every request -- accepted or not --
waits there: the schedulers still meet their deadlines while clients see answers hundreds
of milliseconds late, and goodput collapses.

:class:`AdmissionControl` measures that wait where it happens -- how late a timer on the
front end's event loop runs (its *lag*: a callback ready now waits behind everything already
queued on the loop) -- and keeps it small by limiting the rate of admitted requests
(additive increase, multiplicative decrease, as TCP and adaptive-concurrency limiters do):

* every ``interval_us`` the mean lag of the probes run in it is compared with
  ``target_lag_us`` (one long pause -- a collection, a first request's set-up -- is no
  overload: a mean over a busy interval is);
* above it in ``confirm`` intervals in a row, when at least ``min_rate_rps`` were admitted over the interval (a lag with
  little traffic -- a start-up, a collection -- is no overload that refusing could cure),
  the limit becomes ``decrease x`` the rate admitted while it lasted (or ``decrease x``
  itself, if that is less), and again after every further interval of it;
* at or below half of it, a limit grows by ``increase`` of itself, or of the offered rate if
  that is more, per interval, and is lifted once it is twice what is offered;
* a request over the limit (a token bucket holding ``burst_s`` seconds of it) is refused at
  once, which costs the front end a fraction of serving it.

The measured lag is also what an admitted request has probably waited already: the runtime
takes it off the request's budget (:attr:`AdmissionControl.lag_us`).  It never reads a clock:
it is told the time.  One instance per runtime; called on the front end's event-loop thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ppipe_trt.errors import ConfigError


@dataclass(frozen=True, slots=True)
class AdmissionOptions:
    """Knobs of :class:`AdmissionControl` (times in microseconds)."""

    target_lag_us: float = 4000.0
    interval_us: float = 50_000.0
    probe_every_us: float = 5000.0
    decrease: float = 0.9
    increase: float = 0.03
    burst_s: float = 0.2
    min_rate_rps: float = 20.0
    confirm: int = 3

    def __post_init__(self):
        if not self.target_lag_us > 0 or not self.interval_us > 0 or not self.probe_every_us > 0:
            raise ConfigError("admission target_lag_us, interval_us and probe_every_us must "
                              "be > 0")
        if self.confirm < 1:
            raise ConfigError(f"admission confirm must be >= 1, got {self.confirm!r}")
        if not 0.0 < self.decrease < 1.0 or not self.increase > 0.0:
            raise ConfigError(f"admission decrease must be in (0, 1) and increase > 0, got "
                              f"{self.decrease!r}, {self.increase!r}")


class AdmissionControl:
    """The admission limit of one front end (see module doc)."""

    __slots__ = ("options", "limit_rps", "lag_us", "_window_start_us", "_lag_sum_us",
                 "_probes", "_admitted", "_offered", "_tokens", "_tokens_at_us", "refused",
                 "_over", "_over_admitted", "_over_span_us")

    def __init__(self, options: AdmissionOptions | None = None):
        self.options = options or AdmissionOptions()
        #: the admission rate limit (req/s), ``inf`` while the front end keeps up
        self.limit_rps = math.inf
        #: the front end's lag (us): the mean of the last full interval's probes
        self.lag_us = 0.0
        self._window_start_us = -math.inf
        self._lag_sum_us = 0.0
        self._probes = 0
        self._over = 0   # intervals in a row above the target, what they admitted, their span
        self._over_admitted = 0
        self._over_span_us = 0.0
        self._admitted = 0
        self._offered = 0
        self._tokens = 0.0
        self._tokens_at_us = 0.0
        #: requests refused by the limit since start
        self.refused = 0

    def observe_lag(self, lag_us: float, now_us: float) -> None:
        """A probe timer due at ``now_us - lag_us`` ran at ``now_us``."""
        self._lag_sum_us += lag_us
        self._probes += 1
        self._roll(now_us)

    def admit(self, now_us: float) -> bool:
        """Whether a request arriving at ``now_us`` may be admitted (counts it either way)."""
        self._offered += 1
        limit = self.limit_rps
        if limit == math.inf:
            self._admitted += 1
            return True
        tokens = self._tokens + (now_us - self._tokens_at_us) * limit / 1e6
        cap = max(1.0, limit * self.options.burst_s)
        if tokens > cap:
            tokens = cap
        self._tokens_at_us = now_us
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            self._admitted += 1
            return True
        self._tokens = tokens
        self.refused += 1
        return False

    def _roll(self, now_us: float) -> None:
        opt = self.options
        start = self._window_start_us
        if start == -math.inf:
            self._window_start_us = now_us
            return
        span = now_us - start
        if span < opt.interval_us:
            return
        lag = self._lag_sum_us / max(1, self._probes)
        admitted_rps = self._admitted * 1e6 / span
        offered_rps = self._offered * 1e6 / span
        if lag > opt.target_lag_us:
            self._over += 1
            self._over_admitted += self._admitted
            self._over_span_us += span
        else:
            self._over = self._over_admitted = 0
            self._over_span_us = 0.0
        if self._over:
            # what was admitted while the lag lasted, not in one short interval
            admitted_rps = self._over_admitted * 1e6 / self._over_span_us
            if self._over >= opt.confirm and admitted_rps >= opt.min_rate_rps:
                cut = opt.decrease * min(self.limit_rps, admitted_rps)
                if cut < self.limit_rps:
                    self.limit_rps = cut
                    self._tokens = min(self._tokens, max(1.0, cut * opt.burst_s))
                # a lag that goes on is looked at again after one more interval
                self._over, self._over_admitted, self._over_span_us = opt.confirm - 1, 0, 0.0
        elif lag <= 0.5 * opt.target_lag_us and self.limit_rps != math.inf:
            self.limit_rps += opt.increase * max(self.limit_rps, offered_rps)
            if self.limit_rps > 2.0 * offered_rps:
                self.limit_rps = math.inf
        self.lag_us = lag
        self._window_start_us = now_us
        self._lag_sum_us = 0.0
        self._probes = 0
        self._admitted = self._offered = 0

    def status(self) -> dict:
        """JSON-ready: the limit (``None`` while lifted), the last interval's lag and the
        refusals so far."""
        return {"limit_rps": None if self.limit_rps == math.inf else round(self.limit_rps, 1),
                "front_end_lag_ms": round(self.lag_us / 1000.0, 2),
                "target_lag_ms": self.options.target_lag_us / 1000.0,
                "refused": self.refused}
