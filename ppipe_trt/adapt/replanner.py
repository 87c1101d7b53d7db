"""Re-plan a served cluster for new weights (the MILP, as ``ppipe plan`` runs it)."""

from __future__ import annotations

from typing import Mapping

from ppipe_trt.cluster import Workload
from ppipe_trt.errors import BadInputError
from ppipe_trt.plan import Plan
from ppipe_trt.profiles.types import ProfileSet

#: Planner options of a plan's ``params`` that a re-plan reuses.
_REUSED = ("max_stages", "max_batch", "slo_margin", "batching_delay_factor", "solver",
           "time_limit_s", "mip_rel_gap", "tie_break", "pipeline_penalty", "np_max_mps",
           "gpu_limits")


def replan(plan: Plan, profiles: ProfileSet, weights: Mapping[str, float],
           arrival_rates_rps: Mapping[str, float] | None = None) -> Plan:
    """A new plan for ``plan``'s cluster and models (same SLOs, same planner policy and
    options as recorded in ``plan.params``) with the given ``weights``.

    ``arrival_rates_rps``: the rates (req/s) the planner assumes for the batching delay:
    pass the observed rates when the weights are them (the control loop); default: the
    planner's own estimate, as ``ppipe plan`` makes it (weights are relative shares, e.g.
    an operator's ``{"a": 1, "b": 3}``, not req/s).  Runs the MILP: call it off the serving
    thread.  Raises :class:`BadInputError` for a weight of a model the plan
    does not serve, :class:`~ppipe_trt.errors.InfeasiblePlanError` when no plan fits."""
    from planner import PlannerOptions, plan_cluster

    unknown = set(weights) - set(plan.model_names)
    if unknown:
        raise BadInputError(f"weights name models {sorted(unknown)} the plan does not serve; "
                            f"it serves {list(plan.model_names)}")
    workloads = [Workload(m.model, m.slo_ms, float(weights.get(m.model, m.weight)))
                 for m in plan.models]
    params = plan.params or {}
    kw = {k: params[k] for k in _REUSED if params.get(k) is not None}
    if arrival_rates_rps is not None:
        kw["arrival_rates_rps"] = dict(arrival_rates_rps)
    policy = params.get("policy", "ppipe")
    return plan_cluster(profiles, plan.cluster, workloads, policy=policy,
                        options=PlannerOptions(**kw))


def swap_gain(old: Plan, new: Plan, rates_rps: Mapping[str, float]) -> float:
    """How much better ``new`` serves ``rates_rps`` than ``old``: the relative gain of the
    worst model's planned capacity over its rate (``new/old - 1``; > 0 is better)."""
    def headroom(plan: Plan) -> float:
        return min(plan.model(m).throughput_rps / max(r, 1e-9) for m, r in rates_rps.items()
                   if m in plan.model_names)
    return headroom(new) / max(headroom(old), 1e-12) - 1.0
