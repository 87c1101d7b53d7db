"""Cluster and workload specifications, and the paper's evaluation setting.

A cluster is a set of *pools*, one per GPU class.  GPUs of a pool sit in servers of
``gpus_per_server`` GPUs that share one network link of ``link_bandwidth_gbps`` (both
directions are modelled separately by the scheduler: an uplink and a downlink per server).

File schema (YAML or JSON)::

    name: L4-T4                 # optional
    pools:
      - gpu_class: L4
        count: 25
        gpus_per_server: 4
        max_mps: 4              # MPS shares 1..max_mps are allowed on this class
        link_bandwidth_gbps: 10
      - {gpu_class: T4, count: 75, gpus_per_server: 2, max_mps: 4, link_bandwidth_gbps: 10}

Workloads::

    workloads:
      - model: colorization-v2
        slo_ms: 71.75           # or slo_x_l4: 5  (5 x the model's L4 batch-1 latency)
        weight: 0.30
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ppipe_trt.errors import ConfigError
from ppipe_trt.profiles.types import ProfileSet


@dataclass(frozen=True, slots=True)
class GpuPool:
    """All GPUs of one class in a cluster."""

    gpu_class: str
    count: int
    gpus_per_server: int = 1
    max_mps: int = 1
    link_bandwidth_gbps: float = 10.0

    def __post_init__(self) -> None:
        if not self.gpu_class:
            raise ConfigError("pool has an empty gpu_class")
        for name in ("count", "gpus_per_server", "max_mps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "count" else 1):
                raise ConfigError(f"pool {self.gpu_class}: {name} must be an integer >= "
                                  f"{0 if name == 'count' else 1}, got {value!r}")
        if not self.link_bandwidth_gbps > 0:
            raise ConfigError(f"pool {self.gpu_class}: link_bandwidth_gbps must be > 0, "
                              f"got {self.link_bandwidth_gbps!r}")

    @property
    def num_servers(self) -> int:
        return -(-self.count // self.gpus_per_server)

    @property
    def mps_shares(self) -> tuple[int, ...]:
        return tuple(range(1, self.max_mps + 1))


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    pools: tuple[GpuPool, ...]
    name: str = ""

    def __post_init__(self) -> None:
        if not self.pools:
            raise ConfigError("cluster has no GPU pools")
        names = [p.gpu_class for p in self.pools]
        if len(set(names)) != len(names):
            raise ConfigError(f"cluster lists a GPU class twice: {names}")

    @property
    def gpu_classes(self) -> tuple[str, ...]:
        return tuple(p.gpu_class for p in self.pools)

    def pool(self, gpu_class: str) -> GpuPool:
        for p in self.pools:
            if p.gpu_class == gpu_class:
                return p
        raise ConfigError(f"cluster {self.name or ''} has no {gpu_class} GPUs; "
                          f"classes: {', '.join(self.gpu_classes)}")

    @property
    def label(self) -> str:
        return self.name or "-".join(self.gpu_classes)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.label, "pools": [
            {"gpu_class": p.gpu_class, "count": p.count, "gpus_per_server": p.gpus_per_server,
             "max_mps": p.max_mps, "link_bandwidth_gbps": p.link_bandwidth_gbps}
            for p in self.pools]}

    @classmethod
    def from_dict(cls, data: Any, where: str = "cluster") -> "ClusterSpec":
        if not isinstance(data, dict) or not isinstance(data.get("pools"), list):
            raise ConfigError(f"{where}: expected a mapping with a 'pools' list")
        pools = []
        for i, entry in enumerate(data["pools"]):
            if not isinstance(entry, dict):
                raise ConfigError(f"{where}: pools[{i}] must be a mapping")
            unknown = set(entry) - {"gpu_class", "count", "gpus_per_server", "max_mps",
                                    "link_bandwidth_gbps"}
            if unknown:
                raise ConfigError(f"{where}: pools[{i}] has unknown keys {sorted(unknown)}")
            try:
                pools.append(GpuPool(
                    gpu_class=str(entry["gpu_class"]), count=entry["count"],
                    gpus_per_server=entry.get("gpus_per_server", 1),
                    max_mps=entry.get("max_mps", 1),
                    link_bandwidth_gbps=float(entry.get("link_bandwidth_gbps", 10.0))))
            except KeyError as exc:
                raise ConfigError(f"{where}: pools[{i}] misses {exc}") from None
        return cls(tuple(pools), str(data.get("name", "")))


@dataclass(frozen=True, slots=True)
class Workload:
    """One model to serve: its latency SLO (ms) and the weight of its share of the load."""

    model: str
    slo_ms: float
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.slo_ms > 0:
            raise ConfigError(f"workload {self.model}: slo_ms must be > 0, got {self.slo_ms!r}")
        if not self.weight > 0:
            raise ConfigError(f"workload {self.model}: weight must be > 0, got {self.weight!r}")

    @property
    def slo_us(self) -> float:
        return self.slo_ms * 1000.0


def workloads_from_dict(data: Any, profiles: ProfileSet | None = None,
                        where: str = "workloads") -> tuple[Workload, ...]:
    items = data.get("workloads") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where}: expected a non-empty 'workloads' list")
    out = []
    for i, entry in enumerate(items):
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"{where}: workloads[{i}] must be a mapping with 'model'")
        model = str(entry["model"])
        if "slo_ms" in entry:
            slo_ms = float(entry["slo_ms"])
        elif "slo_x_l4" in entry:
            if profiles is None:
                raise ConfigError(f"{where}: workloads[{i}] uses slo_x_l4 but no profiles given")
            slo_ms = float(entry["slo_x_l4"]) * profiles[model].batch1_latency_us("L4") / 1000.0
        else:
            raise ConfigError(f"{where}: workloads[{i}] ({model}) needs slo_ms or slo_x_l4")
        out.append(Workload(model, slo_ms, float(entry.get("weight", 1.0))))
    return tuple(out)


def workloads_to_dict(workloads: Iterable[Workload]) -> dict[str, Any]:
    return {"workloads": [{"model": w.model, "slo_ms": w.slo_ms, "weight": w.weight}
                          for w in workloads]}


def read_structured_file(path: Path | str) -> Any:
    """Parse a YAML or JSON file (by suffix; YAML is a superset, so it is the fallback)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    try:
        if path.suffix == ".json":
            return json.loads(text)
        import yaml
        return yaml.safe_load(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
        raise ConfigError(f"{path}: cannot parse ({exc})") from None


def load_cluster(path: Path | str) -> ClusterSpec:
    return ClusterSpec.from_dict(read_structured_file(path), str(path))


def load_workloads(path: Path | str, profiles: ProfileSet | None = None) -> tuple[Workload, ...]:
    return workloads_from_dict(read_structured_file(path), profiles, str(path))


# ---- the paper's evaluation setting (eval_setting.json in the shared profiles) --------------

@dataclass(frozen=True, slots=True)
class PaperSetting:
    clusters: tuple[ClusterSpec, ...]
    model_groups: tuple[tuple[str, ...], ...]
    weights: tuple[float, ...]
    slo_multiplier: float
    max_stages: int
    max_batch: int

    def cluster(self, label: str) -> ClusterSpec:
        for c in self.clusters:
            if c.label == label:
                return c
        raise ConfigError(f"no cluster {label!r}; have {[c.label for c in self.clusters]}")

    def workloads(self, group: int, profiles: ProfileSet) -> tuple[Workload, ...]:
        """Workloads of model group ``group`` (1-based, eval_setting.json order)."""
        if not 1 <= group <= len(self.model_groups):
            raise ConfigError(f"model group {group} outside 1..{len(self.model_groups)}")
        models = self.model_groups[group - 1]
        return tuple(
            Workload(m, self.slo_multiplier * profiles[m].batch1_latency_us("L4") / 1000.0, w)
            for m, w in zip(models, self.weights))


def load_paper_setting(profiles_dir: Path | str) -> PaperSetting:
    path = Path(profiles_dir) / "eval_setting.json"
    data = read_structured_file(path)
    try:
        clusters = []
        for c in data["clusters"]:
            pools = tuple(
                GpuPool(gpu_class=g, count=int(n), gpus_per_server=int(s), max_mps=int(m),
                        link_bandwidth_gbps=float(c["bandwidth_gbps"]))
                for g, n, s, m in zip(c["gpus"], c["counts"], c["gpus_per_server"], c["max_mps"]))
            clusters.append(ClusterSpec(pools, "-".join(c["gpus"])))
        return PaperSetting(
            clusters=tuple(clusters),
            model_groups=tuple(tuple(g) for g in data["model_groups"]),
            weights=tuple(float(w) for w in data["workload_weights_maf19"]),
            slo_multiplier=float(data["slo_multiplier_of_L4_batch1_latency"]),
            max_stages=int(data["max_partitions"]),
            max_batch=int(data["max_batch"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: unexpected layout ({type(exc).__name__}: {exc})") from None
