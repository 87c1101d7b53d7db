"""What the runtime loop's inbox carries: one slotted record per kind of event.

Any thread posts events (:meth:`ppipe_trt.serving.loop.DecisionLoop.post`); only the loop
reads them, in order.  The loop itself handles :class:`Arrive`, :class:`StageFinished` and
:class:`Stop`; a runtime that posts other events (the Ray runtime's worker failures)
subclasses :class:`LoopEvent` and handles them in
:meth:`~ppipe_trt.serving.runtime.ServingRuntime.on_cluster_event`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ppipe_trt.scheduler.interface import Request


class LoopEvent:
    """Base of every event the runtime loop handles."""

    __slots__ = ()


@dataclass(slots=True)
class Arrive(LoopEvent):
    """A request was admitted (``submit``); the loop gives it to its model's scheduler.
    Consecutive arrivals of one model go to the scheduler in one call."""

    request: Request


@dataclass(slots=True)
class StageFinished(LoopEvent):
    """Stage ``stage`` of batch ``batch_id`` finished at ``finish_us`` (runtime clock), or its
    reservation is released because the batch failed or was lost."""

    model: str
    batch_id: int
    stage: int
    finish_us: float


@dataclass(slots=True)
class Recalibrated(LoopEvent):
    """The workers of stage ``stage`` of ``pipeline`` of ``model`` were measured to take
    ``latency_us`` (index = batch size): its scheduler plans with it from now on, if the plan
    it was measured under (its first batch id, ``first_batch_id``) is still in force."""

    model: str
    first_batch_id: int
    pipeline: int
    stage: int
    latency_us: tuple[float, ...]


@dataclass(slots=True)
class Stop(LoopEvent):
    """The runtime stops: the loop drops what is queued (``shutdown``) and ends."""


@dataclass(slots=True)
class CallAt(LoopEvent):
    """Set a timer from another thread: run ``callback`` on the loop thread at ``time_us``
    (see :meth:`~ppipe_trt.serving.loop.DecisionLoop.call_at`)."""

    time_us: float
    callback: Callable[[], None]
