"""Plans that follow the workload on the simulator: adaptive (``--adapt``), static, oracle.

* :class:`PlanCache`: plans for a cluster and model set by observed rates, rounded (shares
  to ``share_step``, the total to a ``total_step`` geometric grid) so that long traces
  solve the MILP (:func:`ppipe_trt.adapt.replan`) once per distinct mix.
* :class:`AdaptiveController`: the control loop of ``ppipe serve --adapt`` on the virtual
  clock -- every window it feeds the arrival counts to a
  :class:`~ppipe_trt.adapt.RateEstimator`, asks the :class:`~ppipe_trt.adapt.ReplanPolicy`
  (the EWMA decides whether), re-plans for the plain rates of the last windows (as the live
  loop does) and, when the new plan is better by
  ``min_gain`` (:func:`~ppipe_trt.adapt.swap_gain`), asks for a swap that switches after
  the solve and the added workers' start-up (:class:`~ppipe_trt.simulator.swap.SwapCosts`).
* :func:`simulate_scenario`: one run of a :class:`~ppipe_trt.simulator.scenarios.Scenario`
  at one scale, with per-window attainment and offered load, swap instants, requests moved.
* :func:`oracle_swaps`: the plan of each phase, switched in exactly at the phase's start.

Goodput comparisons of the three policies are in :mod:`ppipe_trt.simulator.replan_compare`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from ppipe_trt.adapt import AdaptOptions, RateEstimator, ReplanPolicy, replan, swap_gain
from ppipe_trt.errors import ConfigError, PPipeError
from ppipe_trt.plan import Plan
from ppipe_trt.profiles.types import ProfileSet
from ppipe_trt.simulator.engine import SimConfig, check_config, run_events
from ppipe_trt.simulator.scenarios import Scenario
from ppipe_trt.simulator.swap import PlanSwap, SwapCosts, SwapRecord


class PlanCache:
    """Plans of ``base``'s cluster and models for given rates (see the module doc).

    :meth:`plan_for` returns ``(plan, solve_s)``: ``solve_s`` is the wall time the MILP
    took when that plan was first solved.  ``solves`` counts MILP runs, ``hits`` cache hits,
    ``failures`` mixes the planner could not plan (the caller keeps its plan)."""

    def __init__(self, base: Plan, profiles: ProfileSet, share_step: float = 0.02,
                 total_step: float = 0.05, min_rate_rps: float = 1.0):
        self.base = base
        self.profiles = profiles
        self.share_step = share_step
        self.total_step = total_step
        self.min_rate_rps = min_rate_rps
        self._plans: dict[tuple, tuple[Plan, float]] = {}
        self.solves = 0
        self.hits = 0
        self.failures = 0
        self.solve_wall_s = 0.0

    def rounded(self, rates: Mapping[str, float]) -> tuple[tuple, dict[str, float]]:
        """(cache key, the rounded rates the planner is given)."""
        models = self.base.model_names
        r = [max(self.min_rate_rps, float(rates.get(m, 0.0))) for m in models]
        total = sum(r)
        grid = math.log1p(self.total_step)
        k_total = round(math.log(total) / grid)
        total_r = math.exp(k_total * grid)
        k_shares = tuple(max(1, round(x / total / self.share_step)) for x in r)
        norm = sum(k_shares)
        out = {m: max(self.min_rate_rps, total_r * k / norm) for m, k in zip(models, k_shares)}
        return (k_total, k_shares), out

    def plan_for(self, rates: Mapping[str, float]) -> tuple[Plan, float]:
        key, rounded = self.rounded(rates)
        hit = self._plans.get(key)
        if hit is not None:
            self.hits += 1
            return hit
        t0 = time.perf_counter()
        plan = replan(self.base, self.profiles, rounded,
                      arrival_rates_rps=rounded)   # the weights are (rounded) req/s
        solve_s = time.perf_counter() - t0
        self.solves += 1
        self.solve_wall_s += solve_s
        self._plans[key] = (plan, solve_s)
        return plan, solve_s


class AdaptiveController:
    """``ppipe serve --adapt``'s loop on the virtual clock (the engine's
    :class:`~ppipe_trt.simulator.engine.SwapController`)."""

    def __init__(self, plan: Plan, cache: PlanCache, options: AdaptOptions | None = None,
                 costs: SwapCosts = SwapCosts()):
        self.options = options or AdaptOptions()
        self.window_us = self.options.window_s * 1e6
        self.plan = plan
        self.cache = cache
        self.costs = costs
        self.estimator = RateEstimator(plan.model_names, self.options.half_life_s)
        self.policy = ReplanPolicy(plan, self.options)
        self.pending = False
        self.requests = 0        # re-plans asked for by the policy
        self.rejected = 0        # ... whose plan was not better by min_gain
        self.failed = 0          # ... the planner could not plan
        self.decisions: list[tuple[float, str]] = []

    def on_window(self, now_us: float, counts: Mapping[str, int]) -> PlanSwap | None:
        rates = self.estimator.update(counts, now_us)
        if self.pending or not self.estimator.ready:
            return None
        # as the live loop (ppipe_trt.serving.adaptive): the EWMA decides whether, the
        # plain rates of the last windows what to plan for
        req = self.policy.observe(rates, now_us, self.estimator.recent_rps)
        if req is None:
            return None
        self.requests += 1
        try:
            new, solve_s = self.cache.plan_for(req.weights)
        except PPipeError:
            self.failed += 1
            self.cache.failures += 1
            return None
        if new is self.plan or swap_gain(self.plan, new, req.weights) < self.options.min_gain:
            self.rejected += 1
            return None
        self.pending = True
        self.decisions.append((now_us, req.reason))
        return PlanSwap(now_us + 1e6 * self.costs.delay_s(solve_s), new, now_us, req.reason)

    def on_swapped(self, plan: Plan, now_us: float) -> None:
        self.plan = plan
        self.policy.plan_changed(plan, now_us)
        self.pending = False


def oracle_swaps(scenario: Scenario, scale_rps: float, cache: PlanCache,
                 costs: SwapCosts = SwapCosts(), segment_s: float | None = 600.0
                 ) -> tuple[Plan, list[PlanSwap]]:
    """The first segment's plan and a swap to each later segment's plan at its start (the
    oracle knows the phases: it solves and starts the workers ahead, so the switch is at the
    phase's start; overlaps on the GPUs are paid as in any swap).  A segment is a phase, or
    a ``segment_s`` piece of a modulated one; each is planned for its mean rates."""
    plans = []
    for a, b in scenario.segments(segment_s):
        rel = scenario.mean_relative(a, b)
        plans.append((a, cache.plan_for(dict(zip(scenario.models, scale_rps * rel)))))
    first = plans[0][1][0]
    swaps, prev = [], first
    for a, (p, solve_s) in plans[1:]:
        if p is not prev:
            swaps.append(PlanSwap(a * 1e6, p, a * 1e6 - 1e6 * costs.delay_s(solve_s),
                                  "oracle: next phase"))
            prev = p
    return first, swaps


@dataclass(frozen=True, slots=True)
class WindowSeries:
    """Per window of ``window_s`` from 0: ``offered_rps[model][k]`` (arrivals in window k
    over its length) and ``attainment[k]`` (requests arriving in window k answered in time,
    over those arriving; 1.0 for an empty window)."""

    window_s: float
    offered_rps: Mapping[str, tuple[float, ...]]
    attainment: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"window_s": self.window_s, "offered_rps": {m: list(v) for m, v in
                                                           self.offered_rps.items()},
                "attainment": list(self.attainment)}


@dataclass(frozen=True, slots=True)
class ScenarioResult:
    """One run of a scenario (see :func:`simulate_scenario`)."""

    label: str
    scenario: str
    scale_rps: float
    duration_s: float
    requests: int
    completed: int                       # in time
    per_model_attainment: Mapping[str, float]
    outcomes: Mapping[str, int]          # "ok", "late", drop reasons, "unresolved"
    answered_twice: int
    swaps: tuple[SwapRecord, ...]
    windows: WindowSeries
    plans_solved: int
    wall_s: float
    events: int
    replans: Mapping[str, int] = field(default_factory=dict)   # adaptive: asked/rejected/failed
    dispatch_log: list | None = field(default=None, repr=False)
    slots: Mapping | None = field(default=None, repr=False)
    busy: list | None = field(default=None, repr=False)

    @property
    def attainment(self) -> float:
        return self.completed / self.requests if self.requests else 1.0

    @property
    def mean_offered_rps(self) -> float:
        return self.requests / self.duration_s

    @property
    def moved(self) -> int:
        return sum(s.moved for s in self.swaps)

    def to_dict(self, windows: bool = False) -> dict:
        d = {"label": self.label, "scenario": self.scenario, "scale_rps": self.scale_rps,
             "duration_s": self.duration_s, "requests": self.requests,
             "attainment": self.attainment, "mean_offered_rps": self.mean_offered_rps,
             "per_model_attainment": dict(self.per_model_attainment),
             "outcomes": dict(self.outcomes), "answered_twice": self.answered_twice,
             "swaps": [{"at_s": s.at_us / 1e6, "decided_s": s.decided_us / 1e6,
                        "kept": s.kept, "added": s.added, "retired": s.retired,
                        "moved": s.moved, "reason": s.reason} for s in self.swaps],
             "moved": self.moved, "plans_solved": self.plans_solved,
             "replans": dict(self.replans),
             "wall_s": self.wall_s, "events": self.events}
        if windows:
            d["windows"] = self.windows.to_dict()
        return d


def simulate_scenario(plan: Plan, profiles: ProfileSet, scenario: Scenario, scale_rps: float,
                      *, config: SimConfig = SimConfig(), adapt: AdaptOptions | None = None,
                      cache: PlanCache | None = None, costs: SwapCosts = SwapCosts(),
                      swaps: Sequence[PlanSwap] = (), label: str = "",
                      window_s: float = 1.0, record: bool = False) -> ScenarioResult:
    """Serve ``scenario`` at ``scale_rps`` starting with ``plan``.

    ``adapt`` (the ``--adapt`` options) re-plans as the live control loop would, through
    ``cache`` (default: a fresh :class:`PlanCache` of ``plan``); ``swaps`` are switched at
    their times (the oracle's).  ``config`` gives the scheduling policy, seed, latency noise
    and link model (its load factor, rates, arrivals and duration are not used: the
    scenario sets them).  ``record`` keeps the dispatch log and busy intervals (tests)."""
    wall0 = time.perf_counter()
    check_config(config)
    if scenario.models != plan.model_names:
        raise ConfigError(f"scenario {scenario.name!r} is for models {list(scenario.models)}, "
                         f"the plan serves {list(plan.model_names)}")
    arrivals = scenario.arrivals_us(scale_rps, config.seed)
    end_us = scenario.duration_s * 1e6
    controller = None
    solves0 = cache.solves if cache else 0
    if adapt is not None:
        cache = cache or PlanCache(plan, profiles, min_rate_rps=adapt.min_rate_rps)
        solves0 = cache.solves
        controller = AdaptiveController(plan, cache, adapt, costs)
    run = run_events(plan, profiles, config, arrivals, end_us, swaps=swaps,
                     controller=controller, record=record)
    models = plan.model_names
    n = len(run.req_model)
    arr = np.asarray(run.req_arrival, dtype=float)
    mdl = np.asarray(run.req_model, dtype=np.int16)
    ok = np.fromiter((o == "ok" for o in run.outcome), dtype=bool, count=n)
    outcomes: dict[str, int] = {}
    for o in run.outcome:
        k = o or "unresolved"
        outcomes[k] = outcomes.get(k, 0) + 1
    nwin = max(1, int(math.ceil(scenario.duration_s / window_s)))
    win = np.minimum((arr / (window_s * 1e6)).astype(np.int64), nwin - 1)
    total = np.bincount(win, minlength=nwin)
    good = np.bincount(win[ok], minlength=nwin)
    att = np.where(total > 0, good / np.maximum(total, 1), 1.0)
    offered = {m: tuple((np.bincount(win[mdl == i], minlength=nwin) / window_s).tolist())
               for i, m in enumerate(models)}
    per_model = {}
    for i, m in enumerate(models):
        sel = mdl == i
        cnt = int(sel.sum())
        per_model[m] = float(ok[sel].sum()) / cnt if cnt else 1.0
    return ScenarioResult(
        label=label or ("adaptive" if adapt is not None else "oracle" if swaps else "static"),
        scenario=scenario.name, scale_rps=scale_rps, duration_s=scenario.duration_s,
        requests=n, completed=int(ok.sum()), per_model_attainment=per_model,
        outcomes=outcomes, answered_twice=run.answered_twice, swaps=tuple(run.swaps),
        windows=WindowSeries(window_s, offered, tuple(att.tolist())),
        plans_solved=(cache.solves - solves0) if cache else 0,
        wall_s=time.perf_counter() - wall0, events=run.events,
        replans={"asked": controller.requests, "rejected": controller.rejected,
                 "failed": controller.failed} if controller else {},
        dispatch_log=run.dispatch_log if record else None,
        slots=dict(run.slots) if record else None, busy=run.busy if record else None)
