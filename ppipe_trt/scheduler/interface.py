"""The scheduler's interface: events in, decisions out.  One scheduler, two clocks.

A scheduler is a passive state machine.  It never reads a clock, sleeps or does I/O: the
caller (the simulator's event loop, or the live server's wall-clock loop) tells it the time
with every call and carries out the decisions it returns.  Times are microseconds on the
caller's clock (float).

Call protocol
-------------
* ``on_arrival(request, now_us)`` when a request enters the system;
  ``on_arrivals(requests, now_us)`` for several that arrived by ``now_us`` (a burst the
  caller took in at once: one decision pass instead of one per request).
* ``on_stage_finished(batch_id, stage, finish_us, now_us)`` when the worker of ``stage`` of a
  dispatched batch has finished (``finish_us`` is the actual time; the scheduler corrects
  that worker's reservation if it differs from what was reserved).
* ``on_wake(now_us)`` when the time returned as ``wake_at_us`` has come.
* ``remove_worker(worker_id, now_us)`` / ``add_worker(worker_id, now_us)`` on worker failure
  or recovery.
Each returns :class:`Decisions`.  The caller must execute every ``Dispatch`` (start stage 0 of
the route at ``route[0].start_us``; each later stage on its reserved worker), answer every
``Drop`` to its client, and call ``on_wake`` at ``wake_at_us`` (a later decision supersedes an
earlier wake-up).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence


@dataclass(slots=True)
class Request:
    """One inference request (one frame).  ``payload`` is opaque to the scheduler.

    ``deadline_us`` is what the scheduler plans against.  ``grace_us`` (live server: the
    deadline margin it keeps for costs the scheduler does not see) is how far past it a batch
    may still finish when the plan can no longer be kept, e.g. after a late wake-up on a busy
    host: such a request is dispatched at once rather than dropped.  0 in the simulator.
    """

    request_id: int
    model: str
    arrival_us: float
    deadline_us: float
    payload: object = None
    grace_us: float = 0.0


class DropReason(str, enum.Enum):
    DEADLINE_UNREACHABLE = "deadline_unreachable"  # no route finishes even batch 1 in time
    NO_WORKERS = "no_workers"                      # the model has no live worker in some stage
    WORKER_FAILED = "worker_failed"                # reserved worker died; no time to re-dispatch
    QUEUE_FULL = "queue_full"                      # admission control
    SHUTDOWN = "shutdown"                          # server stopping


@dataclass(frozen=True, slots=True)
class StageReservation:
    """A reserved slot for one stage of a batch.

    ``transfer_start_us``/``transfer_finish_us``: the activations' move from the previous
    stage's worker into this one (both servers' links reserved over that interval; equal to
    ``start_us`` when no transfer is needed, e.g. stage 0 or same-server hand-off).
    """

    stage: int
    worker_id: int
    start_us: float
    finish_us: float
    transfer_start_us: float
    transfer_finish_us: float


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Run ``requests`` as one batch along ``route`` (one reservation per stage)."""

    batch_id: int
    model: str
    pipeline: int
    requests: tuple[Request, ...]
    route: tuple[StageReservation, ...]

    @property
    def batch_size(self) -> int:
        return len(self.requests)

    @property
    def finish_us(self) -> float:
        return self.route[-1].finish_us


@dataclass(frozen=True, slots=True)
class Drop:
    request: Request
    reason: DropReason
    detail: str = ""


@dataclass(slots=True)
class Decisions:
    dispatches: list[Dispatch] = field(default_factory=list)
    drops: list[Drop] = field(default_factory=list)
    wake_at_us: float | None = None

    def extend(self, other: "Decisions") -> "Decisions":
        self.dispatches.extend(other.dispatches)
        self.drops.extend(other.drops)
        if other.wake_at_us is not None and (self.wake_at_us is None
                                             or other.wake_at_us < self.wake_at_us):
            self.wake_at_us = other.wake_at_us
        return self


class Scheduler(ABC):
    """Base class of the reservation scheduler and the baseline policies."""

    @abstractmethod
    def on_arrival(self, request: Request, now_us: float) -> Decisions: ...

    def on_arrivals(self, requests: Sequence[Request], now_us: float) -> Decisions:
        """Several requests that arrived by ``now_us``, in arrival order.  This default
        calls :meth:`on_arrival` for each at ``now_us``; a policy may instead queue them all
        and decide once (the reservation policy does: one decision pass, batches formed in
        deadline order over the whole burst)."""
        out = Decisions()
        for r in requests:
            dec = self.on_arrival(r, now_us)
            out.dispatches.extend(dec.dispatches)
            out.drops.extend(dec.drops)
            out.wake_at_us = dec.wake_at_us   # a later decision supersedes an earlier wake-up
        return out

    @abstractmethod
    def on_stage_finished(self, batch_id: int, stage: int, finish_us: float,
                          now_us: float) -> Decisions: ...

    @abstractmethod
    def on_wake(self, now_us: float) -> Decisions: ...

    @abstractmethod
    def remove_worker(self, worker_id: int, now_us: float) -> Decisions: ...

    @abstractmethod
    def add_worker(self, worker_id: int, now_us: float) -> Decisions: ...

    def drain(self, now_us: float) -> Decisions:
        """Drop every queued request with ``SHUTDOWN`` (called when the server stops)."""
        return Decisions()

    # ---- calibration (see ppipe_trt.scheduler.calibration) ----------------------------------
    #: Whether the policy plans from latency tables that :meth:`set_stage_latency` can replace
    #: with measured ones.
    calibratable = False

    def set_stage_latency(self, pipeline: int, stage: int, latency_us: Sequence[float]) -> None:
        """Plan stage ``stage`` of ``pipeline`` with ``latency_us`` (index = batch size; the
        length of the table's row) from now on: what its workers were measured to take."""
        raise NotImplementedError(f"{type(self).__name__} plans from no latency table")

    # ---- plan swap (see ppipe_trt.serving.swap and the simulator's swap) --------------------
    #: Whether the policy can hand its queue over to another plan's scheduler
    #: (:meth:`take_queued`, :meth:`hold_worker`, :attr:`batches_in_flight`).
    swappable = False

    def take_queued(self, now_us: float) -> list[Request]:
        """Take every request queued but not yet dispatched out of the scheduler, in
        deadline order (a plan swap gives them, with their deadlines, to the new plan's
        scheduler).  Batches already dispatched stay; their finishes are still reported
        here.  After this the scheduler wants no wake-up until it is given requests."""
        raise NotImplementedError(f"{type(self).__name__} cannot hand its queue over")

    def hold_worker(self, worker_id: int, until_us: float) -> None:
        """Reserve ``worker_id`` until ``until_us`` at least (its GPU is still busy with
        another plan's batches until then; a plan swap sets it)."""
        raise NotImplementedError(f"{type(self).__name__} cannot hold a worker")

    @property
    def batches_in_flight(self) -> int:
        """Batches dispatched whose last stage has not been reported finished."""
        raise NotImplementedError(f"{type(self).__name__} does not count its batches")
