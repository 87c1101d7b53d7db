"""What a simulation measures, and how it is summarised.

Only requests that *arrive* in the measured window ``[warmup, warmup + duration)`` count;
each ends completed in time, completed late, or dropped (with a reason).  *Attainment* is the
fraction completed in time (the paper's metric: not dropped and not late).  Temporal GPU
utilisation is, per GPU, the time any of its workers computes (the union of their busy
intervals) clipped to the window, over the window's length; a class's figure is the mean
over *all* its GPUs in the cluster, idle ones counting as 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np


@dataclass(frozen=True, slots=True)
class ModelMetrics:
    model: str
    offered_rps: float
    requests: int
    completed: int            # in time
    late: int
    dropped: Mapping[str, int]
    attainment: float
    latency_p50_us: float
    latency_p90_us: float
    latency_p99_us: float
    latency_max_us: float
    mean_batch: float
    batch_histogram: Mapping[int, int]

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


@dataclass(frozen=True, slots=True)
class WorkerQueueing:
    """Per worker: batches run in the window, and the wait (us) between a batch's input
    being ready at the worker and its start."""

    worker_id: int
    gpu_class: str
    batches: int
    mean_wait_us: float
    max_wait_us: float
    busy_fraction: float


@dataclass(frozen=True, slots=True)
class SimResult:
    plan_scheduler: str
    policy: str
    cluster: str
    load_factor: float
    duration_s: float
    warmup_s: float
    seed: int
    arrivals: str
    models: tuple[ModelMetrics, ...]
    utilization: Mapping[str, float]          # per GPU class, temporal, over all its GPUs
    gpu_utilization: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    workers: tuple[WorkerQueueing, ...] = ()
    events: int = 0
    wall_s: float = 0.0

    def model(self, name: str) -> ModelMetrics:
        for m in self.models:
            if m.model == name:
                return m
        raise KeyError(name)

    @property
    def attainment(self) -> float:
        """Attainment over all models' measured requests together."""
        total = sum(m.requests for m in self.models)
        return sum(m.completed for m in self.models) / total if total else 1.0

    @property
    def min_attainment(self) -> float:
        return min((m.attainment for m in self.models), default=1.0)

    def to_dict(self, workers: bool = False) -> dict[str, Any]:
        d = {
            "plan_scheduler": self.plan_scheduler, "policy": self.policy,
            "cluster": self.cluster, "load_factor": self.load_factor,
            "duration_s": self.duration_s, "warmup_s": self.warmup_s, "seed": self.seed,
            "arrivals": self.arrivals, "attainment": self.attainment,
            "utilization": dict(self.utilization),
            "gpu_utilization": {k: list(v) for k, v in self.gpu_utilization.items()},
            "events": self.events, "wall_s": self.wall_s,
            "models": [dict(asdict(m), dropped=dict(m.dropped),
                            batch_histogram={str(k): v for k, v in m.batch_histogram.items()})
                       for m in self.models],
        }
        if workers:
            d["workers"] = [asdict(w) for w in self.workers]
        return d


def percentiles(values: list[float], qs=(50, 90, 99)) -> tuple[float, ...]:
    if not values:
        return tuple(0.0 for _ in qs) + (0.0,)
    arr = np.asarray(values)
    return tuple(float(x) for x in np.percentile(arr, qs)) + (float(arr.max()),)


def busy_union_us(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of the union of ``intervals`` clipped to ``[lo, hi]``."""
    total = 0.0
    cur_s = cur_e = None
    for s, e in sorted(intervals):
        s = max(s, lo)
        e = min(e, hi)
        if e <= s:
            continue
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        elif e > cur_e:
            cur_e = e
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def format_table(result: SimResult) -> str:
    """A plain-text table of a result's per-model metrics and utilisation."""
    lines = [f"plan {result.plan_scheduler} | policy {result.policy} | cluster {result.cluster} | "
             f"load {result.load_factor:.2f} | {result.arrivals} | {result.duration_s:g} s "
             f"(+{result.warmup_s:g} s warm-up) | seed {result.seed}",
             f"{'model':<46} {'rps':>8} {'reqs':>7} {'attain':>7} {'late':>6} {'drop':>6} "
             f"{'p50 ms':>7} {'p99 ms':>7} {'batch':>5}"]
    for m in result.models:
        lines.append(f"{m.model[:46]:<46} {m.offered_rps:>8.1f} {m.requests:>7d} "
                     f"{100 * m.attainment:>6.2f}% {m.late:>6d} {m.dropped_total:>6d} "
                     f"{m.latency_p50_us / 1e3:>7.2f} {m.latency_p99_us / 1e3:>7.2f} "
                     f"{m.mean_batch:>5.2f}")
    util = ", ".join(f"{k} {100 * v:.1f}%" for k, v in result.utilization.items())
    lines.append(f"GPU utilisation (temporal, all GPUs of the class): {util}")
    drops: dict[str, int] = {}
    for m in result.models:
        for k, v in m.dropped.items():
            drops[k] = drops.get(k, 0) + v
    if drops:
        lines.append("drops by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(drops.items())))
    return "\n".join(lines)


_OK_, _LATE_ = "ok", "late"


def summarise_run(plan, config, run, rates, warm_us, end_us, wall_s) -> SimResult:
    """A :class:`SimResult` of an engine run (``ppipe_trt.simulator.engine.EventRun``) over
    the requests arriving in ``[warm_us, end_us)``."""
    models = plan.model_names
    req_model, req_arrival, outcome = run.req_model, run.req_arrival, run.outcome
    finish_at, batch_sizes, busy, waits = run.finish_at, run.batch_sizes, run.busy, run.waits
    lat_by_model: list[list[float]] = [[] for _ in models]
    counts = [dict() for _ in models]
    for rid, mi in enumerate(req_model):
        t = req_arrival[rid]
        if t < warm_us or t >= end_us:
            continue
        o = outcome[rid] or "unresolved"
        c = counts[mi]
        c[o] = c.get(o, 0) + 1
        if o == _OK_ or o == _LATE_:
            lat_by_model[mi].append(finish_at[rid] - t)
    out = []
    for mi, m in enumerate(models):
        c = counts[mi]
        n = sum(c.values())
        p50, p90, p99, pmax = percentiles(lat_by_model[mi])
        hist = dict(sorted(batch_sizes[mi].items()))
        nb = sum(hist.values())
        out.append(ModelMetrics(
            model=m, offered_rps=rates[m], requests=n, completed=c.get(_OK_, 0),
            late=c.get(_LATE_, 0),
            dropped={k: v for k, v in c.items() if k not in (_OK_, _LATE_)},
            attainment=c.get(_OK_, 0) / n if n else 1.0,
            latency_p50_us=p50, latency_p90_us=p90, latency_p99_us=p99, latency_max_us=pmax,
            mean_batch=sum(k * v for k, v in hist.items()) / nb if nb else 0.0,
            batch_histogram=hist))
    span = end_us - warm_us
    workers = [run.slots[k] for k in sorted(run.slots)]
    gpu_util: dict[str, list[float]] = {c: [0.0] * n for c, n in run.gpus_per_class.items()}
    per_gpu: dict[tuple[str, int], list] = {}
    for w in workers:
        per_gpu.setdefault((w.gpu_class, w.gpu_index), []).extend(busy[w.worker_id])
    for (cls, gi), iv in per_gpu.items():
        gpu_util[cls][gi] = busy_union_us(iv, warm_us, end_us) / span
    util = {c: (sum(v) / len(v) if v else 0.0) for c, v in gpu_util.items()}
    wq = []
    for w in workers:
        ws = waits[w.worker_id]
        wq.append(WorkerQueueing(
            w.worker_id, w.gpu_class, len(ws), sum(ws) / len(ws) if ws else 0.0,
            max(ws) if ws else 0.0, busy_union_us(busy[w.worker_id], warm_us, end_us) / span))
    return SimResult(
        plan_scheduler=plan.scheduler, policy=config.policy, cluster=plan.cluster.label,
        load_factor=config.load_factor, duration_s=config.duration_s,
        warmup_s=config.warmup_s, seed=config.seed, arrivals=str(config.arrivals),
        models=tuple(out), utilization=util,
        gpu_utilization={c: tuple(v) for c, v in gpu_util.items()}, workers=tuple(wq),
        events=run.events, wall_s=wall_s)
