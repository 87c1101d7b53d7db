"""Planner knobs (:class:`PlannerOptions`) and the policy names the planner understands."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from ppipe_trt.errors import BadInputError

#: Planning policies: PPipe (pooled partitioned pipelines), NP (no partitioning), DART-r.
POLICIES = ("ppipe", "np", "dart-r")
#: Solver names; "auto" picks Gurobi when licensed and the model fits its licence, else HiGHS,
#: else CBC.
SOLVERS = ("auto", "highs", "gurobi", "cbc")


@dataclass(frozen=True, slots=True)
class PlannerOptions:
    """How the planner models latency and how hard it searches.

    ``slo_margin``: fraction of each model's SLO kept back; pipelines are planned against
    ``(1 - slo_margin) x SLO`` (the paper plans against 60 %).
    ``batching_delay_factor``: the batch-building delay of a pipeline with batch ``b`` is
    ``factor x (b - 1) / rate`` seconds, ``rate`` the model's estimated arrival rate (req/s),
    taken from the NP plan's throughput unless ``arrival_rates_rps`` names it.
    ``max_stages``: pipelines have 1..max_stages stages (2 in the paper; 3 is supported).
    ``max_batch``: batch sizes 1..max_batch (further limited by what each profile table holds).
    ``time_limit_s`` / ``mip_rel_gap``: per MILP solve.  ``tie_break``: after maximising the
    minimum normalized throughput, run a second solve that keeps the first solve's workers
    (they can only grow) and hands the GPUs left idle to the models, maximising the sum of
    normalized throughputs minus ``pipeline_penalty`` per newly opened pipeline.
    ``gpu_limits``: use at most this many GPUs of a class (must not exceed the cluster's).
    ``np_max_mps``: MPS share allowed to NP (1 in the paper's artifact: whole GPUs).
    ``deep_candidates_per_model``: with ``max_stages=3`` the candidate set is too large for a
    fast exact MILP; this many candidates per model chosen by an LP screening (see
    planner.milp.screen_candidates) are kept, plus those of the best plan of at most 2 stages,
    which is also the solver's starting point; ``deep_time_limit_s`` bounds that solve (the
    plan reports the remaining gap).
    """

    max_stages: int = 2
    max_batch: int = 8
    slo_margin: float = 0.4
    batching_delay_factor: float = 1.3
    solver: str = "auto"
    time_limit_s: float = 60.0
    mip_rel_gap: float = 2e-4
    tie_break: bool = True
    pipeline_penalty: float = 1e-3
    arrival_rates_rps: Mapping[str, float] | None = None
    gpu_limits: Mapping[str, int] | None = None
    np_max_mps: int = 1
    deep_candidates_per_model: int = 30
    deep_time_limit_s: float = 30.0
    gurobi_max_vars: int = 2000
    gurobi_max_constraints: int = 2000

    def __post_init__(self) -> None:
        if not 1 <= self.max_stages <= 3:
            raise BadInputError(f"max_stages must be 1, 2 or 3, got {self.max_stages!r}")
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise BadInputError(f"max_batch must be an integer >= 1, got {self.max_batch!r}")
        if not 0.0 <= self.slo_margin < 1.0:
            raise BadInputError(f"slo_margin must be in [0, 1), got {self.slo_margin!r}")
        if not self.batching_delay_factor >= 0.0:
            raise BadInputError(
                f"batching_delay_factor must be >= 0, got {self.batching_delay_factor!r}")
        if self.solver not in SOLVERS:
            raise BadInputError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if not self.time_limit_s > 0:
            raise BadInputError(f"time_limit_s must be > 0, got {self.time_limit_s!r}")
        if not 0.0 <= self.mip_rel_gap < 1.0:
            raise BadInputError(f"mip_rel_gap must be in [0, 1), got {self.mip_rel_gap!r}")
        if self.np_max_mps < 1:
            raise BadInputError(f"np_max_mps must be >= 1, got {self.np_max_mps!r}")
        for model, rate in (self.arrival_rates_rps or {}).items():
            if not rate > 0:
                raise BadInputError(f"arrival rate of {model} must be > 0 req/s, got {rate!r}")

    @property
    def slo_budget_fraction(self) -> float:
        return 1.0 - self.slo_margin

    def to_params(self) -> dict[str, Any]:
        """JSON-ready record of the knobs, for ``Plan.params``."""
        out = asdict(self)
        out["arrival_rates_rps"] = dict(self.arrival_rates_rps) if self.arrival_rates_rps else None
        out["gpu_limits"] = dict(self.gpu_limits) if self.gpu_limits else None
        return out
