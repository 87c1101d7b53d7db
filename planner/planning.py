"""``plan_cluster``: profiles + cluster + workloads -> a verified :class:`Plan`.

Steps (paper semantics):

1. Estimate each model's arrival rate from an NP plan solved without batching delay (unless
   ``PlannerOptions.arrival_rates_rps`` names the rates).
2. Enumerate SLO-feasible candidate pipelines per model and prune the dominated ones
   (planner.candidates); NP allows one stage and MPS share 1, PPipe up to ``max_stages``
   stages and every MPS share the cluster allows.
3. Solve one MILP (planner.milp) over all models; DART-r is built from the NP plan
   (planner.baselines).  If placement would need more whole GPUs than the cluster has (mixed
   MPS levels), solve again counting whole GPUs per MPS level.
4. Re-check the plan outside the solver (planner.verify) before returning it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import Mapping, Sequence

from ppipe_trt.cluster import ClusterSpec, Workload
from ppipe_trt.errors import BadInputError, InfeasiblePlanError
from ppipe_trt.plan import Plan
from ppipe_trt.profiles.types import ModelProfile, ProfileSet
from ppipe_trt.scheduler.placement import packed_gpus

from planner.assemble import build_plan
from planner.baselines import plan_dart_r
from planner.candidates import CandidateSet, enumerate_candidates
from planner.milp import MilpOutcome, candidate_key, screen_candidates, solve_allocation
from planner.options import POLICIES, PlannerOptions
from planner.verify import verify_plan

log = logging.getLogger("ppipe.planner")

#: Time limit of the second solve with whole GPUs per MPS level (see ``_solve_policy``): its
#: extra integer rounding makes optimality slow to prove while good plans come early.
WHOLE_GPU_TIME_LIMIT_S = 10.0


def plan_cluster(profiles: ProfileSet, cluster: ClusterSpec, workloads: Sequence[Workload],
                 policy: str = "ppipe", options: PlannerOptions | None = None) -> Plan:
    """Plan ``workloads`` on ``cluster`` with ``policy`` ("ppipe", "np" or "dart-r").

    Raises InfeasiblePlanError (naming the model and the smallest feasible SLO) when a model has
    no SLO-feasible pipeline, or when the cluster cannot give every model a pipeline.
    """
    options = options or PlannerOptions()
    if policy not in POLICIES:
        raise BadInputError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
    started = time.perf_counter()
    workloads = tuple(workloads)
    _check_inputs(profiles, cluster, workloads)
    limits = gpu_limits(cluster, options)
    rates, estimate_s = _arrival_rates(profiles, cluster, workloads, limits, options)
    if policy == "dart-r":
        np_plan, np_outcome, milp_s = _solve_policy("np", profiles, cluster, workloads, limits,
                                                     options, rates)
        two_classes = len([c for c in cluster.gpu_classes if limits.get(c, 0) > 0]) == 2
        pair_sets = candidate_sets(profiles, cluster, workloads, options, rates=rates,
                                   max_stages=2 if two_classes else 1, max_mps=1)
        plan = plan_dart_r(profiles, cluster, workloads, np_plan, pair_sets, limits,
                           solver=np_outcome.solver, mip_gap=np_outcome.mip_gap,
                           started=started, params=_params("dart-r", options, rates, limits,
                                                           np_outcome, estimate_s, milp_s))
    else:
        plan, _, _ = _solve_policy(policy, profiles, cluster, workloads, limits, options, rates,
                                   started=started, estimate_s=estimate_s)
    verify_plan(plan, profiles)
    return plan


def gpu_limits(cluster: ClusterSpec, options: PlannerOptions) -> dict[str, int]:
    """GPUs per class the planner may use: the cluster's, or fewer when options say so."""
    limits = {p.gpu_class: p.count for p in cluster.pools}
    for cls, n in (options.gpu_limits or {}).items():
        if cls not in limits:
            raise InfeasiblePlanError(
                f"gpu_limits names class {cls!r} but cluster {cluster.label} has only "
                f"{', '.join(limits)}")
        if n > limits[cls]:
            raise InfeasiblePlanError(
                f"gpu_limits asks for {n} {cls} GPUs but cluster {cluster.label} has "
                f"{limits[cls]}")
        if n < 0:
            raise BadInputError(f"gpu_limits[{cls}] must be >= 0, got {n}")
        limits[cls] = int(n)
    return limits


def _check_inputs(profiles: ProfileSet, cluster: ClusterSpec,
                  workloads: Sequence[Workload]) -> None:
    if not workloads:
        raise BadInputError("no workloads to plan; expected at least one model")
    names = [w.model for w in workloads]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BadInputError(f"workloads list model(s) {dup} more than once")
    for wl in workloads:
        prof = profiles[wl.model]
        usable = [c for c in cluster.gpu_classes if c in prof.gpu_classes]
        if not usable:
            raise InfeasiblePlanError(
                f"model {wl.model} has profiles for {', '.join(prof.gpu_classes)} but cluster "
                f"{cluster.label} has only {', '.join(cluster.gpu_classes)}; build its engines "
                "for one of the cluster's GPU classes")


def _arrival_rates(profiles: ProfileSet, cluster: ClusterSpec, workloads: Sequence[Workload],
                   limits: Mapping[str, int], options: PlannerOptions
                   ) -> tuple[dict[str, float], float]:
    if options.arrival_rates_rps is not None:
        missing = [w.model for w in workloads if w.model not in options.arrival_rates_rps]
        if missing:
            raise BadInputError(f"arrival_rates_rps lacks model(s) {missing}")
        return {w.model: float(options.arrival_rates_rps[w.model]) for w in workloads}, 0.0
    t0 = time.perf_counter()
    sets = candidate_sets(profiles, cluster, workloads, options, rates=None, max_stages=1,
                          max_mps=options.np_max_mps, delay_factor=0.0)
    outcome = _solve_sets(sets, workloads, limits, options, cluster)
    rates = {w.model: sum(a.throughput_rps for a in outcome.allocations[w.model])
             for w in workloads}
    return rates, time.perf_counter() - t0


def candidate_sets(profiles: ProfileSet, cluster: ClusterSpec, workloads: Sequence[Workload],
                   options: PlannerOptions, *, rates: Mapping[str, float] | None,
                   max_stages: int, max_mps: int | None, delay_factor: float | None = None
                   ) -> list[CandidateSet]:
    """Pruned candidates per workload; raises InfeasiblePlanError for a model with none."""
    factor = options.batching_delay_factor if delay_factor is None else delay_factor
    out = []
    for wl in workloads:
        cset = enumerate_candidates(
            profiles[wl.model], wl, cluster, max_stages=max_stages, max_batch=options.max_batch,
            slo_budget_fraction=options.slo_budget_fraction,
            rate_rps=(rates or {}).get(wl.model), batching_delay_factor=factor, max_mps=max_mps)
        if not cset.candidates:
            need_ms = slo_for_latency_ms(cset.min_latency_us, options.slo_budget_fraction)
            raise InfeasiblePlanError(
                f"model {wl.model}: no pipeline meets its SLO of {wl.slo_ms:.2f} ms planned at "
                f"{options.slo_budget_fraction:.0%} ({wl.slo_ms * options.slo_budget_fraction:.2f}"
                f" ms) on cluster {cluster.label} with up to {max_stages} stage(s); the smallest "
                f"feasible SLO is {need_ms:.2f} ms")
        out.append(cset)
    return out


def smallest_feasible_slo_ms(profile: ModelProfile, cluster: ClusterSpec,
                             options: PlannerOptions | None = None) -> float:
    """The smallest SLO (ms, rounded up to 0.01 ms) at which :func:`plan_cluster` finds a
    pipeline of ``profile``'s model on ``cluster``: :func:`fastest_pipeline_us` divided by the
    fraction of the SLO pipelines are planned against.  Whether the cluster has a worker
    left for the model is not part of it."""
    options = options or PlannerOptions()
    return slo_for_latency_ms(fastest_pipeline_us(profile, cluster, options),
                              options.slo_budget_fraction)


def fastest_pipeline_us(profile: ModelProfile, cluster: ClusterSpec,
                        options: PlannerOptions | None = None) -> float:
    """The batch-1 latency (us) of the fastest pipeline of ``profile``'s model on ``cluster``
    among those the planner's first test of the SLO allows: one stage at an MPS share up to
    ``np_max_mps`` (the arrival-rate estimate, an NP plan, comes first), or, when
    ``options.arrival_rates_rps`` skips it, up to ``max_stages`` stages (at most 2: the
    3-stage search starts from a plan of 2).  The model can be planned iff its SLO x the
    budget fraction is at least this.  Raises :class:`InfeasiblePlanError` when the cluster
    has no GPU class the model is profiled for."""
    options = options or PlannerOptions()
    if options.arrival_rates_rps is None:
        max_stages, max_mps = 1, options.np_max_mps
    else:
        max_stages, max_mps = min(options.max_stages, 2), None
    # an SLO nothing meets: only the fastest batch-1 latency is computed, nothing enumerated
    probe = Workload(profile.model, 1e-9)
    cset = enumerate_candidates(profile, probe, cluster, max_stages=max_stages,
                                max_batch=options.max_batch,
                                slo_budget_fraction=options.slo_budget_fraction, rate_rps=None,
                                batching_delay_factor=0.0, max_mps=max_mps)
    if not math.isfinite(cset.min_latency_us):
        raise InfeasiblePlanError(
            f"model {profile.model} has profiles for {', '.join(profile.gpu_classes)} but "
            f"cluster {cluster.label} has only {', '.join(cluster.gpu_classes)}")
    return cset.min_latency_us


def slo_for_latency_ms(latency_us: float, slo_budget_fraction: float) -> float:
    """The SLO (ms) a pipeline of ``latency_us`` needs when pipelines are planned against
    ``slo_budget_fraction`` of the SLO, rounded up to 0.01 ms (the smallest such SLO at which
    the planner's test, latency <= SLO x fraction in floating point, holds)."""
    slo_ms = math.ceil(latency_us / slo_budget_fraction / 10.0 - 1e-9) / 100.0
    while slo_ms * 1000.0 * slo_budget_fraction < latency_us:
        slo_ms = round(slo_ms + 0.01, 2)
    return slo_ms


def _solve_sets(sets: Sequence[CandidateSet], workloads: Sequence[Workload],
                limits: Mapping[str, int], options: PlannerOptions,
                cluster: ClusterSpec, start: MilpOutcome | None = None,
                whole_gpus_per_level: bool = False) -> MilpOutcome:
    outcome = solve_allocation(
        sets, workloads, limits, solver=options.solver, time_limit_s=options.time_limit_s,
        mip_rel_gap=options.mip_rel_gap, tie_break=options.tie_break,
        pipeline_penalty=options.pipeline_penalty, gurobi_max_vars=options.gurobi_max_vars,
        gurobi_max_constraints=options.gurobi_max_constraints,
        start=start.allocations if start is not None else None,
        first_time_limit_s=(min(options.time_limit_s, options.deep_time_limit_s)
                            if start is not None else None),
        whole_gpus_per_level=whole_gpus_per_level)
    starved = [w.model for w in workloads if not outcome.allocations.get(w.model)]
    if starved or outcome.normalized_throughput <= 0:
        # GPUs are whole per (model, stage index, class): a model needs one per stage at least.
        fewest = {cset.model: min(len(c.stages) for c in cset.candidates) for cset in sets}
        have = ", ".join(f"{n} {c}" for c, n in limits.items())
        raise InfeasiblePlanError(
            f"cluster {cluster.label} ({have}) cannot give every model a pipeline: the "
            f"{len(workloads)} models need at least {sum(fewest.values()):g} GPU(s) in total ("
            + ", ".join(f"{m} {n:g}" for m, n in fewest.items())
            + f"); no pipeline left for {', '.join(starved) or 'some model'}")
    return outcome


def _solve_policy(policy: str, profiles: ProfileSet, cluster: ClusterSpec,
                  workloads: Sequence[Workload], limits: Mapping[str, int],
                  options: PlannerOptions, rates: Mapping[str, float], *,
                  started: float | None = None, estimate_s: float = 0.0
                  ) -> tuple[Plan, MilpOutcome, float]:
    started = time.perf_counter() if started is None else started
    shallow = None
    if policy == "np":
        sets = candidate_sets(profiles, cluster, workloads, options, rates=rates, max_stages=1,
                              max_mps=options.np_max_mps)
    elif options.max_stages <= 2:
        sets = candidate_sets(profiles, cluster, workloads, options, rates=rates,
                              max_stages=options.max_stages, max_mps=None)
    else:
        sets, shallow = _deep_candidate_sets(profiles, cluster, workloads, limits, options,
                                             rates)
    outcome = _solve_sets(sets, workloads, limits, options, cluster, start=shallow)
    solve_s = outcome.solve_s
    over = _over_packed(cluster, workloads, outcome, limits, policy)
    if over:
        # The MILP counts MPS shares as fractions of a GPU per (model, stage, class); placement
        # puts shares of one level only on a GPU, so mixed levels can need more whole GPUs
        # than the cluster has.  Solve again counting whole GPUs per level as placement does.
        log.info("plan needs %s once MPS shares are packed; solving again with whole GPUs "
                 "per MPS level", over)
        outcome = _solve_sets(sets, workloads, limits,
                              replace(options, time_limit_s=min(options.time_limit_s,
                                                                WHOLE_GPU_TIME_LIMIT_S)),
                              cluster, start=shallow, whole_gpus_per_level=True)
        solve_s += outcome.solve_s
    params = _params(policy, options, rates, limits, outcome, estimate_s, solve_s)
    params["candidates"] = {s.model: {"enumerated": s.enumerated, "kept": len(s.candidates)}
                            for s in sets}
    if over:
        params["whole_gpus_per_mps_level"] = {"reason": f"first solution needed {over}"}
    plan = build_plan(policy, cluster, workloads, outcome.allocations, solver=outcome.solver,
                      mip_gap=outcome.mip_gap, solve_s=time.perf_counter() - started,
                      params=params, profiles_source=profiles.source)
    return plan, outcome, solve_s


def _over_packed(cluster: ClusterSpec, workloads: Sequence[Workload], outcome: MilpOutcome,
                 limits: Mapping[str, int], policy: str) -> str:
    """What the outcome's workers need beyond ``limits`` once placement packs MPS shares
    (e.g. "26 V100 GPUs (limit 25)"), or "" when it fits."""
    trial = build_plan(policy, cluster, workloads, outcome.allocations, solver=outcome.solver,
                       mip_gap=outcome.mip_gap, solve_s=0.0, params={}, profiles_source="")
    return ", ".join(f"{n} {cls} GPUs (limit {limits.get(cls, 0)})"
                     for cls, n in sorted(packed_gpus(trial).items())
                     if n > limits.get(cls, 0))


def _deep_candidate_sets(profiles: ProfileSet, cluster: ClusterSpec,
                         workloads: Sequence[Workload], limits: Mapping[str, int],
                         options: PlannerOptions, rates: Mapping[str, float]
                         ) -> tuple[list[CandidateSet], MilpOutcome]:
    """Candidates for 3-stage planning: those an LP screening of every candidate ranks best,
    plus the pipelines of the optimal plan with at most 2 stages (so the 3-stage plan is never
    worse than it)."""
    shallow = candidate_sets(profiles, cluster, workloads, options, rates=rates, max_stages=2,
                             max_mps=None)
    shallow_plan = _solve_sets(shallow, workloads, limits, replace(options, tie_break=False),
                               cluster)
    deep = candidate_sets(profiles, cluster, workloads, options, rates=rates,
                          max_stages=options.max_stages, max_mps=None)
    screened = screen_candidates(deep, workloads, limits, options.deep_candidates_per_model)
    out = []
    for wl, b, full in zip(workloads, screened, deep):
        seen = {candidate_key(c) for c in b.candidates}
        extra = tuple(a.candidate for a in shallow_plan.allocations[wl.model]
                      if candidate_key(a.candidate) not in seen)
        out.append(CandidateSet(wl.model, b.candidates + extra, full.enumerated,
                                full.min_latency_us))
    return out, shallow_plan


def _params(policy: str, options: PlannerOptions, rates: Mapping[str, float],
            limits: Mapping[str, int], outcome: MilpOutcome, estimate_s: float,
            milp_s: float) -> dict:
    params = options.to_params()
    params.update({
        "policy": policy,
        "arrival_rates_rps": {m: float(r) for m, r in rates.items()},
        "arrival_rates_from": "options" if options.arrival_rates_rps else "np-plan",
        "gpu_limits": dict(limits),
        "milp": {"cols": outcome.num_cols, "rows": outcome.num_rows,
                 "integer": outcome.num_integer, "solve_s": milp_s},
        "rate_estimate_s": estimate_s,
    })
    return params
