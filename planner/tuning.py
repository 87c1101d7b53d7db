"""Plan against the simulator: plan with several SLO margins, keep the one that serves most.

The planner reserves a fixed fraction of every SLO (``PlannerOptions.slo_margin``, 40 % as in
the paper) for queueing and batching delay that its capacity model does not see.  Too large a
margin forbids the larger batches and longer pipelines that would raise throughput; too small
a one leaves no room for queueing, and the plan misses its SLOs well below its planned
capacity.  Which margin is best depends on the models, the cluster and the arrivals, so
:func:`plan_by_simulation` plans once per candidate margin, simulates each plan's goodput
(:func:`~ppipe_trt.simulator.goodput.search_goodput`: the largest total rate, models at their
weights, with every model at >= 99 % attainment) and returns the plan with the highest.

With ``TuningOptions.adjust_weights``, the best plan is then adjusted once: its per-model load
factors at 99 % (each model's sustainable share of its planned capacity, from the simulator)
show which models lose most to queueing; the planner is run again at the same margin with each
model's weight divided by its factor, so that it gives those models more capacity, and the
re-plan is kept when its simulated goodput (at the real weights) is higher.

The selection runs on its own seed (``TuningOptions.seed``), so an evaluation on another
seed is not the selection's own sample.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Sequence

from ppipe_trt.cluster import ClusterSpec, Workload
from ppipe_trt.errors import BadInputError, ConfigError, InfeasiblePlanError
from ppipe_trt.plan import Plan
from ppipe_trt.profiles.types import ProfileSet

from planner.options import PlannerOptions
from planner.planning import plan_cluster


@dataclass(frozen=True, slots=True)
class TuningOptions:
    """Candidate margins (fractions of the SLO kept back) and the selection's simulation:
    ``duration_s`` measured after ``warmup_s``, ``seed``, attainment ``target``, goodput to
    ``rel_tol``, arrival process ``arrivals`` (a spec of
    :mod:`~ppipe_trt.simulator.arrivals`)."""

    slo_margins: tuple[float, ...] = (0.4, 0.3, 0.25, 0.2)
    duration_s: float = 5.0
    warmup_s: float = 1.0
    seed: int = 1
    target: float = 0.99
    rel_tol: float = 0.02
    arrivals: str = "poisson"
    adjust_weights: bool = False

    def __post_init__(self) -> None:
        if not self.slo_margins:
            raise BadInputError("slo_margins must name at least one margin")
        for m in self.slo_margins:
            if not 0.0 <= m < 1.0:
                raise BadInputError(f"slo margin {m!r} must be in [0, 1)")


@dataclass(frozen=True, slots=True)
class MarginTrial:
    slo_margin: float
    planned_rps: float          # the plan's max-min objective x sum of weights (req/s)
    goodput_rps: float          # simulated, on the selection seed
    plan_s: float               # planner wall time


@dataclass(frozen=True, slots=True)
class TunedPlan:
    plan: Plan
    slo_margin: float
    goodput_rps: float          # simulated, on the selection seed
    trials: tuple[MarginTrial, ...]
    wall_s: float
    weights_adjusted: bool = False   # the kept plan was planned with adjusted weights


def plan_by_simulation(profiles: ProfileSet, cluster: ClusterSpec,
                       workloads: Sequence[Workload], options: PlannerOptions | None = None,
                       tuning: TuningOptions | None = None,
                       link_model: str = "duplex") -> TunedPlan:
    """The PPipe plan, among one per candidate margin, with the highest simulated goodput
    (ties: the larger margin).  Raises :class:`InfeasiblePlanError` when no margin gives a
    plan."""
    from ppipe_trt.simulator import ArrivalSpec, SimConfig
    from ppipe_trt.simulator.goodput import search_goodput

    started = time.perf_counter()
    options = options or PlannerOptions()
    tuning = tuning or TuningOptions()
    sim = SimConfig(duration_s=tuning.duration_s, warmup_s=tuning.warmup_s, seed=tuning.seed,
                    arrivals=ArrivalSpec.parse(tuning.arrivals), link_model=link_model)
    best: tuple[float, float, Plan] | None = None
    trials = []
    errors = []
    for margin in sorted(set(tuning.slo_margins), reverse=True):
        t0 = time.perf_counter()
        try:
            plan = plan_cluster(profiles, cluster, workloads, "ppipe",
                                replace(options, slo_margin=margin))
        except InfeasiblePlanError as exc:
            errors.append(f"margin {margin}: {exc}")
            continue
        plan_s = time.perf_counter() - t0
        wsum = sum(m.weight for m in plan.models)
        try:
            gp = search_goodput(plan, profiles, sim, target=tuning.target,
                                rel_tol=tuning.rel_tol).goodput_rps
        except ConfigError as exc:   # e.g. MPS shares that do not pack onto the GPUs
            errors.append(f"margin {margin}: {exc}")
            trials.append(MarginTrial(margin, plan.normalized_throughput * wsum, 0.0, plan_s))
            continue
        trials.append(MarginTrial(margin, plan.normalized_throughput * wsum, gp, plan_s))
        if best is None or gp > best[0]:
            best = (gp, margin, plan)
    if best is None:
        raise InfeasiblePlanError("no candidate margin gives a plan that can be placed: "
                                  + "; ".join(errors))
    adjusted = False
    if tuning.adjust_weights:
        replanned = _replan_by_load_factor(best[2], profiles, cluster, workloads,
                                           replace(options, slo_margin=best[1]), sim, tuning)
        if replanned is not None and replanned[0] > best[0]:
            best = (replanned[0], best[1], replanned[1])
            adjusted = True
    return TunedPlan(best[2], best[1], best[0], tuple(trials), time.perf_counter() - started,
                     adjusted)


def with_weights(plan: Plan, weights: dict[str, float]) -> Plan:
    """``plan`` with its models' workload weights (and the normalized throughput, min over
    models of ``throughput_rps / weight``) replaced."""
    models = tuple(replace(m, weight=weights[m.model]) for m in plan.models)
    return replace(plan, models=models,
                   normalized_throughput=min(m.throughput_rps / m.weight for m in models))


def _replan_by_load_factor(plan, profiles, cluster, workloads, options, sim, tuning):
    """(goodput, plan) of the re-plan with weights divided by the simulated per-model load
    factors of ``plan``; None when it cannot be planned or placed."""
    from ppipe_trt.simulator.goodput import search_goodput
    from ppipe_trt.simulator.search import search_load_factor

    try:
        factors = search_load_factor(plan, profiles, sim,
                                     target=tuning.target).per_model_load_factor
        scaled = [replace(w, weight=w.weight / max(factors.get(w.model, 1.0), 0.05))
                  for w in workloads]
        replanned = plan_cluster(profiles, cluster, scaled, "ppipe", options)
        replanned = with_weights(replanned, {w.model: w.weight for w in workloads})
        replanned = replace(replanned, params={
            **replanned.params, "planned_weights": {w.model: w.weight for w in scaled}})
        gp = search_goodput(replanned, profiles, sim, target=tuning.target,
                            rel_tol=tuning.rel_tol).goodput_rps
    except (InfeasiblePlanError, ConfigError):
        return None
    return gp, replanned
