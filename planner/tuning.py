"""Plan against the simulator: plan with several SLO margins, keep the one that serves most.

The planner reserves a fixed fraction of every SLO (``PlannerOptions.slo_margin``, 40 % as in
the paper) for queueing and batching delay that its capacity model does not see.  Too large a
margin forbids the larger batches and longer pipelines that would raise throughput; too small
a one leaves no room for queueing, and the plan misses its SLOs well below its planned
capacity.  Which margin is best depends on the models, the cluster and the arrivals, so
:func:`plan_by_simulation` plans once per candidate margin, simulates each plan's goodput
(:func:`~ppipe_trt.simulator.goodput.search_goodput`: the largest total rate, models at their
weights, with every model at >= 99 % attainment) and returns the plan with the highest.

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
    return TunedPlan(best[2], best[1], best[0], tuple(trials), time.perf_counter() - started)
