"""The live runtime: drives the reservation scheduler on the wall clock.

One thread (the *loop*) owns the schedulers: it is the only caller of their methods.  It
sleeps until the earliest of (next wake-up any scheduler asked for, next event in its inbox),
never spinning.  Events are request arrivals (from :meth:`ServingRuntime.submit`, any thread)
and stage finishes (from worker threads).  Decisions are carried out at once: a dispatch
becomes a :class:`StageJob` sent to its stage-0 worker (which forwards stage to stage without
coming back here), a drop resolves the request's future with
:class:`~ppipe_trt.errors.RequestRejectedError`.

Every request submitted gets exactly one answer on its :class:`concurrent.futures.Future`:
an :class:`InferenceResult`, or an exception (rejected, failed, shut down).  The clock is
``time.monotonic_ns() / 1000`` (microseconds); nothing below the runtime reads the time.
"""

from __future__ import annotations

import gc
import itertools
import logging
import queue
import sys
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from ppipe_trt.engines.backends.base import TensorSpec
from ppipe_trt.errors import (ModelNotFoundError, PPipeError, RequestRejectedError,
                              SchedulerError)
from ppipe_trt.plan import Plan, plan_to_dict
from ppipe_trt.repository.types import ImageSpec, Postprocess
from ppipe_trt.scheduler.interface import Decisions, Dispatch, DropReason, Request, Scheduler
from ppipe_trt.serving.stats import RuntimeStats
from ppipe_trt.serving.transport import StageJob, Transport
from ppipe_trt.serving.worker import StageWorker, monotonic_us

log = logging.getLogger("ppipe.serving")

#: How long the loop releases the GIL after dispatching, before it answers many drops.
_YIELD_S = 50e-6


class StageFailedError(PPipeError):
    """A stage's engine (or the hand-off to the next stage) failed under a batch; every
    request of the batch gets this error."""


@dataclass(frozen=True, slots=True)
class ServedModel:
    """What the front end needs to know about a model it serves.

    ``inputs``/``outputs``: tensor specs with ``-1`` as the batch dimension.  ``mode`` says
    how it runs (e.g. ``"onnxruntime cpu"``, ``"timing-only, emulated"``); ``emulated`` marks
    figures that come from emulated GPU classes.  ``image`` (frames preprocessing) and
    ``postprocess`` come from the model's repository configuration.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    slo_us: float
    max_batch: int
    mode: str
    emulated: bool = False
    timing_only: bool = False
    image: ImageSpec | None = None
    postprocess: Postprocess = Postprocess()

    def input(self, name: str) -> TensorSpec | None:
        return next((s for s in self.inputs if s.name == name), None)


@dataclass(frozen=True, slots=True)
class InferenceResult:
    """One request's answer.  ``outputs`` arrays have a leading batch dimension of 1 and are
    owned by the caller.  Times are microseconds on the runtime clock."""

    request_id: int
    model: str
    outputs: dict[str, np.ndarray]
    arrival_us: float
    finish_us: float
    deadline_us: float
    batch_size: int

    @property
    def latency_us(self) -> float:
        return self.finish_us - self.arrival_us

    @property
    def met_deadline(self) -> bool:
        return self.finish_us <= self.deadline_us


@dataclass(slots=True)
class _Pending:
    inputs: Mapping[str, np.ndarray] | None
    future: Future = field(default_factory=Future)
    deadline_us: float = 0.0
    # The request's activations between two dispatches of a policy that schedules stage by
    # stage (reactive): the outputs of the stage it last finished, keyed by tensor name.
    carried: dict[str, np.ndarray] | None = None


class ServingRuntime:
    """Schedulers + workers + the wall-clock loop.  Use :meth:`start` / :meth:`stop` (or
    ``with``).  ``max_pending``: requests waiting or running at once, beyond which new ones
    are rejected at once with reason ``queue_full``.  ``switch_interval_s``: Python's thread
    switch interval (:func:`sys.setswitchinterval`, process-wide) from :meth:`start` to
    :meth:`stop`; ``None`` leaves it as it is."""

    def __init__(self, plan: Plan, models: Mapping[str, ServedModel],
                 schedulers: Mapping[str, Scheduler], transport: Transport,
                 hop_overhead_us: float = 0.0, deadline_margin_us: float = 0.0,
                 max_pending: int = 10_000,
                 clock: Callable[[], float] = monotonic_us, info: Mapping[str, Any] | None = None,
                 switch_interval_s: float | None = None):
        missing = [m for m in models if m not in schedulers]
        if missing:
            raise PPipeError(f"no scheduler for models {missing}")
        self.plan = plan
        self._num_stages = {(m.model, i): len(p.stages)
                            for m in plan.models for i, p in enumerate(m.pipelines)}
        self.models = dict(models)
        self.hop_overhead_us = hop_overhead_us
        self.deadline_margin_us = deadline_margin_us
        self.info = dict(info or {})
        self.stats = RuntimeStats(list(self.models))
        self._schedulers = dict(schedulers)
        self._transport = transport
        self._clock = clock
        self._max_pending = max_pending
        self._switch_interval_s = switch_interval_s
        self._saved_switch_interval_s: float | None = None
        self._workers: dict[int, StageWorker] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake: dict[str, float | None] = {m: None for m in self.models}
        self._inflight: dict[tuple[str, int], Dispatch] = {}
        self._inflight_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._submit_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._accepting = False
        self.started_us = 0.0

    # ---- set-up ------------------------------------------------------------------------------
    def add_worker(self, worker: StageWorker) -> None:
        if self._thread is not None:
            raise PPipeError("add workers before start()")
        self._workers[worker.worker_id] = worker

    @property
    def workers(self) -> tuple[StageWorker, ...]:
        return tuple(self._workers[w] for w in sorted(self._workers))

    def start(self) -> "ServingRuntime":
        # A full collection over the objects loaded so far (models, FastAPI, numpy) pauses
        # every thread for tens of milliseconds, which a reservation made to the millisecond
        # cannot absorb; freezing them keeps later collections small.
        gc.collect()
        gc.freeze()
        if self._switch_interval_s is not None:
            # A thread that a reservation is waiting for (a worker whose batch starts now,
            # the loop at its wake-up) waits for the GIL up to this long behind a thread
            # running Python; the default 5 ms is as long as a whole stage of small models.
            self._saved_switch_interval_s = sys.getswitchinterval()
            sys.setswitchinterval(self._switch_interval_s)
        for w in self.workers:
            w.start()
        self.started_us = self._clock()
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, daemon=True, name="ppipe-runtime")
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop accepting; drop queued requests (``shutdown``); stop workers; fail batches in
        flight.  Every outstanding future is resolved when this returns."""
        if self._thread is None:
            return
        with self._submit_lock:  # no arrival can be queued behind the stop event
            self._accepting = False
            self._inbox.put(("stop",))
        self._thread.join(timeout_s)
        for w in self.workers:
            w.stop()
        self._transport.close()
        with self._inflight_lock:
            stranded, self._inflight = list(self._inflight.values()), {}
        for d in stranded:
            self._fail_requests(d, RequestRejectedError(
                DropReason.SHUTDOWN.value, "server shutting down; batch cancelled"))
        self._thread = None
        if self._saved_switch_interval_s is not None:
            sys.setswitchinterval(self._saved_switch_interval_s)
            self._saved_switch_interval_s = None

    def __enter__(self) -> "ServingRuntime":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def ready(self) -> bool:
        return self._accepting and self._thread is not None and self._thread.is_alive()

    # ---- requests ---------------------------------------------------------------------------
    def model(self, name: str) -> ServedModel:
        try:
            return self.models[name]
        except KeyError:
            raise ModelNotFoundError(f"unknown model {name!r}; served models: "
                                     f"{sorted(self.models)}") from None

    def submit(self, model: str, inputs: Mapping[str, np.ndarray] | None,
               timeout_us: float | None = None) -> Future:
        """Queue one sample for ``model``; returns a future of :class:`InferenceResult`.

        ``inputs`` maps every model input to an array of batch 1 (ignored, may be ``None``,
        for timing-only models).  ``timeout_us``: the request's deadline relative to now
        (default: the model's SLO).  Thread-safe.  Raises ``ModelNotFoundError``; rejections
        arrive on the future.
        """
        spec = self.model(model)
        pending = _Pending(inputs)
        with self._submit_lock:
            if not self._accepting:
                pending.future.set_exception(RequestRejectedError(
                    DropReason.SHUTDOWN.value, "server is not accepting requests (shutting down)"))
                return pending.future
            self._admit(model, spec, pending, timeout_us)
        return pending.future

    def _admit(self, model: str, spec: ServedModel, pending: _Pending,
               timeout_us: float | None) -> None:
        with self._pending_lock:
            full = self._pending >= self._max_pending
            if not full:
                self._pending += 1
        self.stats.request(model)
        if full:
            self.stats.drop(model, DropReason.QUEUE_FULL.value)
            pending.future.set_exception(RequestRejectedError(
                DropReason.QUEUE_FULL.value,
                f"server overloaded: {self._max_pending} requests already in the system"))
            return
        pending.future.add_done_callback(self._release_pending)
        now = self._clock()
        budget = spec.slo_us if timeout_us is None else timeout_us
        pending.deadline_us = now + budget
        # The scheduler plans against a deadline that leaves room for the hand-offs it does
        # not see (dispatch, answer); the result is judged against the real one.
        planned = max(0.0, budget - self.deadline_margin_us)
        self._inbox.put(("arrive", Request(next(self._ids), model, now, now + planned,
                                           pending, grace_us=budget - planned)))

    def _release_pending(self, _fut: Future) -> None:
        with self._pending_lock:
            self._pending -= 1

    # ---- worker sink (worker threads) -----------------------------------------------------
    def stage_finished(self, job: StageJob, start_us: float, finish_us: float) -> None:
        d = job.dispatch
        self._inbox.put(("finished", d.model, d.batch_id, d.route[job.stage].stage, finish_us))

    def batch_completed(self, job: StageJob, outputs: dict[str, np.ndarray],
                        finish_us: float) -> None:
        d = job.dispatch
        with self._inflight_lock:
            self._inflight.pop((d.model, d.batch_id), None)
        spec = self.models[d.model]
        if d.route[-1].stage < self._num_stages[(d.model, d.pipeline)] - 1:
            # A per-stage dispatch (reactive policy) ended mid-pipeline: keep each request's
            # activations for the dispatch of its next stage.  Set before stage_finished
            # reports the finish, so that dispatch always finds them.
            if not spec.timing_only:
                for i, r in enumerate(d.requests):
                    r.payload.carried = {k: v[i:i + 1] for k, v in outputs.items()}
            return
        if spec.timing_only:
            outputs = {o.name: np.zeros((d.batch_size,) + tuple(max(1, x) for x in o.shape[1:]),
                                        o.dtype) for o in spec.outputs}
        for i, r in enumerate(d.requests):
            result = InferenceResult(r.request_id, d.model,
                                     {k: v[i:i + 1] for k, v in outputs.items()},
                                     r.arrival_us, finish_us, r.payload.deadline_us,
                                     d.batch_size)
            self.stats.completion(d.model, result.latency_us, result.met_deadline)
            _resolve(r.payload.future, result=result)

    def batch_failed(self, job: StageJob, error: BaseException, now_us: float) -> None:
        d = job.dispatch
        log.error("batch %d of %s failed in stage %d: %s", d.batch_id, d.model, job.stage, error)
        with self._inflight_lock:
            self._inflight.pop((d.model, d.batch_id), None)
        if not self._accepting:  # hand-offs fail while the server stops: say so
            error = RequestRejectedError(DropReason.SHUTDOWN.value,
                                         "server shutting down; batch cancelled")
        elif not isinstance(error, RequestRejectedError):
            error = StageFailedError(
                f"stage {job.stage} of {d.model} failed on worker "
                f"{d.route[job.stage].worker_id} (batch of {d.batch_size}): "
                f"{type(error).__name__}: {error}")
        self._fail_requests(d, error)
        # The batch's remaining reservations are released: their stages "finish" now.
        for hop in d.route[job.stage:]:
            self._inbox.put(("finished", d.model, d.batch_id, hop.stage, now_us))

    def _fail_requests(self, d: Dispatch, error: BaseException) -> None:
        self.stats.failure(d.model, len(d.requests))
        for r in d.requests:
            _resolve(r.payload.future, error=error)

    # ---- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            wakes = [t for t in self._wake.values() if t is not None]
            timeout = None
            if wakes:
                timeout = max(0.0, min(wakes) - self._clock()) / 1e6
            events = []
            try:
                events.append(self._inbox.get(timeout=timeout))
                while True:  # take everything that queued up meanwhile, in order
                    events.append(self._inbox.get_nowait())
            except queue.Empty:
                pass
            try:
                if not self._process(events):
                    return
            except Exception:  # keep serving; the front end's deadline guard answers the rest
                log.exception("runtime loop: unexpected error while handling %d events",
                              len(events))

    def _process(self, events: list[tuple]) -> bool:
        i, n = 0, len(events)
        while i < n:
            ev = events[i]
            now = self._clock()
            kind = ev[0]
            if kind == "arrive":
                # A burst that queued up meanwhile goes to its scheduler in one call (one
                # decision pass): the loop then holds the GIL for microseconds per request,
                # not a decision pass each, and the workers it dispatched to start on time.
                model = ev[1].model
                j = i + 1
                while j < n and events[j][0] == "arrive" and events[j][1].model == model:
                    j += 1
                requests = [e[1] for e in events[i:j]]
                i = j
                try:
                    decisions = self._schedulers[model].on_arrivals(requests, now)
                except PPipeError as exc:
                    log.error("scheduler refused %d request(s) of %s: %s", len(requests),
                              model, exc)
                    for r in requests:
                        _resolve(r.payload.future, error=exc)
                    continue
                self._apply(model, decisions, now)
                continue
            i += 1
            if kind == "finished":
                _, model, batch_id, stage, finish_us = ev
                try:
                    decisions = self._schedulers[model].on_stage_finished(
                        batch_id, stage, finish_us, now)
                except SchedulerError as exc:  # e.g. a batch the scheduler already dropped
                    log.warning("ignored stage finish: %s", exc)
                    continue
                self._apply(model, decisions, now)
            elif kind == "stop":
                self._drain(now, "")
                return False
        now = self._clock()
        for model, wake in list(self._wake.items()):
            if wake is not None and wake <= now:
                self._wake[model] = None
                self._apply(model, self._schedulers[model].on_wake(now), now)
        return True

    def _drain(self, now: float, why: str) -> None:
        for model, sched in self._schedulers.items():
            decisions = sched.drain(now)
            for drop in decisions.drops:
                self._answer_drop(model, drop.request, DropReason.SHUTDOWN,
                                  why or drop.detail or "server shutting down")
        # Requests still in the inbox never reached a scheduler.
        try:
            while True:
                ev = self._inbox.get_nowait()
                if ev[0] == "arrive":
                    self._answer_drop(ev[1].model, ev[1], DropReason.SHUTDOWN,
                                      why or "server shutting down")
        except queue.Empty:
            pass

    def _apply(self, model: str, decisions: Decisions, now: float) -> None:
        self._wake[model] = decisions.wake_at_us
        # dispatches first: their workers wait on reserved start times, the dropped
        # requests' clients only on their answers
        for d in decisions.dispatches:
            self._dispatch(d, now)
        if decisions.dispatches and len(decisions.drops) > 8:
            # an overload burst: let the workers just dispatched to take the GIL and start
            # before this thread spends milliseconds answering the dropped requests
            time.sleep(_YIELD_S)
        for drop in decisions.drops:
            self._answer_drop(model, drop.request, drop.reason, drop.detail)

    def _answer_drop(self, model: str, request: Request, reason: DropReason, detail: str) -> None:
        reason_value = getattr(reason, "value", str(reason))
        self.stats.drop(model, reason_value)
        message = {
            "deadline_unreachable": "cannot finish within the deadline",
            "no_workers": "no live worker for some stage of the model",
            "worker_failed": "the reserved worker failed and there is no time to re-dispatch",
            "queue_full": "server overloaded",
            "shutdown": "server shutting down",
        }.get(reason_value, reason_value)
        budget_ms = (request.payload.deadline_us - request.arrival_us) / 1000.0
        _resolve(request.payload.future, error=RequestRejectedError(
            reason_value, f"request dropped ({reason_value}): {message} "
                          f"(deadline {budget_ms:.1f} ms after arrival)"
                          + (f"; {detail}" if detail else "")))

    def _dispatch(self, d: Dispatch, now: float) -> None:
        spec = self.models[d.model]
        tensors: dict[str, np.ndarray] = {}
        if not spec.timing_only:
            if d.route[0].stage == 0:
                names = [s.name for s in spec.inputs]
                sources = [r.payload.inputs for r in d.requests]
            else:  # a later stage dispatched on its own: the activations the requests carry
                sources = [r.payload.carried for r in d.requests]
                names = list(sources[0])
            for name in names:
                parts = [src[name] for src in sources]
                tensors[name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self.stats.batch(d.model, d.batch_size)
        with self._inflight_lock:
            self._inflight[(d.model, d.batch_id)] = d
        job = StageJob(d, 0, tensors, not_before_us=d.route[0].start_us)
        try:
            self._transport.send(d.route[0].worker_id, job, now)
        except PPipeError as exc:
            self.batch_failed(job, exc, now)

    # ---- introspection ---------------------------------------------------------------------
    def now_us(self) -> float:
        """The runtime clock (microseconds)."""
        return self._clock()

    def worker_stats(self) -> list:
        return [w.stats() for w in self.workers]

    def status(self) -> dict[str, Any]:
        """The plan in force, the workers and how they run (JSON-ready)."""
        now = self._clock()
        return {
            "ready": self.ready,
            "uptime_s": (now - self.started_us) / 1e6 if self.started_us else 0.0,
            "hop_overhead_us": self.hop_overhead_us,
            "deadline_margin_us": self.deadline_margin_us,
            "emulated": any(m.emulated for m in self.models.values()),
            **self.info,
            "models": {m.name: {"slo_ms": m.slo_us / 1000.0, "max_batch": m.max_batch,
                                "mode": m.mode, "emulated": m.emulated,
                                "frames": m.image is not None,
                                "postprocess": m.postprocess.kind,
                                "timing_only": m.timing_only}
                       for m in self.models.values()},
            "workers": [{"worker_id": w.worker_id, "model": w.info.model,
                         "pipeline": w.info.pipeline, "stage": w.info.stage,
                         "blocks": [w.info.first_block, w.info.last_block],
                         "gpu_class": w.info.gpu_class, "mps_share": w.info.mps_share,
                         "server_id": w.info.server_id, "mode": w.mode}
                        for w in self.workers],
            "plan": plan_to_dict(self.plan),
        }


def _resolve(fut: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Set a future's outcome once; a second outcome (e.g. a late result after shutdown
    already answered it) is ignored by design."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass


def measure_hop_overhead_us(samples: int = 300, quantile: float = 0.9) -> float:
    """Time a hand-off between two threads the way a stage hand-off happens (condition
    variable wake-up + queue), and return the ``quantile`` in microseconds."""
    import time
    cv = threading.Condition()
    box: list[float] = []
    done = threading.Event()
    delays: list[float] = []

    def receiver() -> None:
        for _ in range(samples):
            with cv:
                while not box:
                    cv.wait()
                sent = box.pop()
            delays.append(time.monotonic_ns() / 1000.0 - sent)
            done.set()

    t = threading.Thread(target=receiver, daemon=True)
    t.start()
    for _ in range(samples):
        done.clear()
        with cv:
            box.append(time.monotonic_ns() / 1000.0)
            cv.notify()
        done.wait(1.0)
    t.join(1.0)
    delays.sort()
    return float(delays[min(len(delays) - 1, int(quantile * len(delays)))]) if delays else 0.0
