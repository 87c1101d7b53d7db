"""Timing-only workers without a thread: their batches are timers on the runtime loop.

A timing-only worker (a model known only from profiles, on an emulated GPU class) computes
nothing: it holds each batch for the profiled latency of its class, block range, batch and
MPS share.  A thread per such worker spends its CPU on wake-ups (a 100-GPU emulation had a
hundred threads contending for the GIL); this worker is a small state machine driven by
:meth:`~ppipe_trt.serving.loop.DecisionLoop.call_at` instead.  It keeps the thread worker's
rules exactly: one batch at a time, the ready job with the earliest reserved start first, a
job never before its reserved start nor before its emulated link delivered it.

The emulated GPU keeps its own timeline: a batch starts at the moment the GPU would (its
eligible time, the end of the GPU's previous batch, its dispatch, whichever is last) and ends
its profiled latency later, however late the timer that tells the worker runs (event-loop
timers run up to ~2 ms late).  The next stage gets the activations at that emulated finish
(plus its link), the scheduler hears of that finish, and the answer of a last stage is timed
when it is actually given: timer slop delays answers, as a busy host would, but never drifts
the emulated GPUs' schedule.  So a batch is committed as soon as the worker can tell when it
starts (one timer per batch, at its finish), and taken back if a job queued before that start
would have been chosen instead.  ``start_lag`` counts how late the worker heard of each
emulated finish.
"""

from __future__ import annotations

from typing import Callable, Protocol

from ppipe_trt.errors import PPipeError
from ppipe_trt.scheduler.placement import WorkerSlot
from ppipe_trt.serving.clock import monotonic_us
from ppipe_trt.serving.emulation import EmulatedTiming
from ppipe_trt.serving.handle import WorkerStats
from ppipe_trt.serving.transport import StageJob, Transport
from ppipe_trt.serving.worker import WorkerSink, eligible_us, hand_off


class Timers(Protocol):
    """Where the worker sets its timers (the runtime loop)."""

    def call_at(self, time_us: float, callback: Callable[[], None]) -> None: ...

    def on_loop_thread(self) -> bool: ...


class TimedWorker:
    """A :class:`~ppipe_trt.serving.handle.WorkerHandle` for timing-only emulation.

    Every method but :meth:`submit`, :meth:`stats` and :meth:`stop` runs on the loop thread
    (timer callbacks); :meth:`submit` is called by the transport, on the loop thread for
    in-process pipelines (a call from another thread becomes a loop event)."""

    def __init__(self, info: WorkerSlot, emulation: EmulatedTiming, transport: Transport,
                 sink: WorkerSink, timers: Timers, clock: Callable[[], float] = monotonic_us):
        self.info = info
        self._emulation = emulation
        self._transport = transport
        self._sink = sink
        self._timers = timers
        self._clock = clock
        self._jobs: list[StageJob] = []
        self._running: _Run | None = None  # the batch committed on the emulated GPU
        self._free_us = 0.0  # when the emulated GPU finishes its committed batch
        self._stopping = False
        self._batches = self._samples = 0
        self._busy_us = self._lag_total_us = self._lag_max_us = 0.0
        self._started_us = 0.0

    #: No thread of its own (see ``ServingRuntime.threadless``).
    threadless = True

    @property
    def worker_id(self) -> int:
        return self.info.worker_id

    @property
    def alive(self) -> bool:
        return not self._stopping

    @property
    def mode(self) -> str:
        return f"timing-only, {self._emulation.label}"

    def start(self) -> None:
        self._transport.register(self.worker_id, self.submit)
        self._started_us = self._clock()

    def stop(self, timeout_s: float = 5.0) -> list[StageJob]:
        """Stop taking jobs; returns those that never started (the runtime fails them)."""
        self._stopping = True
        left, self._jobs = self._jobs, []
        run = self._running
        if run is not None and not run.done and run.start > self._clock():
            run.done = True  # committed, not started yet: never started
            left.append(run.job)
            self._running = None
        return left

    def submit(self, job: StageJob) -> None:
        if self._stopping:
            raise PPipeError(f"worker {self.worker_id} is stopping")
        self._jobs.append(job)
        if self._timers.on_loop_thread():
            self._consider(job)
        else:  # from another thread: the loop thread considers it
            self._timers.call_at(0.0, lambda: self._consider(job))

    def stats(self) -> WorkerStats:
        return WorkerStats(self.worker_id, self.info.model, self.info.stage,
                           self.info.gpu_class, self.mode, self._batches, self._samples,
                           self._busy_us, len(self._jobs), 0, 0, self._started_us,
                           self._lag_total_us, self._lag_max_us)

    # ---- on the loop thread -----------------------------------------------------------------
    def _consider(self, job: StageJob) -> None:
        """A job was queued.  If the batch committed next would not have been chosen had
        this job been there (it is ready no later than that batch's start), the commitment is
        taken back; then the next batch is planned."""
        run = self._running
        if run is not None and not run.done:
            at = _ready_at(job)
            if at < run.start or (at == run.start and job.reservation.start_us
                                  < run.job.reservation.start_us):
                run.done = True          # its finish timer will find it taken back
                self._jobs.append(run.job)
                self._free_us = run.free_before
                self._running = None
        self._plan()

    def _plan(self) -> None:
        """Commit the next batch on the emulated GPU's own timeline: when the GPU is free and
        some job ready, the ready job with the earliest reserved start; its finish is a
        timer.  A start in the future stays open to :meth:`_consider` until the finish."""
        if self._running is not None or not self._jobs:
            return
        jobs = self._jobs
        if len(jobs) == 1:  # the common case
            job = jobs.pop()
            first = _ready_at(job)
            at = first if first > self._free_us else self._free_us
        else:
            first = min(_ready_at(j) for j in jobs)
            at = first if first > self._free_us else self._free_us
            job = min((j for j in jobs if _ready_at(j) <= at),
                      key=lambda j: j.reservation.start_us)
            jobs.remove(job)
        finish = at + self._emulation.hold_us(job.dispatch.batch_size)
        run = self._running = _Run(job, at, finish, self._free_us)
        self._free_us = finish
        self._timers.call_at(finish, lambda: self._finish(run))

    def _finish(self, run: "_Run") -> None:
        if run.done:  # taken back (see _consider)
            return
        run.done = True
        self._running = None
        job, start_us, finish_us = run.job, run.start, run.finish
        lag = self._clock() - finish_us  # how late the worker heard of its emulated finish
        self._lag_total_us += lag
        self._lag_max_us = max(self._lag_max_us, lag)
        self._batches += 1
        self._samples += job.dispatch.batch_size
        self._busy_us += finish_us - start_us
        hand_off(job, {}, start_us, finish_us, self._transport, self._sink,
                 answered_us=max(finish_us, self._clock()) if job.is_last_stage else None)
        self._plan()


def _ready_at(job: StageJob) -> float:
    """When a job may start: its eligible time (reserved start, activations delivered), and
    never before it was dispatched."""
    at = eligible_us(job)
    return at if at > job.sent_us else job.sent_us


class _Run:
    """The batch committed on a worker's emulated GPU: ``start``/``finish`` on its timeline,
    ``free_before`` when the GPU was free before it, ``done`` once finished or taken back."""

    __slots__ = ("job", "start", "finish", "free_before", "done")

    def __init__(self, job: StageJob, start: float, finish: float, free_before: float):
        self.job, self.start, self.finish, self.free_before = job, start, finish, free_before
        self.done = False
