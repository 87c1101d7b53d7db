"""Planning the paper's setting: calibration anchors, baselines, verification, determinism."""

from __future__ import annotations

import pytest

from ppipe_trt.plan import plan_from_dict, plan_to_dict

from planner import PlannerOptions, plan_cluster, verify_plan

HIGHS = PlannerOptions(solver="highs")

#: The PPipe artifact's own Gurobi plans (normalized throughput, req/s).
ANCHORS = [
    (3, "L4-T4", "np", 1490.8), (3, "L4-T4", "ppipe", 1812.3),
    (2, "V100-P4", "np", 2168.4), (2, "V100-P4", "ppipe", 2863.1),
]


@pytest.mark.parametrize("group,cluster,policy,expected", ANCHORS)
def test_reaches_artifact_calibration_points(shared_profiles, setting, group, cluster, policy,
                                             expected):
    plan = plan_cluster(shared_profiles, setting.cluster(cluster),
                        setting.workloads(group, shared_profiles), policy, HIGHS)
    assert plan.normalized_throughput >= expected - 0.05
    assert plan.solver == "highs"


@pytest.mark.parametrize("policy", ["ppipe", "np", "dart-r"])
def test_plans_respect_cluster_slo_and_stage_limits(shared_profiles, setting, policy):
    cluster = setting.cluster("L4-P4")
    workloads = setting.workloads(5, shared_profiles)
    plan = plan_cluster(shared_profiles, cluster, workloads, policy, HIGHS)
    verify_plan(plan, shared_profiles)
    assert plan.scheduler == policy
    for pool in cluster.pools:
        assert plan.gpus_used[pool.gpu_class] <= pool.count
    for m, wl in zip(plan.models, workloads):
        assert m.model == wl.model and m.throughput_rps > 0 and m.pipelines
        for p in m.pipelines:
            assert p.latency_us <= wl.slo_us * 0.6 * (1 + 1e-9)
            assert len(p.stages) <= (1 if policy == "np" else 2)
            if policy != "ppipe":
                assert all(s.mps_share == 1 for s in p.stages)
            assert all(s.mps_share <= cluster.pool(s.gpu_class).max_mps for s in p.stages)
            # P4 tables exist only at MPS share 1; higher shares cap the batch
            for s in p.stages:
                assert p.batch_size <= shared_profiles[m.model].max_batch(s.gpu_class,
                                                                          s.mps_share)


def test_ppipe_beats_baselines_and_dart_r_pairs_classes(shared_profiles, setting):
    cluster = setting.cluster("V100-T4")
    workloads = setting.workloads(4, shared_profiles)
    plans = {p: plan_cluster(shared_profiles, cluster, workloads, p, HIGHS)
             for p in ("ppipe", "np", "dart-r")}
    assert plans["ppipe"].normalized_throughput >= plans["np"].normalized_throughput
    assert plans["ppipe"].normalized_throughput >= plans["dart-r"].normalized_throughput
    # DART-r: two-stage pipelines span one high and one low class, equal workers per stage
    two_stage = [p for m in plans["dart-r"].models for p in m.pipelines if len(p.stages) == 2]
    assert two_stage
    for p in two_stage:
        assert {s.gpu_class for s in p.stages} == {"V100", "T4"}
        assert p.stages[0].workers == p.stages[1].workers


def test_same_input_gives_same_plan(shared_profiles, setting):
    cluster = setting.cluster("L4-T4")
    workloads = setting.workloads(2, shared_profiles)
    a = plan_to_dict(plan_cluster(shared_profiles, cluster, workloads, "ppipe", HIGHS))
    b = plan_to_dict(plan_cluster(shared_profiles, cluster, workloads, "ppipe", HIGHS))
    for d in (a, b):
        d.pop("solve_s")
        d["params"].pop("milp")
        d["params"].pop("rate_estimate_s")
    assert a == b


def test_plan_json_round_trip_still_verifies(shared_profiles, setting):
    plan = plan_cluster(shared_profiles, setting.cluster("V100-P4"),
                        setting.workloads(2, shared_profiles), "ppipe", HIGHS)
    again = plan_from_dict(plan_to_dict(plan))
    verify_plan(again, shared_profiles)
    assert again == plan


def test_three_stage_plans_at_least_as_good_as_two(shared_profiles, setting):
    cluster = setting.cluster("V100-P4")
    workloads = setting.workloads(3, shared_profiles)
    two = plan_cluster(shared_profiles, cluster, workloads, "ppipe", HIGHS)
    three = plan_cluster(shared_profiles, cluster, workloads, "ppipe",
                         PlannerOptions(solver="highs", max_stages=3))
    assert three.normalized_throughput >= two.normalized_throughput * (1 - 2e-4)
    assert max(len(p.stages) for m in three.models for p in m.pipelines) <= 3


def test_tie_break_gives_spare_gpus_to_other_models(shared_profiles, setting):
    cluster = setting.cluster("L4-P4")
    workloads = setting.workloads(3, shared_profiles)
    plain = plan_cluster(shared_profiles, cluster, workloads, "ppipe",
                         PlannerOptions(solver="highs", tie_break=False))
    tied = plan_cluster(shared_profiles, cluster, workloads, "ppipe", HIGHS)
    assert tied.normalized_throughput >= plain.normalized_throughput * (1 - 1e-6)
    assert sum(m.throughput_rps / m.weight for m in tied.models) >= \
        sum(m.throughput_rps / m.weight for m in plain.models) - 1e-6


def test_mixed_mps_levels_are_planned_onto_whole_gpus(shared_profiles, setting, monkeypatch):
    """Group 2 on V100-P4 at a 25 % SLO margin: the MILP's first solution counts MPS shares as
    GPU fractions and needs 26 V100 once placement packs one level per GPU (25 exist); the
    planner solves again with whole GPUs per level: the plan places, at the same objective."""
    from ppipe_trt.errors import ConfigError
    from ppipe_trt.scheduler.placement import packed_gpus, place_workers

    import planner.planning as planning

    cluster = setting.cluster("V100-P4")
    workloads = setting.workloads(2, shared_profiles)
    options = PlannerOptions(solver="highs", slo_margin=0.25)
    plan = plan_cluster(shared_profiles, cluster, workloads, "ppipe", options)
    assert "whole_gpus_per_mps_level" in plan.params
    assert "26 V100" in plan.params["whole_gpus_per_mps_level"]["reason"]
    place_workers(plan)   # raised ConfigError before the fallback existed
    assert all(n <= cluster.pool(c).count for c, n in packed_gpus(plan).items())
    verify_plan(plan, shared_profiles)

    # without the fallback: the same objective, but more V100 than the cluster has
    monkeypatch.setattr(planning, "_over_packed", lambda *a, **k: "")
    first = plan_cluster(shared_profiles, cluster, workloads, "ppipe", options)
    assert packed_gpus(first)["V100"] > cluster.pool("V100").count
    with pytest.raises(ConfigError, match="Plan again with `ppipe plan`"):
        place_workers(first)   # an old plan: serving it says what to do
    assert plan.normalized_throughput >= first.normalized_throughput * (1 - 1e-3)


def test_default_plans_never_take_the_whole_gpu_fallback(shared_profiles, setting):
    plan = plan_cluster(shared_profiles, setting.cluster("V100-P4"),
                        setting.workloads(2, shared_profiles), "ppipe", HIGHS)
    assert "whole_gpus_per_mps_level" not in plan.params
