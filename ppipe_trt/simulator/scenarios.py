"""Workload-shift scenarios: per-model arrival-rate curves over time, and their arrivals.

A :class:`Scenario` gives each model a *relative* rate curve; ``scale_rps`` turns it into
requests per second (``rate_i(t) = scale_rps x relative_i(t)``).  A curve is a sequence of
:class:`Phase` s, each with constant relative rates, optionally modulated by a diurnal
sinusoid (``1 + amplitude x sin(2 pi t / period + offset_i)``, each model its own offset).
Arrivals are a non-homogeneous Poisson process drawn by thinning (Lewis and Shedler): a
homogeneous process at the phase's peak rate, each arrival kept with probability
``rate(t) / peak``; seeded per model, so a run is a pure function of its inputs.

Builders: :func:`rotating` (the weights move one model on every period), :func:`step`
(one model's rate x ``factor`` over an interval), :func:`diurnal` (a sinusoid per model,
offsets spread over the period), and :func:`shifts` (the acceptance scenario of issue #11:
rotation, a x3 step on one model, another rotation and back, four shifts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ppipe_trt.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Phase:
    """``[start_s, end_s)`` at relative rates ``relative`` (per model, scenario order)."""

    start_s: float
    end_s: float
    relative: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Scenario:
    """Relative rate curves of ``models`` over ``[0, duration_s)`` (see the module doc).

    ``diurnal_amplitude`` (0 = none) and ``diurnal_period_s`` modulate every phase; model
    ``i``'s sinusoid is offset by ``2 pi i / len(models)``."""

    name: str
    models: tuple[str, ...]
    phases: tuple[Phase, ...]
    diurnal_amplitude: float = 0.0
    diurnal_period_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.phases:
            raise ConfigError(f"scenario {self.name!r} has no phases")
        t = 0.0
        for p in self.phases:
            if p.start_s != t or not p.end_s > p.start_s:
                raise ConfigError(f"scenario {self.name!r}: phases must tile [0, end) in "
                                  f"order; got [{p.start_s}, {p.end_s}) after {t}")
            if len(p.relative) != len(self.models) or min(p.relative) < 0:
                raise ConfigError(f"scenario {self.name!r}: phase at {p.start_s} s has "
                                  f"{len(p.relative)} rates >= 0 expected "
                                  f"{len(self.models)}: {p.relative}")
            t = p.end_s
        if not 0 <= self.diurnal_amplitude < 1:
            raise ConfigError(f"diurnal amplitude must be in [0, 1), got "
                              f"{self.diurnal_amplitude}")
        if self.diurnal_amplitude and not self.diurnal_period_s > 0:
            raise ConfigError("a diurnal scenario needs diurnal_period_s > 0")

    @property
    def duration_s(self) -> float:
        return self.phases[-1].end_s

    @property
    def shifts(self) -> int:
        """Phase boundaries where the relative rates change."""
        return sum(1 for a, b in zip(self.phases, self.phases[1:]) if a.relative != b.relative)

    def relative_at(self, t_s: np.ndarray | float) -> np.ndarray:
        """Relative rates at times ``t_s``: shape ``(len(models), len(t_s))``."""
        t = np.atleast_1d(np.asarray(t_s, dtype=float))
        starts = np.array([p.start_s for p in self.phases])
        idx = np.clip(np.searchsorted(starts, t, side="right") - 1, 0, len(self.phases) - 1)
        base = np.array([p.relative for p in self.phases]).T[:, idx]
        return base * self._modulation(t)

    def _modulation(self, t: np.ndarray) -> np.ndarray:
        if not self.diurnal_amplitude:
            return np.ones((len(self.models), len(t)))
        n = len(self.models)
        off = 2 * math.pi * np.arange(n)[:, None] / n
        return 1.0 + self.diurnal_amplitude * np.sin(
            2 * math.pi * t[None, :] / self.diurnal_period_s + off)

    def mean_relative(self, start_s: float = 0.0, end_s: float | None = None,
                      step_s: float = 1.0) -> np.ndarray:
        """Each model's mean relative rate over ``[start_s, end_s)`` (midpoint rule on a
        ``step_s`` grid; exact for phases without modulation)."""
        end_s = self.duration_s if end_s is None else end_s
        n = max(1, int(math.ceil((end_s - start_s) / step_s)))
        t = start_s + (np.arange(n) + 0.5) * (end_s - start_s) / n
        return self.relative_at(t).mean(axis=1)

    def segments(self, segment_s: float | None = None) -> list[tuple[float, float]]:
        """Intervals an oracle plans for: the phases, each cut into pieces of at most
        ``segment_s`` when the rates are modulated (``None``: the phases as they are)."""
        out = []
        for p in self.phases:
            if self.diurnal_amplitude and segment_s:
                n = max(1, int(math.ceil((p.end_s - p.start_s) / segment_s)))
                edges = np.linspace(p.start_s, p.end_s, n + 1)
                out.extend((float(a), float(b)) for a, b in zip(edges, edges[1:]))
            else:
                out.append((p.start_s, p.end_s))
        return out

    def time_scaled(self, factor: float) -> "Scenario":
        """The same curves played ``factor`` times faster (durations divided by it)."""
        if not factor > 0:
            raise ConfigError(f"time scale factor must be > 0, got {factor}")
        return Scenario(f"{self.name}/{factor:g}", self.models,
                        tuple(Phase(p.start_s / factor, p.end_s / factor, p.relative)
                              for p in self.phases),
                        self.diurnal_amplitude, self.diurnal_period_s / factor)

    def arrivals_us(self, scale_rps: float, seed: int = 0,
                    duration_s: float | None = None) -> list[list[float]]:
        """Arrival times (us, ascending) per model at ``scale_rps``, by thinning."""
        end_s = self.duration_s if duration_s is None else min(duration_s, self.duration_s)
        out = []
        peak_mod = 1.0 + self.diurnal_amplitude
        for i in range(len(self.models)):
            rng = np.random.default_rng([seed, 7001, i])
            chunks = []
            for p in self.phases:
                if p.start_s >= end_s:
                    break
                hi = min(p.end_s, end_s)
                peak = scale_rps * p.relative[i] * peak_mod
                if peak <= 0:
                    continue
                n = rng.poisson(peak * (hi - p.start_s))
                t = np.sort(rng.uniform(p.start_s, hi, n))
                if self.diurnal_amplitude:
                    keep = rng.uniform(0.0, 1.0, n) * peak_mod < self._modulation(t)[i]
                    t = t[keep]
                chunks.append(t)
            t = np.concatenate(chunks) if chunks else np.zeros(0)
            out.append((t * 1e6).tolist())
        return out


def _check(models: Sequence[str], weights: Sequence[float]) -> tuple[tuple[str, ...],
                                                                       tuple[float, ...]]:
    if len(models) != len(weights) or not models:
        raise ConfigError(f"{len(models)} models but {len(weights)} weights; expected one "
                          "weight per model")
    return tuple(models), tuple(float(w) for w in weights)


def rotating(models: Sequence[str], weights: Sequence[float], duration_s: float,
             period_s: float) -> Scenario:
    """Weights rotate by one model every ``period_s`` (model i takes model i+1's weight)."""
    models, w = _check(models, weights)
    phases, t, k = [], 0.0, 0
    while t < duration_s:
        end = min(duration_s, t + period_s)
        phases.append(Phase(t, end, tuple(w[(i + k) % len(w)] for i in range(len(w)))))
        t, k = end, k + 1
    return Scenario("rotating", models, tuple(phases))


def step(models: Sequence[str], weights: Sequence[float], duration_s: float, model: int = 0,
         factor: float = 3.0, start_s: float | None = None,
         end_s: float | None = None) -> Scenario:
    """Model ``model``'s rate times ``factor`` over ``[start_s, end_s)`` (default: the
    middle third)."""
    models, w = _check(models, weights)
    a = duration_s / 3 if start_s is None else start_s
    b = 2 * duration_s / 3 if end_s is None else end_s
    if not 0 <= a < b <= duration_s:
        raise ConfigError(f"step interval [{a}, {b}) must lie in [0, {duration_s})")
    hi = tuple(x * factor if i == model else x for i, x in enumerate(w))
    phases = [Phase(s, e, r) for s, e, r in ((0.0, a, w), (a, b, hi), (b, duration_s, w))
              if e > s]
    return Scenario(f"step x{factor:g}", models, tuple(phases))


def diurnal(models: Sequence[str], weights: Sequence[float], duration_s: float,
            amplitude: float = 0.5, period_s: float | None = None) -> Scenario:
    """Each model's rate follows ``weight x (1 + amplitude sin(...))`` over one period
    (default: the whole duration), offsets spread so that the mix keeps changing."""
    models, w = _check(models, weights)
    return Scenario("diurnal", models, (Phase(0.0, duration_s, w),), amplitude,
                    period_s or duration_s)


def shifts(models: Sequence[str], weights: Sequence[float], duration_s: float = 7200.0,
           step_model: int = 0, factor: float = 3.0) -> Scenario:
    """Five equal phases, four shifts: the base weights; rotated by one; model
    ``step_model`` at ``factor`` x its base rate; rotated by two; the base again."""
    models, w = _check(models, weights)
    n = len(w)
    rot = lambda k: tuple(w[(i + k) % n] for i in range(n))   # noqa: E731
    hi = tuple(x * factor if i == step_model else x for i, x in enumerate(w))
    rel = [w, rot(1), hi, rot(2), w]
    cut = duration_s / len(rel)
    return Scenario("shifts", models, tuple(Phase(k * cut, (k + 1) * cut if k < len(rel) - 1
                                                  else duration_s, r)
                                            for k, r in enumerate(rel)))


SCENARIOS = ("shifts", "rotating", "step", "diurnal")


def build_scenario(name: str, models: Sequence[str], weights: Sequence[float],
                   duration_s: float) -> Scenario:
    """A scenario by name (``ppipe simulate --scenario``) with the builders' defaults
    (rotating: a period of a fifth of the duration)."""
    if name == "shifts":
        return shifts(models, weights, duration_s)
    if name == "rotating":
        return rotating(models, weights, duration_s, duration_s / 5)
    if name == "step":
        return step(models, weights, duration_s)
    if name == "diurnal":
        return diurnal(models, weights, duration_s)
    raise ConfigError(f"unknown scenario {name!r}; expected one of {SCENARIOS}")
