"""What the workers really take: online latency estimates that replace the offline profile.

A plan's latency tables come from profiles measured offline (one idle worker per core, an
idle GPU).  A live worker takes longer when it shares the host with the front end and the
other workers, when MPS neighbours, clocks or a noisy host slow it; a reservation made from
the profile then ends before the batch does, every reservation behind it is wrong, and the
pipeline answers late instead of shedding what it cannot carry.

:class:`LatencyCalibrator` keeps, for one model of the plan in force, what every worker took
per batch size (the *occupancy*: from the moment the batch could start on the worker to its
finish, so a late thread wake-up counts) over a recent window, and derives per stage a
latency row for the scheduler:

* a worker's estimate for batch ``b`` is the ``quantile`` (default 0.95) of its last
  ``window`` samples at ``b``, once it has ``min_samples`` of them;
* a stage's estimate for ``b`` is the largest of its workers' (a reservation may land on any);
* a batch size no worker has measured yet is scaled from its profile by the ratio
  measured / profiled of the nearest measured batch size (the profile's *shape* over batch
  sizes is kept, its level follows the measurement); a stage with no measurement at all keeps
  its profile.

It never reads a clock: it is told each execution (:meth:`LatencyCalibrator.observe`) and
returns the stage's new row when the row moved by more than ``rel_change`` since it was last
returned (the caller hands it to the scheduler: ``set_stage_latency``).  Thread-safe: workers
report from their own threads.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, replace
from typing import Sequence

from ppipe_trt.errors import ConfigError
from ppipe_trt.scheduler.tables import PipelineTable
from ppipe_trt.scheduler.work_conserving import capacity_by_batch_rps


@dataclass(frozen=True, slots=True)
class CalibrationOptions:
    """How measured latencies become the scheduler's.

    ``quantile``: the estimate of one worker at one batch size (0.95: a reservation covers
    19 in 20 executions); ``window``: the samples per worker and batch size it is taken over
    (the most recent); ``min_samples``: samples needed before a worker's figure is used;
    ``rel_change``: a stage's row is handed to the scheduler again only when some batch
    size moved by more than this fraction; ``recompute_every``: a worker's quantile is
    recomputed every this many samples (or at once when a sample exceeds it by more than
    ``rel_change``: a slow-down is heard without delay).
    """

    quantile: float = 0.95
    window: int = 64
    min_samples: int = 6
    rel_change: float = 0.05
    recompute_every: int = 4

    def __post_init__(self):
        if not 0.0 < self.quantile <= 1.0:
            raise ConfigError(f"calibration quantile must be in (0, 1], got {self.quantile!r}")
        if self.window < 1 or self.min_samples < 1 or self.min_samples > self.window:
            raise ConfigError(f"calibration needs 1 <= min_samples <= window, got "
                              f"min_samples={self.min_samples!r}, window={self.window!r}")
        if self.rel_change < 0.0 or self.recompute_every < 1:
            raise ConfigError("calibration rel_change must be >= 0 and recompute_every >= 1")


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank on the sorted values, the higher one:
    a reservation rounds up)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


class _WorkerSamples:
    """One worker's recent occupancies per batch size and its estimate of each."""

    __slots__ = ("samples", "estimate", "since")

    def __init__(self):
        self.samples: dict[int, deque] = {}
        self.estimate: dict[int, float] = {}
        self.since: dict[int, int] = {}


class StageCalibration:
    """The measurements of one stage (of one pipeline) and the row derived from them."""

    __slots__ = ("pipeline", "stage", "profile_us", "workers", "applied_us", "observed")

    def __init__(self, pipeline: int, stage: int, profile_us: Sequence[float],
                 worker_ids: Sequence[int]):
        self.pipeline = pipeline
        self.stage = stage
        self.profile_us = tuple(profile_us)
        self.workers = {w: _WorkerSamples() for w in worker_ids}
        self.applied_us = tuple(profile_us)   # the row the scheduler has now
        self.observed = 0

    def row_us(self) -> tuple[float, ...]:
        """The stage's latency row (index = batch size; index 0 unused) from the estimates."""
        prof = self.profile_us
        measured: dict[int, float] = {}
        for ws in self.workers.values():
            for b, est in ws.estimate.items():
                if est > measured.get(b, 0.0):
                    measured[b] = est
        if not measured:
            return prof
        known = sorted(measured)
        row = [0.0] * len(prof)
        for b in range(1, len(prof)):
            if b in measured:
                row[b] = measured[b]
                continue
            near = min(known, key=lambda k: (abs(k - b), -k))
            ratio = measured[near] / prof[near] if prof[near] > 0 else 1.0
            row[b] = prof[b] * ratio
        # a larger batch never takes less time than a smaller one on the same worker
        for b in range(2, len(row)):
            if row[b] < row[b - 1]:
                row[b] = row[b - 1]
        return tuple(row)


class LatencyCalibrator:
    """Online latency estimates of one model's stages (see module doc).

    ``pipelines``: the model's latency tables in the plan in force (the scheduler's
    ``pipelines``); the profile each stage starts from.
    """

    def __init__(self, model: str, pipelines: Sequence[PipelineTable],
                 options: CalibrationOptions | None = None):
        self.model = model
        self.options = options or CalibrationOptions()
        self.planned = tuple(pipelines)
        self._stages = {(pi, si): StageCalibration(pi, si, st.latency_us, st.worker_ids)
                        for pi, pt in enumerate(self.planned)
                        for si, st in enumerate(pt.stages)}
        self._lock = threading.Lock()

    def observe(self, pipeline: int, stage: int, worker_id: int, batch: int,
                occupancy_us: float) -> tuple[float, ...] | None:
        """Record that ``worker_id`` (stage ``stage`` of ``pipeline``) held a batch of
        ``batch`` for ``occupancy_us``.  Returns the stage's new latency row when it moved by
        more than ``rel_change`` since the last one returned, else ``None``.  Any thread."""
        st = self._stages.get((pipeline, stage))
        if st is None or batch < 1 or batch >= len(st.profile_us) or not occupancy_us > 0.0:
            return None  # not of this plan, or a batch size the tables do not cover
        opt = self.options
        with self._lock:
            ws = st.workers.get(worker_id)
            if ws is None:
                ws = st.workers[worker_id] = _WorkerSamples()
            buf = ws.samples.get(batch)
            if buf is None:
                buf = ws.samples[batch] = deque(maxlen=opt.window)
            buf.append(occupancy_us)
            st.observed += 1
            n = ws.since.get(batch, 0) + 1
            est = ws.estimate.get(batch)
            if len(buf) < opt.min_samples:
                ws.since[batch] = n
                return None
            if est is not None and n < opt.recompute_every and \
                    occupancy_us <= est * (1.0 + opt.rel_change):
                ws.since[batch] = n
                return None
            ws.since[batch] = 0
            ws.estimate[batch] = quantile(buf, opt.quantile)
            row = st.row_us()
            old = st.applied_us
            if all(abs(r - o) <= opt.rel_change * o for r, o in zip(row[1:], old[1:])):
                return None
            st.applied_us = row
            return row

    def min_executions(self) -> int:
        """The fewest executions any stage of the model has reported."""
        with self._lock:
            return min((st.observed for st in self._stages.values()), default=0)

    def current_tables(self) -> tuple[PipelineTable, ...]:
        """The model's tables with the rows last returned (what the scheduler now has)."""
        with self._lock:
            out = []
            for pi, pt in enumerate(self.planned):
                stages = tuple(replace(st, latency_us=self._stages[(pi, si)].applied_us)
                               for si, st in enumerate(pt.stages))
                out.append(replace(pt, stages=stages))
            return tuple(out)

    def capacity_rps(self) -> tuple[float, float]:
        """(planned, measured) capacity in req/s: what the pipelines serve at their planned
        batches with the profiled and with the current rows."""
        top = max((pt.planned_batch for pt in self.planned), default=0)
        if top == 0:
            return 0.0, 0.0
        return (capacity_by_batch_rps(self.planned)[top],
                capacity_by_batch_rps(self.current_tables())[top])

    def status(self) -> dict:
        """Profile vs measured per stage, worker and batch size (JSON-ready)."""
        planned, measured = self.capacity_rps()
        stages = []
        with self._lock:
            for (pi, si), st in sorted(self._stages.items()):
                workers = {}
                for wid, ws in sorted(st.workers.items()):
                    workers[str(wid)] = {
                        str(b): {"measured_us": round(ws.estimate[b], 1),
                                 "samples": len(ws.samples.get(b, ()))}
                        for b in sorted(ws.estimate)}
                stages.append({
                    "pipeline": pi, "stage": si, "executions": st.observed,
                    "profile_us": [round(x, 1) for x in st.profile_us[1:]],
                    "in_use_us": [round(x, 1) for x in st.applied_us[1:]],
                    "workers": workers})
        return {"planned_capacity_rps": round(planned, 1),
                "measured_capacity_rps": round(measured, 1),
                "quantile": self.options.quantile, "window": self.options.window,
                "stages": stages}
