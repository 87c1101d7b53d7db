"""When to re-plan: the observed mix drifted from the plan's weights, or a model outgrew its
planned capacity -- for long enough, and not too soon after the last swap."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from ppipe_trt.errors import ConfigError
from ppipe_trt.plan import Plan


@dataclass(frozen=True, slots=True)
class AdaptOptions:
    """Knobs of the adaptive control loop (live and simulated).

    ``window_s``: how often rates are sampled; ``half_life_s``: the EWMA's half-life;
    ``drift_threshold``: re-plan when the total-variation distance between the observed mix
    and the plan's weights exceeds it (0..1); ``capacity_threshold``: ... or when a model's
    observed rate exceeds this fraction of its planned throughput; ``confirm_windows``: the
    condition must hold this many windows in a row (hysteresis against noise);
    ``min_interval_s``: at least this long between swaps; ``min_gain``: a new plan is
    swapped in only when it serves the observed rates at least this much better (relative
    gain of the worst model's capacity / rate, see :func:`~ppipe_trt.adapt.swap_gain`);
    ``min_rate_rps``: rates below it count as this (a model that is briefly idle keeps a
    share of the cluster)."""

    window_s: float = 1.0
    half_life_s: float = 3.0
    drift_threshold: float = 0.15
    capacity_threshold: float = 0.95
    confirm_windows: int = 3
    min_interval_s: float = 20.0
    min_gain: float = 0.05
    min_rate_rps: float = 1.0

    def __post_init__(self) -> None:
        for name in ("window_s", "half_life_s", "min_rate_rps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"adapt {name} must be > 0, got {getattr(self, name)!r}")
        if not 0 < self.drift_threshold < 1:
            raise ConfigError(f"adapt drift_threshold must be in (0, 1), got "
                              f"{self.drift_threshold!r}")
        if not self.capacity_threshold > 0:
            raise ConfigError(f"adapt capacity_threshold must be > 0, got "
                              f"{self.capacity_threshold!r}")
        if self.confirm_windows < 1 or self.min_interval_s < 0 or self.min_gain < 0:
            raise ConfigError("adapt confirm_windows must be >= 1, min_interval_s and "
                              "min_gain >= 0")


@dataclass(frozen=True, slots=True)
class ReplanRequest:
    """Ask for a plan with these ``weights`` (by model), because of ``reason``."""

    weights: dict[str, float]
    reason: str
    observed_rps: dict[str, float] = field(default_factory=dict)
    at_us: float = 0.0


def mix_drift(rates: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Total-variation distance (0..1) between the mix of ``rates`` and of ``weights``."""
    rs, ws = sum(rates.values()), sum(weights.values())
    if rs <= 0 or ws <= 0:
        return 0.0
    return 0.5 * sum(abs(rates.get(m, 0.0) / rs - weights.get(m, 0.0) / ws)
                     for m in set(rates) | set(weights))


class ReplanPolicy:
    """Decides, once per window, whether to ask for a new plan (:meth:`observe`).

    Call :meth:`plan_changed` when a plan is swapped in (by this policy or an operator)."""

    def __init__(self, plan: Plan, options: AdaptOptions | None = None, now_us: float = 0.0):
        self.options = options or AdaptOptions()
        self._streak = 0
        self.plan_changed(plan, now_us)

    def plan_changed(self, plan: Plan, now_us: float) -> None:
        self._weights = {m.model: m.weight for m in plan.models}
        self._capacity = {m.model: m.throughput_rps for m in plan.models}
        self._changed_us = now_us
        self._streak = 0

    def observe(self, rates_rps: Mapping[str, float], now_us: float,
                recent_rps: Mapping[str, float] | None = None) -> ReplanRequest | None:
        """Given the current rate estimates (EWMA: they decide *whether*): a
        :class:`ReplanRequest` when the plan should change, else ``None``.  Its weights are
        ``recent_rps`` when given (the plain rates of the last windows: *what* to plan for,
        the traffic as it is now rather than the lagging average), else the estimates."""
        o = self.options
        rates = {m: max(o.min_rate_rps, float(rates_rps.get(m, 0.0))) for m in self._weights}
        drift = mix_drift(rates, self._weights)
        over = [m for m, r in rates.items()
                if self._capacity.get(m, 0.0) > 0 and r > o.capacity_threshold * self._capacity[m]]
        reason = None
        if drift > o.drift_threshold:
            reason = f"mix drifted {drift:.2f} from the plan's weights (threshold " \
                     f"{o.drift_threshold:.2f})"
        elif over:
            reason = "demand above {:.0f} % of planned capacity: {}".format(
                100 * o.capacity_threshold,
                ", ".join(f"{m} {rates[m]:.0f}/{self._capacity[m]:.0f} req/s" for m in over))
        if reason is None:
            self._streak = 0
            return None
        self._streak += 1
        if self._streak < o.confirm_windows or \
                (now_us - self._changed_us) / 1e6 < o.min_interval_s:
            return None
        self._streak = 0
        if recent_rps is not None:
            rates = {m: max(o.min_rate_rps, float(recent_rps.get(m, 0.0)))
                     for m in self._weights}
        return ReplanRequest(rates, reason, dict(recent_rps or rates_rps), now_us)
