"""The API process's side of the Ray data path.

:class:`RayTransport` implements :class:`~ppipe_trt.serving.transport.Transport` for the
runtime: ``send`` (called for stage 0 of every dispatch) strips the scheduler's request
payloads (futures, input arrays: they stay in the API process) and calls the stage-0 actor's
``submit``.  The actors forward stage to stage themselves; the API process follows each batch
by awaiting the :class:`~ppipe_trt.serving.ray_backend.actor.StageReport` of each stage
(``ObjectRef.future()`` callbacks, no polling), and reports to the runtime exactly what an
in-process worker would (``stage_finished``, ``batch_completed``, ``batch_failed``).

A report that cannot be read because an actor died (``RayActorError``: the worker itself;
``OwnerDiedError``: the previous stage's worker, which owned the call) is a *lost* batch:
the runtime's :meth:`~ppipe_trt.serving.ray_backend.runtime.RayServingRuntime.batch_lost`
removes the worker and re-dispatches or fails the batch's requests.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import Any, Callable

from ppipe_trt.errors import PPipeError
from ppipe_trt.scheduler.interface import Dispatch, Request
from ppipe_trt.serving.transport import StageJob, Transport, TransportError

log = logging.getLogger("ppipe.serving.ray")


def strip_payloads(d: Dispatch) -> Dispatch:
    """The dispatch as sent to actors: requests without their (API-process-only) payload."""
    return replace(d, requests=tuple(Request(r.request_id, r.model, r.arrival_us,
                                             r.deadline_us, None) for r in d.requests))


class RayTransport(Transport):
    """Sends stage-0 jobs to actors and follows every batch to its last stage.

    ``sink``: the runtime (``stage_finished``/``batch_completed``/``batch_failed``/
    ``batch_lost``), set with :meth:`attach` before the first send.  ``clock``: the runtime's.
    """

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self._handles: dict[int, Any] = {}
        self._sink = None
        self._closed = False
        self._lock = threading.Lock()
        self._outstanding = 0

    def attach(self, sink) -> None:
        self._sink = sink

    def set_handle(self, worker_id: int, handle: Any) -> None:
        with self._lock:
            self._handles[worker_id] = handle

    def register(self, worker_id: int, deliver) -> None:
        """Workers are reached through their actor handles (:meth:`set_handle`)."""

    def unregister(self, worker_id: int) -> None:
        with self._lock:
            self._handles.pop(worker_id, None)

    @property
    def outstanding(self) -> int:
        """Stage reports awaited right now."""
        return self._outstanding

    def send(self, worker_id: int, job: StageJob, now_us: float) -> None:
        if self._closed:
            raise TransportError(f"transport closed; cannot send batch {job.dispatch.batch_id} "
                                 f"to worker {worker_id}")
        handle = self._handles.get(worker_id)
        if handle is None:
            raise TransportError(f"no actor for worker {worker_id}; have {sorted(self._handles)}")
        wire = StageJob(strip_payloads(job.dispatch), job.stage, job.tensors,
                        job.not_before_us, now_us)
        self._follow(job.dispatch, job.stage, handle.submit.remote(wire))

    def _follow(self, d: Dispatch, stage: int, ref: Any) -> None:
        with self._lock:
            self._outstanding += 1
        ref.future().add_done_callback(lambda fut: self._on_report(d, stage, fut))

    def _on_report(self, d: Dispatch, stage: int, fut) -> None:
        with self._lock:
            self._outstanding -= 1
        sink = self._sink
        try:
            report = fut.result()
        except Exception as exc:  # an actor died (or the call could not be delivered)
            self._on_lost(d, stage, exc)
            return
        job = StageJob(d, stage)
        try:
            if report.error is not None:  # the stage (or its hand-off) failed
                sink.batch_failed(job, PPipeError(
                    f"stage {stage} of {d.model} failed on worker {report.worker_id}: "
                    f"{report.error}"), self._clock())
                return
            if report.outputs is not None:
                sink.batch_completed(job, report.outputs, report.finish_us)
            sink.stage_finished(job, report.start_us, report.finish_us)
            if report.next_ref is not None:
                self._follow(d, stage + 1, report.next_ref)
        except Exception:  # never let a callback die silently: the batch must be answered
            log.exception("ray transport: handling the report of batch %d stage %d",
                          d.batch_id, stage)
            sink.batch_failed(job, PPipeError("internal error while reading a stage report"),
                              self._clock())

    def _on_lost(self, d: Dispatch, stage: int, exc: BaseException) -> None:
        import ray.exceptions as rex

        if isinstance(exc, rex.OwnerDiedError) and stage > 0:
            suspect = d.route[stage - 1].worker_id  # the caller that owned this stage's call
        elif isinstance(exc, (rex.RayActorError, rex.ActorUnavailableError)):
            suspect = d.route[stage].worker_id
        else:
            suspect = None
        if self._sink is not None:
            self._sink.batch_lost(d, stage, suspect, exc, self._clock())

    def close(self) -> None:
        self._closed = True
