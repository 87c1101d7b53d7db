"""verify_plan catches broken plans; infeasible inputs raise clear errors; a tiny local store."""

from __future__ import annotations

import dataclasses
import re

import pytest

from ppipe_trt.cluster import ClusterSpec, GpuPool, Workload
from ppipe_trt.errors import BadInputError, InfeasiblePlanError
from ppipe_trt.profiles import load_profiles, write_profile
from ppipe_trt.profiles.types import BlockLatencyTable, ModelProfile

from planner import PlannerOptions, plan_cluster, verify_plan

HIGHS = PlannerOptions(solver="highs")


@pytest.fixture(scope="module")
def paper_plan(shared_profiles, setting):
    return plan_cluster(shared_profiles, setting.cluster("L4-T4"),
                        setting.workloads(3, shared_profiles), "ppipe", HIGHS)


def _replace_stage(plan, **changes):
    m = plan.models[0]
    p = m.pipelines[0]
    stages = (dataclasses.replace(p.stages[0], **changes),) + p.stages[1:]
    pipes = (dataclasses.replace(p, stages=stages),) + m.pipelines[1:]
    return dataclasses.replace(plan, models=(dataclasses.replace(m, pipelines=pipes),)
                               + plan.models[1:])


def test_verify_rejects_overclaimed_throughput(shared_profiles, paper_plan):
    m = paper_plan.models[0]
    p = dataclasses.replace(m.pipelines[0], throughput_rps=m.pipelines[0].throughput_rps * 1.5)
    bad = dataclasses.replace(paper_plan, models=(dataclasses.replace(
        m, pipelines=(p,) + m.pipelines[1:]),) + paper_plan.models[1:])
    with pytest.raises(InfeasiblePlanError, match="claims .* req/s but its workers"):
        verify_plan(bad, shared_profiles)


def test_verify_rejects_more_gpus_than_the_cluster(shared_profiles, paper_plan):
    bad = _replace_stage(paper_plan, workers=500)
    with pytest.raises(InfeasiblePlanError, match="GPUs"):
        verify_plan(bad, shared_profiles)


def test_verify_rejects_a_wrong_latency(shared_profiles, paper_plan):
    bad = _replace_stage(paper_plan, latency_us=1.0)
    with pytest.raises(InfeasiblePlanError, match="latency_us .* profile gives"):
        verify_plan(bad, shared_profiles)


def test_verify_rejects_a_pipeline_over_its_slo(shared_profiles, paper_plan):
    m = paper_plan.models[0]
    tight = dataclasses.replace(m, slo_ms=m.slo_ms / 10)
    bad = dataclasses.replace(paper_plan, models=(tight,) + paper_plan.models[1:])
    with pytest.raises(InfeasiblePlanError, match="exceeds 60% of the"):
        verify_plan(bad, shared_profiles)


def test_verify_rejects_a_disallowed_mps_share(shared_profiles, paper_plan):
    bad = _replace_stage(paper_plan, mps_share=9)
    with pytest.raises(InfeasiblePlanError, match="MPS share 9"):
        verify_plan(bad, shared_profiles)


def test_unmeetable_slo_names_model_and_smallest_feasible_slo(shared_profiles, setting):
    cluster = setting.cluster("V100-P4")
    workloads = list(setting.workloads(2, shared_profiles))
    victim = workloads[1]
    workloads[1] = Workload(victim.model, 0.5, victim.weight)
    with pytest.raises(InfeasiblePlanError) as info:
        plan_cluster(shared_profiles, cluster, workloads, "ppipe", HIGHS)
    msg = str(info.value)
    assert victim.model in msg
    smallest = float(re.search(r"smallest feasible SLO is ([0-9.]+) ms", msg).group(1))
    # The SLO named is really feasible (rounded up to the printed precision) ...
    workloads[1] = Workload(victim.model, smallest + 0.01, victim.weight)
    plan = plan_cluster(shared_profiles, cluster, workloads, "ppipe", HIGHS)
    verify_plan(plan, shared_profiles)
    # ... and just below it is not.
    workloads[1] = Workload(victim.model, smallest * 0.99, victim.weight)
    with pytest.raises(InfeasiblePlanError, match=victim.model):
        plan_cluster(shared_profiles, cluster, workloads, "ppipe", HIGHS)


def test_more_gpus_asked_than_exist(shared_profiles, setting):
    cluster = setting.cluster("L4-T4")
    workloads = setting.workloads(3, shared_profiles)
    with pytest.raises(InfeasiblePlanError, match="asks for 30 L4 GPUs but cluster L4-T4 has 25"):
        plan_cluster(shared_profiles, cluster, workloads, "ppipe",
                     PlannerOptions(solver="highs", gpu_limits={"L4": 30}))
    tiny = ClusterSpec((GpuPool("L4", 1, 1, 4, 10.0),), "one-L4")
    with pytest.raises(InfeasiblePlanError, match="cannot give every model a pipeline"):
        plan_cluster(shared_profiles, tiny, workloads, "np", HIGHS)


def test_unknown_policy_is_a_bad_input(shared_profiles, setting):
    with pytest.raises(BadInputError, match="unknown policy 'fast'"):
        plan_cluster(shared_profiles, setting.cluster("L4-T4"),
                     setting.workloads(3, shared_profiles), "fast")


def _store_profile(model: str) -> ModelProfile:
    # 4 blocks on a "cpu" class, MPS 1 only, batch 1..4: what the engine profiler writes.
    rows = ((900.0, 1500.0, 2100.0, 2700.0), (1200.0, 2000.0, 2800.0, 3600.0),
            (600.0, 1000.0, 1400.0, 1800.0), (300.0, 500.0, 700.0, 900.0))
    return ModelProfile(model=model, num_blocks=4, cut_bytes_per_sample=(200704, 100352, 50176),
                        tables={("cpu", 1): BlockLatencyTable(model, "cpu", 1, rows)},
                        full_model_latency_us={"cpu": 3000.0},
                        input_bytes_per_sample=602112, output_bytes_per_sample=4000)


@pytest.mark.parametrize("policy", ["ppipe", "np", "dart-r"])
def test_plans_a_local_store_with_one_cpu_pool(tmp_path, policy):
    write_profile(tmp_path / "engines" / "cpu" / "demo" / "profile.json", _store_profile("demo"))
    profiles = load_profiles(tmp_path / "engines")
    cluster = ClusterSpec((GpuPool("cpu", 2, 1, 1, 10.0),), "local")
    plan = plan_cluster(profiles, cluster, [Workload("demo", 50.0, 1.0)], policy, HIGHS)
    verify_plan(plan, profiles)
    assert plan.gpus_used["cpu"] <= 2
    m = plan.model("demo")
    assert m.throughput_rps > 0
    assert all(s.gpu_class == "cpu" and s.mps_share == 1 for p in m.pipelines for s in p.stages)
