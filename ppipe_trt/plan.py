"""The plan: what the control plane decides and the data plane executes.

A :class:`Plan` holds, per model, a set of pooled pipelines.  Each pipeline has one batch size
and 1..K stages; a stage is a contiguous, inclusive block range served by ``workers`` workers
of one GPU class, each owning ``1/mps_share`` of a GPU.  Plans are written as versioned JSON
(``PLAN_FORMAT_VERSION``); :func:`load_plan` refuses other versions with a clear message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ppipe_trt.cluster import ClusterSpec
from ppipe_trt.errors import ConfigError

PLAN_FORMAT = "ppipe-trt-plan"
PLAN_FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class StagePlan:
    """One stage of a pipeline.

    ``latency_us``: compute latency of the block range on one worker at the pipeline's batch.
    ``transfer_us``: time to send that batch's activations to the next stage over the
    source server's link (0 for the last stage).
    """

    first_block: int
    last_block: int
    gpu_class: str
    mps_share: int
    workers: int
    latency_us: float
    transfer_us: float = 0.0

    @property
    def num_blocks(self) -> int:
        return self.last_block - self.first_block + 1


@dataclass(frozen=True, slots=True)
class PipelinePlan:
    """A pooled pipeline.  ``latency_us`` = stage latencies + transfers + batching delay."""

    batch_size: int
    stages: tuple[StagePlan, ...]
    throughput_rps: float
    latency_us: float
    batching_delay_us: float = 0.0

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("pipeline has no stages")
        for a, b in zip(self.stages, self.stages[1:]):
            if b.first_block != a.last_block + 1:
                raise ConfigError(
                    f"pipeline stages are not contiguous: {a.first_block}..{a.last_block} then "
                    f"{b.first_block}..{b.last_block}")

    @property
    def first_block(self) -> int:
        return self.stages[0].first_block

    @property
    def last_block(self) -> int:
        return self.stages[-1].last_block


@dataclass(frozen=True, slots=True)
class ModelPlan:
    model: str
    slo_ms: float
    weight: float
    pipelines: tuple[PipelinePlan, ...]
    throughput_rps: float
    gpus_used: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Plan:
    """A whole cluster's plan.

    ``scheduler`` names the planning policy (``ppipe``, ``np``, ``dart-r``).
    ``normalized_throughput`` = min over models of ``throughput_rps / weight``.
    ``params`` records the knobs used (SLO margin, batching-delay factor, max stages, ...).
    """

    scheduler: str
    cluster: ClusterSpec
    models: tuple[ModelPlan, ...]
    normalized_throughput: float
    gpus_used: Mapping[str, int]
    solver: str = ""
    mip_gap: float = 0.0
    solve_s: float = 0.0
    params: Mapping[str, Any] = field(default_factory=dict)
    profiles_source: str = ""

    def model(self, name: str) -> ModelPlan:
        for m in self.models:
            if m.model == name:
                return m
        raise ConfigError(f"plan has no model {name!r}; models: {[m.model for m in self.models]}")

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(m.model for m in self.models)


# ---- JSON --------------------------------------------------------------------------------

def plan_to_dict(plan: Plan) -> dict[str, Any]:
    return {
        "format": PLAN_FORMAT,
        "version": PLAN_FORMAT_VERSION,
        "scheduler": plan.scheduler,
        "cluster": plan.cluster.to_dict(),
        "normalized_throughput": plan.normalized_throughput,
        "gpus_used": dict(plan.gpus_used),
        "solver": plan.solver,
        "mip_gap": plan.mip_gap,
        "solve_s": plan.solve_s,
        "params": dict(plan.params),
        "profiles_source": plan.profiles_source,
        "models": [
            {
                "model": m.model, "slo_ms": m.slo_ms, "weight": m.weight,
                "throughput_rps": m.throughput_rps, "gpus_used": dict(m.gpus_used),
                "pipelines": [
                    {
                        "batch_size": p.batch_size, "throughput_rps": p.throughput_rps,
                        "latency_us": p.latency_us, "batching_delay_us": p.batching_delay_us,
                        "stages": [
                            {"first_block": s.first_block, "last_block": s.last_block,
                             "gpu_class": s.gpu_class, "mps_share": s.mps_share,
                             "workers": s.workers, "latency_us": s.latency_us,
                             "transfer_us": s.transfer_us}
                            for s in p.stages
                        ],
                    }
                    for p in m.pipelines
                ],
            }
            for m in plan.models
        ],
    }


def plan_from_dict(data: Any, where: str = "plan") -> Plan:
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
        raise ConfigError(f"{where}: not a {PLAN_FORMAT} file (missing \"format\")")
    if data.get("version") != PLAN_FORMAT_VERSION:
        raise ConfigError(f"{where}: plan format version {data.get('version')!r}; this build "
                          f"reads version {PLAN_FORMAT_VERSION}")
    try:
        models = []
        for m in data["models"]:
            pipelines = tuple(
                PipelinePlan(
                    batch_size=int(p["batch_size"]),
                    stages=tuple(StagePlan(
                        first_block=int(s["first_block"]), last_block=int(s["last_block"]),
                        gpu_class=str(s["gpu_class"]), mps_share=int(s["mps_share"]),
                        workers=int(s["workers"]), latency_us=float(s["latency_us"]),
                        transfer_us=float(s.get("transfer_us", 0.0))) for s in p["stages"]),
                    throughput_rps=float(p["throughput_rps"]),
                    latency_us=float(p["latency_us"]),
                    batching_delay_us=float(p.get("batching_delay_us", 0.0)))
                for p in m["pipelines"])
            models.append(ModelPlan(
                model=str(m["model"]), slo_ms=float(m["slo_ms"]), weight=float(m["weight"]),
                pipelines=pipelines, throughput_rps=float(m["throughput_rps"]),
                gpus_used={str(k): int(v) for k, v in m.get("gpus_used", {}).items()}))
        return Plan(
            scheduler=str(data["scheduler"]),
            cluster=ClusterSpec.from_dict(data["cluster"], f"{where}: cluster"),
            models=tuple(models),
            normalized_throughput=float(data["normalized_throughput"]),
            gpus_used={str(k): int(v) for k, v in data.get("gpus_used", {}).items()},
            solver=str(data.get("solver", "")),
            mip_gap=float(data.get("mip_gap", 0.0)),
            solve_s=float(data.get("solve_s", 0.0)),
            params=dict(data.get("params", {})),
            profiles_source=str(data.get("profiles_source", "")),
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: malformed plan ({type(exc).__name__}: {exc})") from None


def save_plan(plan: Plan, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan_to_dict(plan), indent=1))
    return path


def load_plan(path: Path | str) -> Plan:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such plan file") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON ({exc})") from None
    return plan_from_dict(data, str(path))
