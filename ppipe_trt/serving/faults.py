"""Faults of local stage workers: what counts as one, when a worker is quarantined, and the
watchdog that notices a hung batch.

A :class:`~ppipe_trt.serving.worker.StageWorker` given a :class:`FaultPolicy` checks each
batch it runs:

* the executor raises: the batch's requests get the error (as before); after
  ``max_consecutive_errors`` such batches in a row the worker is quarantined (an input the
  executor rejects, :class:`~ppipe_trt.errors.BadInputError`, is the client's fault and is
  not counted);
* the executor returns outputs of the wrong names, shapes or dtypes
  (:func:`output_problem`): the batch fails with :class:`BadStageOutputError` and the worker
  is quarantined at once (its engine is wrong, not the batch);
* the batch runs past its limit (:meth:`FaultPolicy.limit_us`): the :class:`StageWatchdog`
  fails it with :class:`StageTimeoutError` and the worker is quarantined at once.  A Python
  thread cannot be killed: the hung thread is left behind, gets no more work, and whatever
  it returns later is dropped.

Quarantine takes the worker out of its pool for good: it refuses new jobs, the jobs queued
on it are dropped by its scheduler's ``remove_worker`` (``worker_failed``), and the runtime
is told through its sink's ``worker_failed`` (a :class:`WorkerQuarantined` loop event).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from ppipe_trt.engines.backends.base import TensorSpec
from ppipe_trt.serving.clock import monotonic_us
from ppipe_trt.serving.events import LoopEvent
from ppipe_trt.serving.types import StageFailedError

if TYPE_CHECKING:
    from ppipe_trt.serving.options import RuntimeOptions

log = logging.getLogger("ppipe.serving")


class StageTimeoutError(StageFailedError):
    """A batch ran past its stage's time limit (the worker is quarantined)."""


class BadStageOutputError(StageFailedError):
    """A stage returned outputs of the wrong names, shapes or dtypes (the worker is
    quarantined)."""


@dataclass(frozen=True, slots=True)
class FaultPolicy:
    """When a local worker's batch fails and when the worker leaves its pool (see
    :class:`~ppipe_trt.serving.options.RuntimeOptions` for the fields' meaning).

    ``timeout_factor``: ``None`` turns the watchdog off; ``timeout_min_us``: the floor of a
    batch's limit (microseconds); ``max_consecutive_errors``: raising batches in a row that
    quarantine the worker (0: never); ``check_outputs``: check every batch's outputs.
    """

    timeout_factor: float | None = 10.0
    timeout_min_us: float = 1e6
    max_consecutive_errors: int = 3
    check_outputs: bool = True

    @classmethod
    def from_options(cls, options: "RuntimeOptions") -> "FaultPolicy":
        return cls(options.stage_timeout_factor, options.stage_timeout_min_s * 1e6,
                   options.quarantine_after_errors, options.check_stage_outputs)

    def limit_us(self, reserved_us: float) -> float:
        """The time limit of a batch whose stage the scheduler reserved ``reserved_us`` for
        (the profiled latency of that batch size on that worker)."""
        return max(self.timeout_min_us, self.timeout_factor * reserved_us)

    @property
    def watchdog_period_s(self) -> float:
        """How often the watchdog looks (a tenth of the floor, 10..100 ms): a hang is noticed
        at most this long after its limit."""
        return min(0.1, max(0.01, self.timeout_min_us / 1e7))


def expected_outputs(specs: tuple[TensorSpec, ...]) -> tuple[tuple[str, tuple[int, ...],
                                                                  np.dtype], ...]:
    """``(name, dims after the batch dimension, dtype)`` of each declared output, as
    :func:`output_problem` checks them (a dim <= 0 is dynamic: any size)."""
    return tuple((s.name, tuple(s.shape[1:]), np.dtype(s.dtype)) for s in specs)


def output_problem(outputs: Mapping[str, Any], expected, batch_size: int) -> str | None:
    """What is wrong with a stage's ``outputs`` for a batch of ``batch_size``, or ``None``.

    ``expected``: from :func:`expected_outputs`.  Checks that each declared output is there,
    is an array with ``batch_size`` rows, the declared rank and static dims, and the declared
    dtype.  A few attribute reads per output: cheap enough to run on every batch."""
    for name, dims, dtype in expected:
        a = outputs.get(name)
        if a is None:
            return f"output {name!r} missing; got {sorted(outputs)}"
        shape = getattr(a, "shape", None)
        if shape is None:
            return f"output {name!r}: expected an array, got {type(a).__name__}"
        want = (batch_size,) + dims
        if len(shape) != len(want) or shape[0] != batch_size or any(
                d > 0 and g != d for g, d in zip(shape[1:], dims)):
            return (f"output {name!r}: expected shape "
                    f"{tuple(d if d > 0 else '?' for d in want)}, got {tuple(shape)}")
        if a.dtype != dtype:
            return f"output {name!r}: expected dtype {dtype}, got {a.dtype}"
    return None


@dataclass(slots=True)
class WorkerQuarantined(LoopEvent):
    """Local worker ``worker_id`` was quarantined at ``detected_us`` (runtime clock) for
    ``reason``: the loop takes it out of its pool (the scheduler's ``remove_worker``)."""

    worker_id: int
    reason: str
    detected_us: float


@dataclass(frozen=True, slots=True)
class QuarantineRecord:
    """A quarantined worker as ``/v2/status`` shows it (times: runtime clock, microseconds)."""

    worker_id: int
    model: str
    stage: int
    reason: str
    detected_us: float
    removed_us: float


class StageWatchdog:
    """One thread that watches the running batch of every registered worker.

    A worker registers (:meth:`watch`) when it starts and leaves (:meth:`unwatch`) when it
    stops; the thread runs while some worker is watched.  Every ``period_s`` it calls each
    worker's ``check_hang(now_us)``, which fails an overdue batch and quarantines the worker.
    """

    def __init__(self, period_s: float = 0.1, clock: Callable[[], float] = monotonic_us):
        self.period_s = period_s
        self._clock = clock
        self._workers: list[Any] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, worker: Any) -> None:
        with self._cv:
            self._workers.append(worker)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="ppipe-stage-watchdog")
                self._thread.start()

    def unwatch(self, worker: Any) -> None:
        with self._cv:
            if worker in self._workers:
                self._workers.remove(worker)
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                if not self._workers:
                    self._thread = None
                    return
                self._cv.wait(self.period_s)
                workers = list(self._workers)
            now = self._clock()
            for w in workers:
                try:
                    w.check_hang(now)
                except Exception:  # one worker's bug must not blind the watchdog
                    log.exception("watchdog: checking worker %s failed",
                                  getattr(w, "worker_id", w))
