"""Re-check a plan outside the solver, with the planner's own cost model (planner.costs).

Checked: every stage's block range, class, MPS share and batch exist in the profiles and the
cluster; pipelines cover the whole model; stage latencies and transfers match the profiles;
pipeline latency (stages + transfers + batch-building delay) fits the planned share of the
SLO; no pipeline claims more throughput than its workers and links deliver; per-model and
total GPU counts (rounded up per model, stage index and class) fit the cluster and match what
the plan declares; the normalized throughput is the minimum of throughput / weight.
"""

from __future__ import annotations

import math

from ppipe_trt.errors import InfeasiblePlanError, PPipeError
from ppipe_trt.plan import Plan
from ppipe_trt.profiles.types import ProfileSet

from planner.assemble import gpus_used_by_stages
from planner.costs import batching_delay_us, stage_capacity_rps, stage_transfer_us

_REL_TOL = 1e-6


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_REL_TOL, abs_tol=1e-6)


def verify_plan(plan: Plan, profiles: ProfileSet) -> None:
    """Raise InfeasiblePlanError naming the first violation found; return None if the plan holds.

    Uses ``plan.params``: ``slo_margin`` (default 0.4), ``batching_delay_factor`` (1.3) and
    ``arrival_rates_rps`` (per model; without it the batching delay is taken as declared).
    """
    params = plan.params or {}
    margin = float(params.get("slo_margin", 0.4))
    factor = float(params.get("batching_delay_factor", 1.3))
    rates = params.get("arrival_rates_rps") or {}
    cluster = plan.cluster
    limits = dict(params.get("gpu_limits") or {p.gpu_class: p.count for p in cluster.pools})
    total: dict[str, int] = {}
    for m in plan.models:
        where = f"model {m.model}"
        try:
            prof = profiles[m.model]
        except PPipeError as exc:
            raise InfeasiblePlanError(f"{where}: {exc}") from None
        budget_us = m.slo_ms * 1000.0 * (1.0 - margin)
        usage = []
        model_rps = 0.0
        for pi, p in enumerate(m.pipelines):
            pw = f"{where} pipeline {pi}"
            if p.first_block != 0 or p.last_block != prof.num_blocks - 1:
                raise InfeasiblePlanError(
                    f"{pw}: covers blocks {p.first_block}..{p.last_block}; expected "
                    f"0..{prof.num_blocks - 1}")
            latency = 0.0
            capacity = math.inf
            for si, s in enumerate(p.stages):
                sw = f"{pw} stage {si} ({s.gpu_class} MPS {s.mps_share})"
                try:
                    pool = cluster.pool(s.gpu_class)
                except PPipeError as exc:
                    raise InfeasiblePlanError(f"{sw}: {exc}") from None
                if s.mps_share > pool.max_mps:
                    raise InfeasiblePlanError(
                        f"{sw}: MPS share {s.mps_share} exceeds the pool's max_mps "
                        f"{pool.max_mps}")
                if s.workers < 1:
                    raise InfeasiblePlanError(f"{sw}: {s.workers} workers; expected >= 1")
                try:
                    lat = prof.range_latency_us(s.gpu_class, s.mps_share, s.first_block,
                                                s.last_block, p.batch_size)
                    cap = stage_capacity_rps(prof, cluster, s.first_block, s.last_block,
                                             s.gpu_class, s.mps_share, p.batch_size)
                except PPipeError as exc:
                    raise InfeasiblePlanError(f"{sw}: {exc}") from None
                if not _close(lat, s.latency_us):
                    raise InfeasiblePlanError(
                        f"{sw}: latency_us {s.latency_us:.1f} but the profile gives {lat:.1f}")
                nxt = p.stages[si + 1].gpu_class if si + 1 < len(p.stages) else None
                trans = stage_transfer_us(prof, cluster, s.last_block, s.gpu_class, nxt,
                                          p.batch_size)
                if not _close(trans, s.transfer_us):
                    raise InfeasiblePlanError(
                        f"{sw}: transfer_us {s.transfer_us:.1f} but the cut and link give "
                        f"{trans:.1f}")
                latency += lat + trans
                capacity = min(capacity, cap * s.workers)
                usage.append((si, s.gpu_class, s.mps_share, s.workers))
            if m.model in rates:
                delay = batching_delay_us(p.batch_size, float(rates[m.model]), factor)
                if not _close(delay, p.batching_delay_us):
                    raise InfeasiblePlanError(
                        f"{pw}: batching_delay_us {p.batching_delay_us:.1f} but batch "
                        f"{p.batch_size} at {float(rates[m.model]):.1f} req/s gives {delay:.1f}")
            latency += p.batching_delay_us
            if not _close(latency, p.latency_us):
                raise InfeasiblePlanError(
                    f"{pw}: latency_us {p.latency_us:.1f} but stages + transfers + batching "
                    f"delay give {latency:.1f}")
            if latency > budget_us * (1 + _REL_TOL):
                raise InfeasiblePlanError(
                    f"{pw}: latency {latency / 1000:.3f} ms exceeds {1 - margin:.0%} of the "
                    f"{m.slo_ms:.3f} ms SLO ({budget_us / 1000:.3f} ms)")
            if p.throughput_rps > capacity * (1 + _REL_TOL) + 1e-9:
                raise InfeasiblePlanError(
                    f"{pw}: claims {p.throughput_rps:.2f} req/s but its workers and links "
                    f"deliver {capacity:.2f}")
            model_rps += p.throughput_rps
        if not _close(model_rps, m.throughput_rps):
            raise InfeasiblePlanError(
                f"{where}: throughput_rps {m.throughput_rps:.2f} but its pipelines sum to "
                f"{model_rps:.2f}")
        used = gpus_used_by_stages(usage)
        for cls in set(used) | set(m.gpus_used):
            if used.get(cls, 0) != m.gpus_used.get(cls, 0):
                raise InfeasiblePlanError(
                    f"{where}: declares {m.gpus_used.get(cls, 0)} {cls} GPUs but its workers "
                    f"need {used.get(cls, 0)} (rounded up per stage index)")
            total[cls] = total.get(cls, 0) + used.get(cls, 0)
    for cls, n in total.items():
        have = limits.get(cls, 0)
        if n > have:
            raise InfeasiblePlanError(f"plan uses {n} {cls} GPUs; the cluster allows {have}")
        if n != plan.gpus_used.get(cls, 0):
            raise InfeasiblePlanError(
                f"plan declares {plan.gpus_used.get(cls, 0)} {cls} GPUs in total but its models "
                f"use {n}")
    normalized = min((m.throughput_rps / m.weight for m in plan.models), default=0.0)
    if not _close(normalized, plan.normalized_throughput):
        raise InfeasiblePlanError(
            f"normalized_throughput {plan.normalized_throughput:.2f} but min over models of "
            f"throughput / weight is {normalized:.2f}")
