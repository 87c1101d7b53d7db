"""What a runtime calls on a stage worker, wherever the worker runs.

Two kinds of worker satisfy :class:`WorkerHandle`: :class:`~ppipe_trt.serving.worker.
StageWorker` (a thread of this process) and :class:`~ppipe_trt.serving.ray_backend.runtime.
RayWorkerProxy` (the API process's view of a Ray actor hosting a ``StageWorker``).

Jobs do not go through the handle: the runtime sends each batch's stage-0 job through its
:class:`~ppipe_trt.serving.transport.Transport`, by worker id, and workers forward stage to
stage through theirs -- one hand-off path whatever the stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ppipe_trt.scheduler.placement import WorkerSlot


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """A snapshot of one worker's counters (times in microseconds on the runtime clock)."""

    worker_id: int
    model: str
    stage: int
    gpu_class: str
    mode: str
    batches: int
    samples: int
    busy_us: float
    queue_length: int
    overruns: int
    failures: int
    started_us: float
    start_lag_us_total: float = 0.0   # sum over batches of (actual start - eligible time)
    start_lag_us_max: float = 0.0


@runtime_checkable
class WorkerHandle(Protocol):
    """A stage worker as the runtime sees it.

    ``info``: where it sits in the plan and the cluster.  ``mode``: how it runs, for people
    (e.g. ``"onnxruntime cpu blocks 0..3, emulated T4"``).  ``alive``: whether it is in its
    pool (a Ray worker declared down is not, nor a local worker quarantined after a fault
    or stopped); a worker out of its pool may say why in ``down_reason``.
    :meth:`start` is called once by the runtime's ``start`` (a Ray actor is already running:
    no-op); :meth:`stop` by the runtime's ``stop`` or when the worker is declared down, and
    returns the jobs that never started (their batches are still in flight: the runtime
    answers them).
    :meth:`stats`: a snapshot of the counters, any thread.
    """

    @property
    def info(self) -> WorkerSlot: ...

    @property
    def worker_id(self) -> int: ...

    @property
    def mode(self) -> str: ...

    @property
    def alive(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self, timeout_s: float = 5.0) -> list: ...

    def stats(self) -> WorkerStats: ...
