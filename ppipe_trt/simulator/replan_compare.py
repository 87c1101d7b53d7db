"""Goodput of static, adaptive and oracle plans on a workload-shift scenario (issue #11).

*Goodput at 99 %* of a policy: the largest scale of the scenario's rate curve at which the
attainment over the whole trace (all models, all requests) is at least ``target``, given as
the mean offered load at that scale (req/s).  The policies:

* ``static``: the plan for the trace's average mix, all along;
* ``adaptive``: the same plan at the start, then ``--adapt``'s control loop
  (:class:`~ppipe_trt.simulator.adaptive.AdaptiveController`);
* ``oracle``: the plan of each phase, switched in at the phase's start (same swap
  mechanics: retiring workers finish their batches, added workers wait for their GPU share).

Every plan is solved by the real MILP for the rates at the scale evaluated (the batching
delay depends on them), through one :class:`~ppipe_trt.simulator.adaptive.PlanCache`.

Cost: a simulation handles about 40 000 requests per wall second, so a 2-hour trace at
thousands of req/s takes minutes.  The search therefore runs in two stages: a bisection on
the scenario played ``search_time_scale`` times faster (same phases and shifts, shorter),
then ``full_steps`` runs on the full-length trace around the value found (each moves the
scale by ``full_step``: up after a pass, down after a failure; the goodput is the largest
passing scale of these full-length runs).  The faster play penalises the adaptive policy
(its detection lag is the same in seconds while the phases are shorter), so its
full-length runs start from ``adaptive_start`` x the oracle's goodput when that is higher.
Every run is returned.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Callable, Mapping

from ppipe_trt.adapt import AdaptOptions
from ppipe_trt.errors import ConfigError
from ppipe_trt.plan import Plan
from ppipe_trt.profiles.types import ProfileSet
from ppipe_trt.simulator.adaptive import (PlanCache, ScenarioResult, oracle_swaps,
                                          simulate_scenario)
from ppipe_trt.simulator.engine import SimConfig
from ppipe_trt.simulator.scenarios import Scenario, build_scenario
from ppipe_trt.simulator.swap import SwapCosts

POLICIES = ("static", "adaptive", "oracle")


def run_policy(policy: str, base: Plan, profiles: ProfileSet, scenario: Scenario,
               scale_rps: float, cache: PlanCache, *, config: SimConfig = SimConfig(),
               options: AdaptOptions | None = None, costs: SwapCosts = SwapCosts(),
               oracle_segment_s: float | None = 600.0, record: bool = False
               ) -> ScenarioResult:
    """One run of ``policy`` ("static", "adaptive" or "oracle") on ``scenario`` at
    ``scale_rps``; plans come from ``cache`` (a cache of ``base``)."""
    if policy not in POLICIES:
        raise ConfigError(f"unknown re-plan policy {policy!r}; expected one of {POLICIES}")
    if policy == "oracle":
        first, swaps = oracle_swaps(scenario, scale_rps, cache, costs, oracle_segment_s)
        return simulate_scenario(first, profiles, scenario, scale_rps, config=config,
                                 swaps=swaps, label="oracle", record=record)
    mean = dict(zip(scenario.models, scale_rps * scenario.mean_relative()))
    static, _ = cache.plan_for(mean)
    if policy == "static":
        return simulate_scenario(static, profiles, scenario, scale_rps, config=config,
                                 label="static", record=record)
    return simulate_scenario(static, profiles, scenario, scale_rps, config=config,
                             adapt=options or AdaptOptions(), cache=cache, costs=costs,
                             label="adaptive", record=record)


def planned_scale(policy: str, scenario: Scenario, scale_rps: float, cache: PlanCache,
                  oracle_segment_s: float | None = 600.0) -> float:
    """The largest scale the plans' capacities allow (every model's planned throughput at
    least its rate in every segment); "adaptive" is given the oracle's."""
    segs = scenario.segments(oracle_segment_s)
    best = float("inf")
    mean = dict(zip(scenario.models, scale_rps * scenario.mean_relative()))
    static, _ = cache.plan_for(mean)
    for a, b in segs:
        rel = scenario.mean_relative(a, b)
        plan = static if policy == "static" else \
            cache.plan_for(dict(zip(scenario.models, scale_rps * rel)))[0]
        for m, r in zip(scenario.models, rel):
            if r > 0:
                best = min(best, plan.model(m).throughput_rps / r)
    return best


def search_goodput(run_at: Callable[[float], ScenarioResult], guess: float, *,
                   target: float, steps: int, step: float
                   ) -> tuple[float | None, list[ScenarioResult]]:
    """The largest scale passing ``target`` found in ``steps`` runs: from ``guess``, move
    by ``step`` (relative) up after a pass and down after a failure until a pass and a
    failure bracket it, then bisect.  ``None`` when no run passed."""
    runs: list[ScenarioResult] = []
    lo = hi = None
    s = guess
    for _ in range(steps):
        r = run_at(s)
        runs.append(r)
        if r.attainment >= target:
            lo = s if lo is None else max(lo, s)
        else:
            hi = s if hi is None else min(hi, s)
        if lo is not None and hi is not None:
            s = 0.5 * (lo + hi)
        elif lo is not None:
            s = lo * (1 + step)
        else:
            s = hi * (1 - step)
    return lo, runs


def compare_policies(profiles: ProfileSet, base: Plan, *, scenario: Scenario | None = None,
                     scenario_name: str = "shifts", duration_s: float = 7200.0,
                     weights: Mapping[str, float] | None = None,
                     policies: tuple[str, ...] = POLICIES, target: float = 0.99,
                     search_time_scale: float = 10.0, search_steps: int = 4,
                     search_step: float = 0.06, full_steps: int = 2, full_step: float = 0.02,
                     adaptive_start: float = 0.97,
                     costs: SwapCosts = SwapCosts(solve_s=1.0),
                     options: AdaptOptions | None = None, config: SimConfig = SimConfig(),
                     oracle_segment_s: float | None = 600.0,
                     progress: Callable[[str], None] | None = None,
                     keep_results: bool = False) -> dict:
    """Goodput at ``target`` attainment of each policy on ``scenario`` (default: the
    ``scenario_name`` scenario of ``duration_s`` over ``base``'s models, weighted by
    ``weights`` or ``base``'s weights) on ``base``'s cluster (see the module doc).

    Returns a JSON-able dict: ``goodput_rps`` and ``goodput_scale_rps`` per policy,
    ``adaptive_over_static``, ``adaptive_over_oracle`` (``None`` when a goodput is
    missing), ``swaps`` and ``moved`` per policy at its goodput, every run made
    (``runs``), plan-cache counts and the wall time; with ``keep_results`` also
    ``results`` (policy -> :class:`ScenarioResult` of its final full-length run, not JSON).
    """
    wall0 = time.perf_counter()
    say = progress or (lambda _msg: None)
    if scenario is None:
        w = weights or {m.model: m.weight for m in base.models}
        scenario = build_scenario(scenario_name, base.model_names,
                                  [w[m] for m in base.model_names], duration_s)
    options = options or AdaptOptions()
    cache = PlanCache(base, profiles, min_rate_rps=options.min_rate_rps)
    fast = scenario.time_scaled(search_time_scale) if search_time_scale != 1 else scenario
    mean_rel = float(scenario.mean_relative().sum())
    scale0 = base.normalized_throughput / max(sum(m.weight for m in base.models), 1e-9)
    runs_out: list[dict] = []
    found: dict[str, float | None] = {}
    final: dict[str, ScenarioResult] = {}

    def runner(policy: str, sc: Scenario, stage: str):
        def run_at(s: float) -> ScenarioResult:
            s = float(s)
            r = run_policy(policy, base, profiles, sc, s, cache, config=config,
                           options=options, costs=costs, oracle_segment_s=oracle_segment_s)
            runs_out.append({"policy": policy, "stage": stage, "scale_rps": s,
                             "duration_s": sc.duration_s, **_brief(r)})
            say(f"{policy:>8} {stage:>6} scale {s:8.1f} req/s: attainment "
                f"{100 * r.attainment:6.2f} % ({r.requests} requests, {len(r.swaps)} swaps, "
                f"{r.wall_s:.0f} s wall)")
            return r
        return run_at

    # adaptive last: its full-length search may start from the oracle's goodput
    order = [p for p in POLICIES if p in policies and p != "adaptive"] + \
        (["adaptive"] if "adaptive" in policies else [])
    for policy in order:
        guess = 0.97 * float(planned_scale(policy, scenario, scale0, cache, oracle_segment_s))
        lo, runs = search_goodput(runner(policy, fast, "search"), guess, target=target,
                                  steps=search_steps, step=search_step)
        if search_time_scale != 1 and full_steps > 0:
            start = lo if lo is not None else min(r.scale_rps for r in runs)
            if policy == "adaptive" and found.get("oracle"):
                # the faster play exaggerates its detection lag: start near the oracle
                start = max(start, adaptive_start * found["oracle"])
            lo2, runs2 = search_goodput(runner(policy, scenario, "full"), start,
                                        target=target, steps=full_steps, step=full_step)
            lo, runs = lo2, runs2
        found[policy] = lo
        passing = [r for r in runs if r.attainment >= target]
        if passing:
            final[policy] = max(passing, key=lambda r: r.scale_rps)

    def ratio(a: str, b: str):
        if found.get(a) and found.get(b):
            return float(found[a] / found[b])
        return None

    out = {
        "scenario": scenario.name, "models": list(scenario.models),
        "cluster": base.cluster.label, "duration_s": scenario.duration_s,
        "shifts": scenario.shifts, "search_time_scale": search_time_scale,
        "target": target,
        "goodput_scale_rps": {p: (float(s) if s else None) for p, s in found.items()},
        "goodput_rps": {p: (float(s * mean_rel) if s else None) for p, s in found.items()},
        "adaptive_over_static": ratio("adaptive", "static"),
        "adaptive_over_oracle": ratio("adaptive", "oracle"),
        "swaps": {p: len(r.swaps) for p, r in final.items()},
        "moved": {p: r.moved for p, r in final.items()},
        "final_runs": {p: r.to_dict() for p, r in final.items()},
        "runs": runs_out,
        "costs": asdict(costs), "adapt_options": asdict(options),
        "plans_solved": cache.solves, "plan_cache_hits": cache.hits,
        "solve_wall_s": cache.solve_wall_s,
        "wall_s": time.perf_counter() - wall0,
    }
    if keep_results:
        out["results"] = final
    return out


def _brief(r: ScenarioResult) -> dict:
    return {"attainment": r.attainment, "requests": r.requests, "swaps": len(r.swaps),
            "moved": r.moved, "answered_twice": r.answered_twice,
            "unresolved": r.outcomes.get("unresolved", 0), "wall_s": r.wall_s}


def compare_on_paper_cluster(profiles_dir, *, group: int = 3, cluster: str = "L4-T4",
                             **kw) -> dict:
    """:func:`compare_policies` on a 100-GPU cluster of the paper's setting
    (``eval_setting.json`` in ``profiles_dir``): model group ``group`` (1-based) with the
    paper's weights and SLOs, planned with PPipe as the starting plan; further keywords go
    to :func:`compare_policies`.  The result also holds ``group`` and ``base_plan_s`` (the
    starting plan's solve wall time)."""
    from planner import plan_cluster
    from ppipe_trt.cluster import load_paper_setting
    from ppipe_trt.profiles import load_profiles

    setting = load_paper_setting(profiles_dir)
    models = setting.model_groups[group - 1]
    profiles = load_profiles(profiles_dir, models)
    t0 = time.perf_counter()
    base = plan_cluster(profiles, setting.cluster(cluster), setting.workloads(group, profiles))
    plan_s = time.perf_counter() - t0
    out = compare_policies(profiles, base, **kw)
    out["group"] = group
    out["base_plan_s"] = plan_s
    return out
