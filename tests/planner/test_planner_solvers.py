"""One formulation, several solvers: Gurobi and CBC agree with HiGHS."""

from __future__ import annotations

import pytest

from ppipe_trt.errors import SolverError

from planner import PlannerOptions, plan_cluster, verify_plan
from planner.planning import candidate_sets, gpu_limits
from planner.milp import _build
from planner.solvers import MilpModel, gurobi_available, solve


def _gurobi_or_skip():
    if not gurobi_available():
        pytest.skip("gurobipy not installed")
    probe = MilpModel()
    x = probe.add_col("x", upper=3.0, cost=1.0, integer=True)
    probe.add_row({x: 2.0}, upper=5.0)
    try:
        result = solve(probe, "gurobi")
    except SolverError as exc:
        pytest.skip(f"Gurobi licence refused: {exc}")
    assert result.objective == pytest.approx(2.0)


def test_small_milp_same_optimum_on_every_solver():
    mm = MilpModel()
    a = mm.add_col("a", upper=10, cost=3.0, integer=True)
    b = mm.add_col("b", upper=10, cost=2.0, integer=True)
    c = mm.add_col("c", cost=1.0)
    mm.add_row({a: 2.0, b: 3.0}, upper=12.5)
    mm.add_row({c: 1.0, a: -1.0}, upper=0.5)
    solvers = ["highs", "cbc"] + (["gurobi"] if gurobi_available() else [])
    objectives = {s: solve(mm, s).objective for s in solvers}
    # a=6, b=0 -> 18 + c (<= 6.5) = 24.5
    for s, obj in objectives.items():
        assert obj == pytest.approx(24.5), s


def test_gurobi_agrees_with_highs_within_restricted_licence(shared_profiles, setting):
    _gurobi_or_skip()
    cluster = setting.cluster("V100-P4")
    workloads = setting.workloads(2, shared_profiles)
    opts = PlannerOptions()
    sets = candidate_sets(shared_profiles, cluster, workloads, opts, rates={
        w.model: 500.0 for w in workloads}, max_stages=2, max_mps=None)
    built = _build(sets, workloads, gpu_limits(cluster, opts))
    assert built.model.num_cols <= 2000 and built.model.num_rows <= 2000
    g = plan_cluster(shared_profiles, cluster, workloads, "ppipe",
                     PlannerOptions(solver="gurobi", mip_rel_gap=1e-6))
    h = plan_cluster(shared_profiles, cluster, workloads, "ppipe",
                     PlannerOptions(solver="highs", mip_rel_gap=1e-6))
    assert g.solver == "gurobi" and h.solver == "highs"
    assert g.normalized_throughput == pytest.approx(h.normalized_throughput, rel=1e-6)
    verify_plan(g, shared_profiles)


def test_auto_picks_gurobi_when_the_model_fits(shared_profiles, setting):
    _gurobi_or_skip()
    plan = plan_cluster(shared_profiles, setting.cluster("V100-P4"),
                        setting.workloads(2, shared_profiles), "np", PlannerOptions())
    assert plan.solver == "gurobi"


def test_auto_falls_back_to_highs_when_the_model_exceeds_the_licence(shared_profiles, setting):
    plan = plan_cluster(shared_profiles, setting.cluster("V100-P4"),
                        setting.workloads(2, shared_profiles), "ppipe",
                        PlannerOptions(gurobi_max_vars=10, gurobi_max_constraints=10))
    assert plan.solver.startswith("highs")


def test_cbc_agrees_with_highs_on_a_small_instance(shared_profiles, setting):
    cluster = setting.cluster("V100-P4")
    workloads = setting.workloads(2, shared_profiles)[:2]
    c = plan_cluster(shared_profiles, cluster, workloads, "ppipe",
                     PlannerOptions(solver="cbc", mip_rel_gap=1e-6, tie_break=False))
    h = plan_cluster(shared_profiles, cluster, workloads, "ppipe",
                     PlannerOptions(solver="highs", mip_rel_gap=1e-6, tie_break=False))
    assert c.solver == "cbc"
    assert c.normalized_throughput == pytest.approx(h.normalized_throughput, rel=1e-5)
    verify_plan(c, shared_profiles)
