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
timers run up to ~1 ms late).  The next stage gets the activations at that emulated finish
(plus its link), the scheduler hears of that finish, and the answer of a last stage is timed
when it is actually given: timer slop delays answers, as a busy host would, but never drifts
the emulated GPUs' schedule.  ``start_lag`` counts how late the worker noticed a start.
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
        self._busy = False
        self._free_us = 0.0  # when the emulated GPU finishes its current batch
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
        return left

    def submit(self, job: StageJob) -> None:
        if self._stopping:
            raise PPipeError(f"worker {self.worker_id} is stopping")
        self._jobs.append(job)
        eligible = eligible_us(job)
        if not self._busy and eligible <= self._clock() and self._timers.on_loop_thread():
            self._next()  # idle and the job may start: no timer round
        else:
            self._timers.call_at(eligible, self._next)

    def stats(self) -> WorkerStats:
        return WorkerStats(self.worker_id, self.info.model, self.info.stage,
                           self.info.gpu_class, self.mode, self._batches, self._samples,
                           self._busy_us, len(self._jobs), 0, 0, self._started_us,
                           self._lag_total_us, self._lag_max_us)

    # ---- timer callbacks (loop thread) ------------------------------------------------------
    def _next(self) -> None:
        """Start the ready job with the earliest reserved start, if idle."""
        if self._busy or not self._jobs:
            return
        now = self._clock()
        ready = [j for j in self._jobs if eligible_us(j) <= now]
        if not ready:
            return  # each waiting job has its own timer at its eligible time
        job = min(ready, key=lambda j: j.reservation.start_us)
        self._jobs.remove(job)
        self._busy = True
        start = max(eligible_us(job), job.sent_us, self._free_us)  # the GPU's own timeline
        lag = now - start
        self._lag_total_us += lag
        self._lag_max_us = max(self._lag_max_us, lag)
        finish = self._free_us = start + self._emulation.hold_us(job.dispatch.batch_size)
        self._timers.call_at(finish, lambda: self._finish(job, start, finish))

    def _finish(self, job: StageJob, start_us: float, finish_us: float) -> None:
        self._busy = False
        self._batches += 1
        self._samples += job.dispatch.batch_size
        self._busy_us += finish_us - start_us
        hand_off(job, {}, start_us, finish_us, self._transport, self._sink,
                 answered_us=max(finish_us, self._clock()) if job.is_last_stage else None)
        self._next()
