"""Stage workers: one thread per worker slot, running one block range of one pipeline.

A worker takes :class:`~ppipe_trt.serving.transport.StageJob` objects from the transport,
runs them one at a time (the ready job with the earliest reserved start first), forwards the
outputs straight to the next stage's reserved worker and reports the actual finish time to
its :class:`WorkerSink` (the runtime), which feeds it back to the scheduler.

The compute is an :class:`~ppipe_trt.serving.executors.StageExecutor` (ONNX Runtime on CPU,
TensorRT/CUDA on a GPU) or nothing at all (timing-only emulation).  With an
:class:`~ppipe_trt.serving.emulation.EmulatedTiming` the worker holds every batch until the
emulated class's profiled latency has elapsed.

Given a :class:`~ppipe_trt.serving.faults.FaultPolicy` (the local runtime), a worker also
checks its outputs, counts consecutive failures and, with a
:class:`~ppipe_trt.serving.faults.StageWatchdog`, has its batches timed: a fault quarantines
it (see :mod:`ppipe_trt.serving.faults`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Protocol

import numpy as np

from ppipe_trt.errors import BadInputError, PPipeError, RequestRejectedError
from ppipe_trt.scheduler.interface import DropReason
from ppipe_trt.scheduler.placement import WorkerSlot
from ppipe_trt.serving.clock import monotonic_us
from ppipe_trt.serving.emulation import EmulatedTiming, Overrun
from ppipe_trt.serving.executors import StageExecutor
from ppipe_trt.serving.faults import (BadStageOutputError, FaultPolicy, StageTimeoutError,
                                      StageWatchdog, expected_outputs, output_problem)
from ppipe_trt.serving.handle import WorkerStats
from ppipe_trt.serving.transport import StageJob, Transport

__all__ = ["MIN_SLEEP_US", "StageWorker", "WorkerInfo", "WorkerSink", "WorkerStats",
           "eligible_us", "hand_off", "monotonic_us"]

log = logging.getLogger("ppipe.serving")

#: Where a worker sits in the plan and the cluster: the scheduler's placement slot (one type;
#: the old name stays for callers).
WorkerInfo = WorkerSlot

#: An emulated hold shorter than this (microseconds) is not slept: a sleep that short
#: oversleeps by more than it holds.
MIN_SLEEP_US = 20.0


class WorkerSink(Protocol):
    """What a worker reports to (implemented by the runtime).  Called from worker threads."""

    def stage_finished(self, job: StageJob, start_us: float, finish_us: float) -> None:
        """Stage ``job.stage`` of the batch ended at ``finish_us``; the worker was occupied by
        it from ``start_us`` (when it could start it: eligible, and the previous batch done)."""

    def batch_completed(self, job: StageJob, outputs: dict[str, np.ndarray],
                        finish_us: float) -> None: ...

    def batch_failed(self, job: StageJob, error: BaseException, now_us: float) -> None: ...

    def worker_failed(self, worker_id: int, reason: str, now_us: float) -> None:
        """Worker ``worker_id`` quarantined itself (see :mod:`ppipe_trt.serving.faults`);
        only called on a worker given a fault policy."""


def hand_off(job: StageJob, outputs: dict[str, np.ndarray], start_us: float, finish_us: float,
             transport: Transport, sink: WorkerSink, answered_us: float | None = None) -> None:
    """After a stage ran ``job``: answer the batch (last stage) or forward ``outputs`` to the
    next stage's reserved worker, and report the finish to ``sink`` (a failed hand-off fails
    the batch).  ``answered_us``: when the answer is given, if later than the stage's finish
    (a timing-only worker hears of its emulated finish late).  Shared by every kind of local
    worker."""
    if job.is_last_stage:
        sink.batch_completed(job, outputs, finish_us if answered_us is None else answered_us)
        sink.stage_finished(job, start_us, finish_us)
        return
    nxt = StageJob(job.dispatch, job.stage + 1, outputs)
    try:
        transport.send(job.dispatch.route[job.stage + 1].worker_id, nxt, finish_us)
    except PPipeError as exc:
        sink.stage_finished(job, start_us, finish_us)
        sink.batch_failed(nxt, exc, finish_us)
        return
    sink.stage_finished(job, start_us, finish_us)


def eligible_us(job: StageJob) -> float:
    """A job never starts before its reserved start (an earlier start could delay a batch
    reserved before it on this worker whose input has not arrived yet), nor before its
    activations are there."""
    start = job.reservation.start_us
    return start if start > job.not_before_us else job.not_before_us


class StageWorker:
    """A thread that runs one stage's batches (a :class:`~ppipe_trt.serving.handle.
    WorkerHandle`; built from a :class:`~ppipe_trt.serving.specs.WorkerSpec` by
    :func:`~ppipe_trt.serving.specs.build_worker`).

    ``executor``: the engine for the block range, or ``None`` for timing-only emulation
    (then ``emulation`` is required).  ``cut_dtype``: cast float outputs to this dtype before
    forwarding them to the next stage (e.g. ``"float16"`` when the plan halves cut traffic).
    ``faults``: how faults of the executor are judged (``None``: a raising batch fails, the
    worker stays, outputs are not checked; what a Ray actor's worker does, whose health the
    Ray runtime watches); ``watchdog``: times each batch (needs ``faults`` with a timeout).
    ``down_reason``: why the worker was quarantined (``None`` while it is in its pool).
    """

    def __init__(self, info: WorkerSlot, executor: StageExecutor | None,
                 emulation: EmulatedTiming | None, transport: Transport, sink: WorkerSink,
                 clock: Callable[[], float] = monotonic_us, cut_dtype: str | None = None,
                 faults: FaultPolicy | None = None, watchdog: StageWatchdog | None = None,
                 nice: int = 0):
        if executor is None and emulation is None:
            raise PPipeError(f"worker {info.worker_id}: needs an executor or an emulated "
                             "timing (timing-only mode)")
        self.info = info
        self._executor = executor
        self._emulation = emulation
        self._transport = transport
        self._sink = sink
        self._clock = clock
        self._cut_dtype = np.dtype(cut_dtype) if cut_dtype else None
        self._jobs: list[StageJob] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards the counters below
        self._batches = self._samples = self._overrun_count = self._failures = 0
        self._busy_us = 0.0
        self._lag_total_us = self._lag_max_us = 0.0
        self._started_us = 0.0
        self._last_finish_us = 0.0
        self.overruns: list[Overrun] = []  # the most recent ones (bounded)
        self._faults = faults if executor is not None else None
        self._expected = (expected_outputs(executor.outputs)
                          if self._faults is not None and faults.check_outputs else ())
        self._watchdog = (watchdog if self._faults is not None
                          and faults.timeout_factor is not None else None)
        self._consecutive_errors = 0
        # the batch running now, when it started and its deadline (watchdog), under _lock
        self._current: StageJob | None = None
        self._current_start_us = self._current_limit_us = 0.0
        self.down_reason: str | None = None
        self._hung = False
        # A worker with real compute whose batch ended before its reservation starts the
        # next batch of its route's first stage as soon as it is free, not at its reserved
        # start: every batch reserved before that one on this worker was dispatched before
        # it (a first stage's reservations on a worker are made in dispatch order), so none
        # can be waiting for its input, and a reservation made with a high quantile of the
        # measured latency (ppipe_trt.scheduler.calibration) otherwise leaves the worker idle
        # for the difference.  An emulated worker keeps its reserved times to the
        # microsecond, as its profile does.
        self.early_start = executor is not None and emulation is None
        self.nice = int(nice)

    @property
    def worker_id(self) -> int:
        return self.info.worker_id

    @property
    def alive(self) -> bool:
        """In its pool: true until :meth:`stop` or quarantine."""
        return not self._stopping and self.down_reason is None

    @property
    def mode(self) -> str:
        if self._executor is None:
            return f"timing-only, {self._emulation.label}"
        return self._executor.label + (f", {self._emulation.label}" if self._emulation else "")

    # ---- life cycle ----------------------------------------------------------------------
    def start(self) -> None:
        self._transport.register(self.worker_id, self.submit)
        self._started_us = self._clock()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"ppipe-worker-{self.worker_id}")
        self._thread.start()
        if self._watchdog is not None:
            self._watchdog.watch(self)

    def stop(self, timeout_s: float = 5.0) -> list[StageJob]:
        """Stop after the running batch; returns the jobs that never started (to be failed).
        A hung worker's thread is not waited for, and its executor is left open (closing it
        under a running call could crash the process)."""
        with self._cv:
            self._stopping = True
            left, self._jobs = self._jobs, []
            self._cv.notify_all()
        if self._watchdog is not None:
            self._watchdog.unwatch(self)
        if self._thread is not None:
            self._thread.join(0.0 if self._hung else timeout_s)
        if self._executor is not None:
            if self._thread is not None and self._thread.is_alive():
                log.warning("worker %d: its thread is still running a batch; executor %s "
                            "left open", self.worker_id, self._executor.label)
            else:
                self._executor.close()
        return left

    def submit(self, job: StageJob) -> None:
        """Queue ``job`` (called by the transport, from any thread)."""
        with self._cv:
            if self.down_reason is not None:
                raise PPipeError(f"worker {self.worker_id} is quarantined: {self.down_reason}")
            if self._stopping:
                raise PPipeError(f"worker {self.worker_id} is stopping")
            self._jobs.append(job)
            self._cv.notify()

    def stats(self) -> WorkerStats:
        with self._lock:
            return WorkerStats(self.worker_id, self.info.model, self.info.stage,
                               self.info.gpu_class, self.mode, self._batches, self._samples,
                               self._busy_us, len(self._jobs), self._overrun_count,
                               self._failures, self._started_us, self._lag_total_us,
                               self._lag_max_us)

    # ---- the thread ------------------------------------------------------------------------
    def _next_job(self) -> StageJob | None:
        with self._cv:
            while True:
                if self._stopping or self.down_reason is not None:
                    return None
                now = self._clock()
                ready = [j for j in self._jobs if eligible_us(j) <= now]
                if not ready and self._jobs and self.early_start:
                    first = min(self._jobs, key=lambda j: j.reservation.start_us)
                    if first.stage == 0:
                        ready = [first]
                if ready:
                    job = min(ready, key=lambda j: j.reservation.start_us)
                    self._jobs.remove(job)
                    return job
                timeout = None
                if self._jobs:
                    timeout = max(0.0, min(eligible_us(j) for j in self._jobs) - now) / 1e6
                self._cv.wait(timeout)

    def _run(self) -> None:
        if self.nice:
            # below the front end's threads: past capacity the cores go to reading, refusing
            # and answering requests first, and the workers (whose measured occupancy then
            # grows, see calibration) to what is left, instead of the front end falling
            # behind while every worker stays busy (Linux: a thread's own niceness)
            try:
                os.setpriority(os.PRIO_PROCESS, 0,
                               min(19, os.getpriority(os.PRIO_PROCESS, 0) + self.nice))
            except (AttributeError, OSError) as exc:
                log.warning("worker %d: niceness not raised: %s", self.worker_id, exc)
        while (job := self._next_job()) is not None:
            try:
                self._execute(job)
            except Exception as exc:  # a bug in a hand-off must not kill the worker silently
                log.exception("worker %d: unexpected error on batch %d", self.worker_id,
                              job.dispatch.batch_id)
                self._sink.batch_failed(job, exc, self._clock())

    def _too_late(self, job: StageJob, now_us: float) -> bool:
        """Whether a first-stage batch of real compute, started now, would answer every
        one of its requests after its deadline (by the reservations of its route): past
        capacity, when the cores went to the front end, running it only takes time from
        batches that can still make theirs."""
        if not self.early_start or job.stage != 0:
            return False
        d = job.dispatch
        route = d.route
        rest_us = sum(r.finish_us - r.start_us for r in route)
        latest = max(r.deadline_us + r.grace_us for r in d.requests)
        return now_us + rest_us > latest

    def _execute(self, job: StageJob) -> None:
        batch = job.dispatch.batch_size
        start = self._clock()
        if self._too_late(job, start):
            self._sink.batch_failed(job, RequestRejectedError(
                DropReason.DEADLINE_UNREACHABLE.value,
                f"request dropped (deadline_unreachable): its batch of {batch} could not start "
                f"on worker {self.worker_id} before {max(0.0, start - eligible_us(job)) / 1e3:.1f}"
                f" ms after its reserved start and would have answered late"), start)
            return
        # how late the batch starts after it could (thread wake-up, a busy host)
        could = eligible_us(job)
        lag = max(0.0, start - could)
        # the worker's occupancy by this batch starts when it could have started it: when
        # it was eligible, or when the previous batch ended, whichever is later (a late
        # thread wake-up is part of what a reservation must cover; a wait behind a previous
        # batch is that batch's)
        if could < self._last_finish_us:
            could = self._last_finish_us
        occupied_from = could if could < start else start
        with self._lock:
            self._lag_total_us += lag
            self._lag_max_us = max(self._lag_max_us, lag)
            self._current, self._current_start_us = job, start
            if self._watchdog is not None:
                res = job.reservation
                self._current_limit_us = self._faults.limit_us(res.finish_us - res.start_us)
        try:
            outputs = self._executor.run(job.tensors, batch) if self._executor else {}
            if self._expected:
                problem = output_problem(outputs, self._expected, batch)
                if problem is not None:
                    raise BadStageOutputError(f"worker {self.worker_id} "
                                              f"({self._executor.label}) returned bad "
                                              f"outputs: {problem}")
            if self._emulation is not None:
                release = start + self._emulation.hold_us(batch)
                computed = self._clock()
                if computed > release:
                    self._record_overrun(job, release - start, computed - start)
                elif release - computed > MIN_SLEEP_US:
                    time.sleep((release - computed) / 1e6)
            if self._cut_dtype is not None and not job.is_last_stage:
                outputs = {k: (v.astype(self._cut_dtype) if v.dtype.kind == "f" else v)
                           for k, v in outputs.items()}
        except Exception as exc:  # reported to every request of the batch
            now = self._clock()
            self._last_finish_us = now
            with self._lock:
                mine = self._current is job
                self._current = None
                if mine:
                    self._failures += 1
                    self._busy_us += now - start
            if mine:  # else the watchdog failed it already
                self._sink.batch_failed(job, exc, now)
                self._judge_failure(exc, now)
            return
        finish = self._clock()
        with self._lock:
            mine = self._current is job
            self._current = None
            if mine:
                self._batches += 1
                self._samples += batch
                self._busy_us += finish - start
        self._last_finish_us = finish
        if not mine:
            log.warning("worker %d: dropped the late result of batch %d (failed by the "
                        "watchdog after %.0f ms)", self.worker_id, job.dispatch.batch_id,
                        self._current_limit_us / 1e3)
            return
        self._consecutive_errors = 0
        hand_off(job, outputs, occupied_from, finish, self._transport, self._sink)

    # ---- faults (see ppipe_trt.serving.faults) ----------------------------------------------
    def _judge_failure(self, exc: Exception, now_us: float) -> None:
        """After a batch raised ``exc`` (worker thread): quarantine the worker when its
        policy says so."""
        policy = self._faults
        if policy is None or isinstance(exc, BadInputError):
            return  # an input the executor rejects is the sender's fault, not the worker's
        if isinstance(exc, BadStageOutputError):
            self._quarantine(f"bad outputs: {exc}", now_us)
            return
        self._consecutive_errors += 1
        n = policy.max_consecutive_errors
        if n and self._consecutive_errors >= n:
            self._quarantine(f"{self._consecutive_errors} batches in a row failed; the last "
                             f"with {type(exc).__name__}: {exc}", now_us)

    def check_hang(self, now_us: float) -> None:
        """Fail the running batch and quarantine the worker if the batch has run past its
        limit (called by the :class:`~ppipe_trt.serving.faults.StageWatchdog`'s thread)."""
        with self._lock:
            job = self._current
            if job is None or now_us - self._current_start_us <= self._current_limit_us:
                return
            self._current = None
            self._failures += 1
            self._hung = True
            ran_us, limit_us = now_us - self._current_start_us, self._current_limit_us
        d, res, policy = job.dispatch, job.reservation, self._faults
        reason = (f"batch {d.batch_id} of {d.model} (batch of {d.batch_size}) ran "
                  f"{ran_us / 1e3:.0f} ms in stage {res.stage} on worker {self.worker_id}, "
                  f"past its limit of {limit_us / 1e3:.0f} ms ({policy.timeout_factor:g} x "
                  f"the profiled {(res.finish_us - res.start_us) / 1e3:.1f} ms, at least "
                  f"{policy.timeout_min_us / 1e3:.0f} ms)")
        self._sink.batch_failed(job, StageTimeoutError(reason), now_us)
        self._quarantine(f"hung: {reason}", now_us)

    def _quarantine(self, reason: str, now_us: float) -> None:
        """Leave the pool for good: refuse new jobs, forget the queued ones (the scheduler
        drops their batches when the runtime removes the worker) and tell the sink."""
        with self._cv:
            if self.down_reason is not None or self._stopping:
                return
            self.down_reason = reason
            self._jobs = []
            self._cv.notify_all()
        log.warning("worker %d (%s stage %d) quarantined: %s", self.worker_id,
                    self.info.model, self.info.stage, reason)
        self._sink.worker_failed(self.worker_id, reason, now_us)

    def _record_overrun(self, job: StageJob, emulated_us: float, actual_us: float) -> None:
        with self._lock:
            self._overrun_count += 1
            self.overruns.append(Overrun(self.worker_id, job.dispatch.batch_id,
                                         job.dispatch.batch_size, emulated_us, actual_us))
            del self.overruns[:-32]
