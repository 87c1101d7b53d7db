"""Load-factor search: the largest offered load at which each model keeps >= 99 % attainment.

As in the paper, load factor 1.0 offers each model the throughput the *PPipe* plan gives it
(pass those rates as ``rates_rps`` when evaluating another plan, so every plan is measured on
the same offered load).  The search runs the whole cluster at factor ``f`` for ``f = start,
start - step, ...``; a model's factor is the first ``f`` at which its attainment reaches the
target, and the search stops when every model has one (or ``f`` falls below ``floor``: then
the remaining models get 0).  Each step is a full simulation (warm-up excluded).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Mapping

from ppipe_trt.errors import ConfigError
from ppipe_trt.plan import Plan
from ppipe_trt.profiles.types import ProfileSet
from ppipe_trt.simulator.engine import SimConfig, simulate
from ppipe_trt.simulator.metrics import SimResult


@dataclass(frozen=True, slots=True)
class SearchResult:
    per_model_load_factor: Mapping[str, float]
    runs: tuple[SimResult, ...]            # one per factor tried, highest first
    final: SimResult | None                # the run at which the last model reached the target

    @property
    def load_factor(self) -> float:
        """Mean over the models (the paper's per-group figure)."""
        v = list(self.per_model_load_factor.values())
        return sum(v) / len(v) if v else 0.0

    @property
    def utilization(self) -> Mapping[str, float]:
        return dict(self.final.utilization) if self.final else {}


def search_load_factor(plan: Plan, profiles: ProfileSet, config: SimConfig = SimConfig(), *,
                       target: float = 0.99, start: float = 1.0, step: float = 0.05,
                       floor: float = 0.05,
                       progress: Callable[[float, SimResult], None] | None = None
                       ) -> SearchResult:
    """Search down from ``start`` by ``step`` (see the module docstring)."""
    if not 0 < target <= 1:
        raise ConfigError(f"target attainment must be in (0, 1], got {target}")
    if not step > 0 or not start > 0:
        raise ConfigError(f"start and step must be > 0 (got {start}, {step})")
    found: dict[str, float] = {}
    runs = []
    final = None
    k = 0
    while True:
        f = round(start - k * step, 10)
        if f < floor - 1e-9:
            break
        res = simulate(plan, profiles, replace(config, load_factor=f))
        runs.append(res)
        if progress:
            progress(f, res)
        for m in res.models:
            if m.model not in found and m.attainment >= target:
                found[m.model] = f
        if len(found) == len(plan.models):
            final = res
            break
        k += 1
    factors = {m: found.get(m, 0.0) for m in plan.model_names}
    return SearchResult(factors, tuple(runs), final or (runs[-1] if runs else None))
