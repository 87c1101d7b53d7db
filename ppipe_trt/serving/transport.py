"""How a batch's activations move from one stage worker to the next.

A :class:`Transport` delivers :class:`StageJob` objects to workers by id.  The scheduler and
the workers' engine code never see how: the in-process transport below hands numpy arrays
over by reference (workers are threads of one process); a multi-node transport (Ray, shared
memory between processes) implements the same three methods.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ppipe_trt.errors import PPipeError
from ppipe_trt.scheduler.interface import Dispatch


@dataclass(slots=True)
class StageJob:
    """One batch entering one stage.

    ``tensors`` maps the stage's input names to batch-major arrays with exactly
    ``dispatch.batch_size`` rows; ownership passes to the receiving worker (the sender must
    not write to them afterwards).  A timing-only pipeline sends an empty mapping.
    ``not_before_us``: earliest start on the runtime's clock (stage 0: the reserved start;
    later stages: when the emulated link has finished carrying the activations).
    """

    dispatch: Dispatch
    stage: int
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    not_before_us: float = 0.0
    sent_us: float = 0.0

    @property
    def reservation(self):
        return self.dispatch.route[self.stage]

    @property
    def is_last_stage(self) -> bool:
        return self.stage == len(self.dispatch.route) - 1


class TransportError(PPipeError):
    """A job was sent to a worker the transport does not know, or after close()."""


class Transport(ABC):
    """Delivers stage jobs to workers.  ``send`` may be called from any thread."""

    @abstractmethod
    def register(self, worker_id: int, deliver: Callable[[StageJob], None]) -> None:
        """Route jobs for ``worker_id`` to ``deliver`` (called once per worker at start-up)."""

    @abstractmethod
    def send(self, worker_id: int, job: StageJob, now_us: float) -> None:
        """Hand ``job`` to ``worker_id``.  ``now_us`` is the sender's clock at hand-off."""

    def unregister(self, worker_id: int) -> None:
        """Forget ``worker_id`` (a worker a plan swap retired): later sends to it raise, and
        the transport no longer holds the worker.  A transport that holds nothing per worker
        has nothing to do."""

    def close(self) -> None:
        """Release links; later ``send`` calls raise :class:`TransportError`."""


class InProcessTransport(Transport):
    """Workers are threads of this process; arrays are passed by reference.

    ``emulate_links``: delay each hand-off between stages by the link time the scheduler
    reserved for it (``transfer_finish_us - transfer_start_us`` of the next stage), so an
    emulated multi-server cluster pays its network transfers.  Stage 0 is never delayed.
    """

    def __init__(self, emulate_links: bool = False):
        self.emulate_links = emulate_links
        self._deliver: dict[int, Callable[[StageJob], None]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def register(self, worker_id: int, deliver: Callable[[StageJob], None]) -> None:
        with self._lock:
            self._deliver[worker_id] = deliver

    def unregister(self, worker_id: int) -> None:
        with self._lock:
            self._deliver.pop(worker_id, None)

    def send(self, worker_id: int, job: StageJob, now_us: float) -> None:
        deliver = self._deliver.get(worker_id)
        if self._closed:
            raise TransportError(f"transport closed; cannot send batch {job.dispatch.batch_id} "
                                 f"to worker {worker_id}")
        if deliver is None:
            raise TransportError(f"no worker {worker_id} registered with the transport; have "
                                 f"{sorted(self._deliver)}")
        job.sent_us = now_us
        if self.emulate_links and job.stage > 0:
            res = job.reservation
            job.not_before_us = max(job.not_before_us,
                                    now_us + (res.transfer_finish_us - res.transfer_start_us))
        deliver(job)

    def receiver(self, worker_id: int) -> Callable[[StageJob], None] | None:
        """What :meth:`send` would deliver a job for ``worker_id`` to (``None`` when closed
        or unknown: :meth:`send` would raise).  A sender that can take a job over itself
        (the compiled timing-only workers, ``ppipe_trt._native.timed``) looks here and then
        keeps :meth:`send`'s rules: ``sent_us``, and the link delay of a later stage."""
        return None if self._closed else self._deliver.get(worker_id)

    def close(self) -> None:
        self._closed = True
