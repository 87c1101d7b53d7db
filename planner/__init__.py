"""The control-plane planner: profiles + cluster + workloads -> a :class:`ppipe_trt.plan.Plan`.

``plan_cluster(profiles, cluster, workloads, policy, options)`` plans with PPipe (pooled
partitioned pipelines), NP (whole models) or DART-r; ``verify_plan(plan, profiles)`` re-checks a
plan outside the solver; ``smallest_feasible_slo_ms(profile, cluster, options)`` is the tightest
SLO it can plan a model at.  The MILP is written once (planner.milp) and solved by HiGHS,
Gurobi or CBC (planner.solvers).
"""

from planner.options import POLICIES, SOLVERS, PlannerOptions
from planner.planning import (fastest_pipeline_us, plan_cluster, slo_for_latency_ms,
                              smallest_feasible_slo_ms)
from planner.verify import verify_plan

__all__ = ["plan_cluster", "fastest_pipeline_us", "slo_for_latency_ms",
           "smallest_feasible_slo_ms", "PlannerOptions", "verify_plan", "POLICIES", "SOLVERS"]
