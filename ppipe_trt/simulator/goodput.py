"""Goodput search: the largest total offered rate at which every model keeps the target.

Goodput (req/s) is the largest total rate ``R`` such that, with each model offered
``R x weight / sum(weights)``, every model completes at least ``target`` (99 %) of its
requests within its SLO.  Unlike the load factor (relative to each plan's own capacity),
goodput compares different plans of the same workload on one absolute scale.

The search starts at the plan's max-min objective (``normalized_throughput x sum(weights)``,
what the planner promises), walks up or down in ``step`` (relative) until the outcome flips,
then bisects to ``rel_tol``.  Each probe is a full simulation (warm-up excluded); attainment
is assumed to fall with the rate.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ppipe_trt.errors import ConfigError
from ppipe_trt.plan import Plan
from ppipe_trt.profiles.types import ProfileSet
from ppipe_trt.simulator.engine import SimConfig, simulate
from ppipe_trt.simulator.metrics import SimResult


@dataclass(frozen=True, slots=True)
class GoodputResult:
    goodput_rps: float                    # 0 when even the lowest probe missed the target
    probes: tuple[tuple[float, float], ...]  # (total rate req/s, lowest model attainment)
    at_goodput: SimResult | None          # the run at the goodput rate


def model_rates_rps(plan: Plan, total_rps: float) -> dict[str, float]:
    """Each model's share of ``total_rps`` by its workload weight."""
    wsum = sum(m.weight for m in plan.models)
    return {m.model: total_rps * m.weight / wsum for m in plan.models}


def search_goodput(plan: Plan, profiles: ProfileSet, config: SimConfig = SimConfig(), *,
                   target: float = 0.99, step: float = 0.1, rel_tol: float = 0.02,
                   max_probes: int = 12, start_rps: float | None = None) -> GoodputResult:
    """Search the goodput of ``plan`` (see the module doc); ``config``'s rates and load
    factor are replaced by the probes'."""
    if not 0 < target <= 1:
        raise ConfigError(f"target attainment must be in (0, 1], got {target}")
    if not (step > 0 and rel_tol > 0):
        raise ConfigError(f"step and rel_tol must be > 0 (got {step}, {rel_tol})")
    wsum = sum(m.weight for m in plan.models)
    rate = start_rps if start_rps is not None else plan.normalized_throughput * wsum
    if not rate > 0:
        raise ConfigError(f"start rate must be > 0 req/s, got {rate}")
    probes: list[tuple[float, float]] = []
    runs: dict[float, SimResult] = {}

    def ok(total: float) -> bool:
        res = simulate(plan, profiles, replace(config, load_factor=1.0,
                                               rates_rps=model_rates_rps(plan, total)))
        probes.append((total, res.min_attainment))
        runs[total] = res
        return res.min_attainment >= target

    lo = hi = None
    if ok(rate):
        lo = rate
        while hi is None and len(probes) < max_probes:
            r = lo * (1 + step)
            if ok(r):
                lo = r
            else:
                hi = r
    else:
        hi = rate
        while lo is None and len(probes) < max_probes:
            r = hi / (1 + step)
            if ok(r):
                lo = r
            else:
                hi = r
    while lo is not None and hi is not None and hi / lo - 1 > rel_tol \
            and len(probes) < max_probes:
        mid = (lo * hi) ** 0.5
        if ok(mid):
            lo = mid
        else:
            hi = mid
    if lo is None:
        return GoodputResult(0.0, tuple(probes), None)
    return GoodputResult(lo, tuple(probes), runs[lo])
