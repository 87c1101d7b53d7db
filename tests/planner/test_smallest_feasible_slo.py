"""``smallest_feasible_slo_ms``: the tightest SLO the planner can plan a model at (profiles
only, no server)."""

from __future__ import annotations

import pytest

from ppipe_trt.cluster import ClusterSpec, GpuPool, Workload
from ppipe_trt.errors import InfeasiblePlanError
from ppipe_trt.profiles.types import BlockLatencyTable, ModelProfile, ProfileSet

from planner import (PlannerOptions, fastest_pipeline_us, plan_cluster, slo_for_latency_ms,
                     smallest_feasible_slo_ms)

HIGHS = PlannerOptions(solver="highs", time_limit_s=10.0)


def _profile(name: str, block_ms: dict[str, tuple[float, ...]]) -> ModelProfile:
    """Blocks of the given batch-1 latencies (ms) per class; batch b takes 1.6 x b / 2 as
    long (batching pays), up to batch 4."""
    n = len(next(iter(block_ms.values())))
    tables = {(cls, 1): BlockLatencyTable(name, cls, 1, tuple(
        tuple(ms * 1000.0 * (1.0 if b == 1 else 0.8 * b) for b in range(1, 5)) for ms in lat))
        for cls, lat in block_ms.items()}
    return ModelProfile(name, n, (4096,) * (n - 1), tables)


def _cluster(**counts: int) -> ClusterSpec:
    return ClusterSpec(tuple(GpuPool(cls, n, gpus_per_server=max(n, 1), link_bandwidth_gbps=100.0)
                             for cls, n in counts.items()), "test")


def test_it_is_the_fastest_batch1_pipeline_over_the_planned_fraction():
    prof = _profile("net", {"cpu": (1.0, 2.0, 0.5)})
    # 3.5 ms through the whole model, planned at 60 % of the SLO: 5.8333 -> 5.84 ms
    assert smallest_feasible_slo_ms(prof, _cluster(cpu=2)) == 5.84
    assert smallest_feasible_slo_ms(prof, _cluster(cpu=2),
                                    PlannerOptions(slo_margin=0.5)) == 7.0
    # the fastest class it can run on, not one it has no worker of
    two = _profile("net", {"cpu": (1.0, 2.0, 0.5), "T4": (0.25, 0.25, 0.5)})
    assert smallest_feasible_slo_ms(two, _cluster(cpu=1, T4=1)) == 1.67  # 1 ms on T4
    assert smallest_feasible_slo_ms(two, _cluster(cpu=1, T4=0)) == 5.84


def test_the_planner_places_the_model_at_it_and_not_just_below():
    profiles = ProfileSet({"net": _profile("net", {"cpu": (1.0, 2.0, 0.5)}),
                           "other": _profile("other", {"cpu": (3.0, 3.0, 3.0)})}, "test")
    cluster = _cluster(cpu=2)
    need = smallest_feasible_slo_ms(profiles["net"], cluster, HIGHS)
    plan = plan_cluster(profiles, cluster, [Workload("net", need), Workload("other", 100.0)],
                        "ppipe", HIGHS)
    assert plan.model("net").slo_ms == need and plan.model("net").throughput_rps > 0
    with pytest.raises(InfeasiblePlanError, match=r"model net: .*the smallest feasible SLO "
                                                  r"is 5\.84 ms"):
        plan_cluster(profiles, cluster, [Workload("net", need - 0.01),
                                         Workload("other", 100.0)], "ppipe", HIGHS)


def test_rounding_is_the_planners_own_test():
    for latency_us, fraction in ((600.0, 0.6), (3864.408, 0.6), (1234.5678, 0.55)):
        slo = slo_for_latency_ms(latency_us, fraction)
        assert slo * 1000.0 * fraction >= latency_us           # feasible at it
        assert (slo - 0.01) * 1000.0 * fraction < latency_us   # and not 0.01 ms below
    assert slo_for_latency_ms(600.0, 0.6) == 1.0


def test_a_model_of_no_class_the_cluster_has_is_named():
    prof = _profile("net", {"T4": (1.0, 1.0)})
    with pytest.raises(InfeasiblePlanError, match="model net has profiles for T4 but cluster "
                                                  "test has only cpu"):
        fastest_pipeline_us(prof, _cluster(cpu=1))
