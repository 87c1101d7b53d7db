"""Prometheus metrics: the runtime's counters (read at scrape time) plus HTTP counters.

Each app has its own registry, so several apps (tests) can live in one process.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.exposition import generate_latest

from ppipe_trt.serving.runtime import ServingRuntime

HTTP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class RuntimeCollector:
    """Turns :class:`ServingRuntime` counters into metric families on each scrape."""

    def __init__(self, get_runtime: Callable[[], ServingRuntime | None]):
        self._get_runtime = get_runtime

    def collect(self):
        rt = self._get_runtime()
        if rt is None:
            return
        snap = rt.stats.snapshot()
        emulated = "true" if any(m.emulated for m in rt.models.values()) else "false"
        reqs = CounterMetricFamily("ppipe_requests", "Requests accepted by the runtime",
                                   labels=["model"])
        done = CounterMetricFamily("ppipe_completions", "Requests answered with a result",
                                   labels=["model"])
        ok = CounterMetricFamily("ppipe_completions_within_deadline",
                                 "Results delivered by their deadline", labels=["model"])
        fails = CounterMetricFamily("ppipe_failures", "Requests whose batch failed",
                                    labels=["model"])
        drops = CounterMetricFamily("ppipe_drops", "Requests dropped, by reason",
                                    labels=["model", "reason"])
        lat = HistogramMetricFamily("ppipe_request_latency_seconds",
                                    "End-to-end runtime latency (arrival to last stage)",
                                    labels=["model", "emulated"])
        batch = HistogramMetricFamily("ppipe_batch_size", "Batch sizes dispatched",
                                      labels=["model"])
        for model, c in snap.items():
            reqs.add_metric([model], c.requests)
            done.add_metric([model], c.completions)
            ok.add_metric([model], c.within_deadline)
            fails.add_metric([model], c.failures)
            for reason, n in sorted(c.drops.items()):
                drops.add_metric([model, reason], n)
            lat.add_metric([model, emulated], c.latency_s.cumulative(), c.latency_s.total)
            max_batch = rt.models[model].max_batch
            running, buckets, total = 0, [], 0.0
            for size in range(1, max_batch + 1):
                running += c.batch_sizes.get(size, 0)
                total += size * c.batch_sizes.get(size, 0)
                buckets.append((repr(float(size)), running))
            running += sum(n for s, n in c.batch_sizes.items() if s > max_batch)
            buckets.append(("+Inf", running))
            batch.add_metric([model], buckets, total)
        busy = GaugeMetricFamily("ppipe_worker_busy_fraction",
                                 "Fraction of wall time a worker spent on batches since start",
                                 labels=["worker", "model", "stage", "gpu_class", "mode"])
        queue = GaugeMetricFamily("ppipe_worker_queue_length", "Batches waiting at a worker",
                                  labels=["worker", "model", "stage", "gpu_class", "mode"])
        overruns = CounterMetricFamily("ppipe_worker_emulation_overruns",
                                       "Batches whose real compute exceeded the emulated latency",
                                       labels=["worker", "model", "stage", "gpu_class", "mode"])
        lag = CounterMetricFamily("ppipe_worker_start_lag_seconds",
                                  "Sum over batches of how late each started after it could "
                                  "(reserved start reached and input there)",
                                  labels=["worker", "model", "stage", "gpu_class", "mode"])
        lag_max = GaugeMetricFamily("ppipe_worker_start_lag_max_seconds",
                                    "Largest start lag of one batch since start",
                                    labels=["worker", "model", "stage", "gpu_class", "mode"])
        batches = CounterMetricFamily("ppipe_worker_batches", "Batches a worker has run",
                                      labels=["worker", "model", "stage", "gpu_class", "mode"])
        now = rt.now_us()
        for s in rt.worker_stats():
            labels = [str(s.worker_id), s.model, str(s.stage), s.gpu_class, s.mode]
            elapsed = max(1.0, now - s.started_us)
            busy.add_metric(labels, min(1.0, s.busy_us / elapsed))
            queue.add_metric(labels, s.queue_length)
            overruns.add_metric(labels, s.overruns)
            lag.add_metric(labels, s.start_lag_us_total / 1e6)
            lag_max.add_metric(labels, s.start_lag_us_max / 1e6)
            batches.add_metric(labels, s.batches)
        yield from (reqs, done, ok, fails, drops, lat, batch, busy, queue, overruns, lag,
                    lag_max, batches)
        # Whether each worker is in its pool (a quarantined local worker, a Ray actor down).
        up = GaugeMetricFamily("ppipe_worker_up", "1 while the worker is in its pool, 0 once "
                               "it was removed after a failure",
                               labels=["worker", "model", "stage", "gpu_class"])
        for w in rt.workers:
            up.add_metric([str(w.worker_id), w.info.model, str(w.info.stage), w.info.gpu_class],
                          0.0 if getattr(w, "alive", True) is False else 1.0)
        yield up
        down = GaugeMetricFamily("ppipe_worker_down_info", "1 for each worker out of its pool, "
                                 "with the reason (quarantined after a fault, or a Ray actor "
                                 "declared down)",
                                 labels=["worker", "model", "stage", "gpu_class", "reason"])
        for w in rt.workers:
            if getattr(w, "alive", True) is False:
                down.add_metric([str(w.worker_id), w.info.model, str(w.info.stage),
                                 w.info.gpu_class, getattr(w, "down_reason", "") or "stopped"],
                                1.0)
        yield down
        history = getattr(rt, "history", None)
        if history is not None and rt.generation is not None:
            gen = GaugeMetricFamily("ppipe_plan_generation", "The plan generation in force "
                                    "(0: the plan the server started with)")
            gen.add_metric([], rt.generation.number)
            swaps = CounterMetricFamily("ppipe_plan_swaps", "Plans swapped in while serving")
            swaps.add_metric([], len(history) - 1)
            moved = CounterMetricFamily("ppipe_plan_swap_requests_moved",
                                        "Queued requests handed over to a new plan's "
                                        "scheduler at a swap")
            moved.add_metric([], sum(g.moved for g in history))
            yield from (gen, swaps, moved)
        yield from calibration_families(rt)
        yield from admission_families(rt)
        health = getattr(rt, "cluster_health", None)
        if health is not None:
            h = health()
            for key in ("workers_removed", "workers_readded", "batches_lost",
                        "requests_redispatched", "requests_failed_worker"):
                c = CounterMetricFamily(f"ppipe_cluster_{key}", f"Ray backend: {key}")
                c.add_metric([], h[key])
                yield c


def calibration_families(rt) -> list:
    """Profile vs measured latency per stage, worker and batch size, and the capacity the
    plan has with each (``ServingRuntime.calibration_status``; none for a runtime that does
    not calibrate)."""
    status = getattr(rt, "calibration_status", None)
    cal = status() if status is not None else {}
    if not cal:
        return []
    cap = GaugeMetricFamily("ppipe_capacity_rps", "What a model's plan serves at its planned "
                            "batches (req/s), with the profiled and with the measured "
                            "latencies", labels=["model", "latencies"])
    prof = GaugeMetricFamily("ppipe_stage_latency_profile_seconds", "A stage's profiled "
                             "latency per batch size", labels=["model", "pipeline", "stage",
                                                               "batch"])
    used = GaugeMetricFamily("ppipe_stage_latency_planned_seconds", "The latency the "
                             "scheduler now reserves for a stage per batch size (measured, "
                             "or the profile scaled to the measurement)",
                             labels=["model", "pipeline", "stage", "batch"])
    meas = GaugeMetricFamily("ppipe_worker_latency_measured_seconds", "A worker's measured "
                             "occupancy per batch size (the calibration quantile over its "
                             "recent batches)", labels=["model", "pipeline", "stage", "worker",
                                                        "batch"])
    for model, c in cal.items():
        cap.add_metric([model, "profile"], c["planned_capacity_rps"])
        cap.add_metric([model, "measured"], c["measured_capacity_rps"])
        for st in c["stages"]:
            key = [model, str(st["pipeline"]), str(st["stage"])]
            for b, (p_us, u_us) in enumerate(zip(st["profile_us"], st["in_use_us"]), 1):
                prof.add_metric(key + [str(b)], p_us / 1e6)
                used.add_metric(key + [str(b)], u_us / 1e6)
            for wid, by_batch in st["workers"].items():
                for b, m in by_batch.items():
                    meas.add_metric(key + [wid, b], m["measured_us"] / 1e6)
    return [cap, prof, used, meas]


def admission_families(rt) -> list:
    """The admission limit, the front end's lag and the requests refused at the door
    (``ServingRuntime.admission_status``; none where no front end is watched)."""
    status = getattr(rt, "admission_status", None)
    adm = status() if status is not None else None
    if adm is None:
        return []
    limit = GaugeMetricFamily("ppipe_admission_limit_rps", "The rate of requests admitted "
                              "while the front end falls behind (req/s; +Inf: no limit)")
    limit.add_metric([], float("inf") if adm["limit_rps"] is None else adm["limit_rps"])
    lag = GaugeMetricFamily("ppipe_front_end_lag_seconds", "How late a timer on the front "
                            "end's event loop ran (the largest of the last interval)")
    lag.add_metric([], adm["front_end_lag_ms"] / 1e3)
    refused = CounterMetricFamily("ppipe_admission_refused", "Requests refused at the door "
                                  "by the admission limit")
    refused.add_metric([], adm["refused"])
    return [limit, lag, refused]


class HttpCollector:
    """The front end's HTTP counters: requests by route template and status, and the time
    each took by route, as ``ppipe_http_requests_total`` and
    ``ppipe_http_request_duration_seconds`` (a histogram with :data:`HTTP_BUCKETS_S`).

    Counted in plain Python on the event loop's thread (the infer path pays a dict lookup,
    an addition and a bisection per request, not prometheus_client's locks and per-bucket
    calls) and turned into metric families on each scrape."""

    def __init__(self):
        self.counts: dict[tuple[str, int], int] = {}
        # route -> [count per bucket (the last one +Inf), sum of seconds]
        self.times: dict[str, list] = {}

    def count(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        t = self.times.get(route)
        if t is None:
            t = self.times[route] = [[0] * (len(HTTP_BUCKETS_S) + 1), 0.0]
        t[0][bisect_left(HTTP_BUCKETS_S, seconds)] += 1
        t[1] += seconds

    def collect(self):
        requests = CounterMetricFamily("ppipe_http_requests", "HTTP requests by route and "
                                       "status", labels=["route", "status"])
        for (route, status), n in sorted(self.counts.items()):
            requests.add_metric([route, str(status)], n)
        seconds = HistogramMetricFamily("ppipe_http_request_duration_seconds",
                                        "Time in the front end per HTTP request",
                                        labels=["route"])
        for route, (counts, total) in sorted(self.times.items()):
            running, buckets = 0, []
            for bound, n in zip((*HTTP_BUCKETS_S, float("inf")), counts):
                running += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
            seconds.add_metric([route], buckets, total)
        yield from (requests, seconds)


class AppMetrics:
    """The registry of one app: runtime collector + HTTP request counters."""

    def __init__(self, get_runtime: Callable[[], ServingRuntime | None]):
        self.registry = CollectorRegistry()
        self.registry.register(RuntimeCollector(get_runtime))
        self.http = HttpCollector()
        self.registry.register(self.http)
        #: Count one HTTP request of route template ``route`` answered ``status`` that took
        #: ``seconds`` (event loop thread).
        self.count_http: Callable[[str, int, float], None] = self.http.count

    def render(self) -> bytes:
        return generate_latest(self.registry)
