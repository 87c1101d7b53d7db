"""Turn solved allocations (candidates + integer workers) into a :class:`ppipe_trt.plan.Plan`."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Mapping, Sequence

from ppipe_trt.cluster import ClusterSpec, Workload
from ppipe_trt.plan import ModelPlan, PipelinePlan, Plan, StagePlan

from planner.milp import Allocation


def gpus_used_by_stages(stages: Sequence[tuple[int, str, int, int]]) -> dict[str, int]:
    """GPUs per class for one model: ``(stage index, class, mps share, workers)`` tuples, rounded
    up per (stage index, class) and summed (the paper's accounting)."""
    acc: dict[tuple[int, str], Fraction] = {}
    for index, cls, share, workers in stages:
        acc[(index, cls)] = acc.get((index, cls), Fraction(0)) + Fraction(workers, share)
    out: dict[str, int] = {}
    for (_, cls), frac in sorted(acc.items()):
        out[cls] = out.get(cls, 0) + math.ceil(frac)
    return out


def merge_allocations(allocs: Sequence[Allocation]) -> tuple[Allocation, ...]:
    """Sum the workers of allocations of the same candidate, keeping first-seen order."""
    merged: dict[int, Allocation] = {}
    order: list[int] = []
    for a in allocs:
        key = id(a.candidate)
        if key in merged:
            prev = merged[key]
            merged[key] = Allocation(a.candidate, tuple(x + y for x, y in
                                                        zip(prev.workers, a.workers)))
        else:
            merged[key] = a
            order.append(key)
    return tuple(merged[k] for k in order)


def _sort_key(a: Allocation) -> tuple:
    c = a.candidate
    return (len(c.stages), -a.throughput_rps, c.batch_size,
            tuple((s.first_block, s.gpu_class, s.mps_share) for s in c.stages))


def build_plan(policy: str, cluster: ClusterSpec, workloads: Sequence[Workload],
               allocations: Mapping[str, Sequence[Allocation]], *, solver: str, mip_gap: float,
               solve_s: float, params: Mapping[str, Any], profiles_source: str) -> Plan:
    """A Plan whose throughputs and GPU counts are recomputed from the integer workers."""
    models = []
    total: dict[str, int] = {p.gpu_class: 0 for p in cluster.pools}
    for wl in workloads:
        pipelines = []
        usage = []
        for alloc in sorted(allocations.get(wl.model, ()), key=_sort_key):
            cand = alloc.candidate
            stages = tuple(
                StagePlan(first_block=s.first_block, last_block=s.last_block,
                          gpu_class=s.gpu_class, mps_share=s.mps_share, workers=w,
                          latency_us=s.latency_us, transfer_us=s.transfer_us)
                for s, w in zip(cand.stages, alloc.workers))
            usage.extend((i, s.gpu_class, s.mps_share, w)
                         for i, (s, w) in enumerate(zip(cand.stages, alloc.workers)))
            pipelines.append(PipelinePlan(
                batch_size=cand.batch_size, stages=stages, throughput_rps=alloc.throughput_rps,
                latency_us=cand.latency_us, batching_delay_us=cand.batching_delay_us))
        used = gpus_used_by_stages(usage)
        for cls, n in used.items():
            total[cls] = total.get(cls, 0) + n
        models.append(ModelPlan(
            model=wl.model, slo_ms=wl.slo_ms, weight=wl.weight, pipelines=tuple(pipelines),
            throughput_rps=sum(p.throughput_rps for p in pipelines),
            gpus_used={p.gpu_class: used.get(p.gpu_class, 0) for p in cluster.pools}))
    normalized = min((m.throughput_rps / m.weight for m in models), default=0.0)
    return Plan(scheduler=policy, cluster=cluster, models=tuple(models),
                normalized_throughput=normalized, gpus_used=total, solver=solver,
                mip_gap=mip_gap, solve_s=solve_s, params=dict(params),
                profiles_source=profiles_source)
