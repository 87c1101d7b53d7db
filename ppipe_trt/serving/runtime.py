"""The live runtime: schedulers + workers + the loop that drives them on the wall clock.

:class:`ServingRuntime` admits requests (:meth:`~ServingRuntime.submit`, any thread), hands
them to its :class:`~ppipe_trt.serving.loop.DecisionLoop` (the one thread that calls the
schedulers), carries out the loop's decisions (a dispatch becomes a
:class:`~ppipe_trt.serving.transport.StageJob` sent to its stage-0 worker, which forwards
stage to stage without coming back here; a drop resolves the request's future with
:class:`~ppipe_trt.errors.RequestRejectedError`) and hears back from the workers
(:class:`~ppipe_trt.serving.worker.WorkerSink`).  Workers are driven through the
:class:`~ppipe_trt.serving.handle.WorkerHandle` protocol, wherever they run.

Every request submitted gets exactly one answer on its future (:meth:`~ServingRuntime.submit`:
a :class:`concurrent.futures.Future`, any thread; :meth:`~ServingRuntime.submit_async`: an
asyncio future, on the event loop): an :class:`InferenceResult`, or an exception (rejected,
failed, shut down).  ``start(event_loop)`` runs the loop on a front end's event loop instead
of a thread of its own (see :mod:`ppipe_trt.serving.loop`): a request submitted there with
``submit_async`` is admitted, scheduled, dispatched to thread-less workers and answered
without leaving that thread.  The clock is
``time.monotonic_ns() / 1000`` (microseconds); nothing below the runtime reads the time.

Local workers given a fault policy (:mod:`ppipe_trt.serving.faults`) quarantine themselves
on a hang, bad outputs or repeated errors and tell the runtime (``worker_failed``); the loop
then takes the worker out of its scheduler's pool (``remove_worker``), and the batches still
reserved on it are answered ``worker_failed``.

A runtime whose workers can fail in other ways (the Ray runtime) subclasses :class:`ServingRuntime` and
implements its *hooks* (:meth:`~ServingRuntime.on_cluster_event`,
:meth:`~ServingRuntime.on_drops`, :meth:`~ServingRuntime.before_answer_drop`); it overrides
no private method.

The records (:class:`ServedModel`, :class:`InferenceResult`, :class:`StageFailedError`,
:class:`ImageSpec`) live in :mod:`ppipe_trt.serving.types`, :func:`measure_hop_overhead_us`
in :mod:`ppipe_trt.serving.clock`; both are re-exported here.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Mapping

import numpy as np

from ppipe_trt.errors import PPipeError, RequestRejectedError
from ppipe_trt.plan import Plan
from ppipe_trt.scheduler.calibration import LatencyCalibrator
from ppipe_trt.scheduler.placement import Placement
from ppipe_trt.scheduler.interface import (Decisions, Dispatch, Drop, DropReason, Request,
                                           Scheduler)
from ppipe_trt.serving.admission import AdmissionControl
from ppipe_trt.serving.recalibrate import CalibrationReplanner
from ppipe_trt.serving.answers import CallbackAnswer, drop_error, resolve, shutdown_error
from ppipe_trt.serving.clock import measure_hop_overhead_us, monotonic_us
from ppipe_trt.serving.events import Arrive, LoopEvent, Recalibrated, StageFinished, Stop
from ppipe_trt.serving.faults import QuarantineRecord, WorkerQuarantined
from ppipe_trt.serving.handle import WorkerHandle, WorkerStats
from ppipe_trt.serving.loop import EVENT_LOOP_TIMER_SLOP_US, DecisionLoop
from ppipe_trt.serving.options import RuntimeOptions
from ppipe_trt.serving.stats import RuntimeStats
from ppipe_trt.serving.status import runtime_status
from ppipe_trt.serving.swap import (Generation, PlanSwapError, PreparedSwap, SwapPlan,
                                    SwapReport, WorkerBuilder, apply_swap, prepare_swap,
                                    retire_drained)
from ppipe_trt.serving.transport import StageJob, Transport
from ppipe_trt.serving.types import (ImageSpec, InferenceResult, PendingRequest, ServedModel,
                                     StageFailedError, served_model)

__all__ = ["ImageSpec", "InferenceResult", "ServedModel", "ServingRuntime", "StageFailedError",
           "measure_hop_overhead_us"]

log = logging.getLogger("ppipe.serving")

#: How late, at most, a stage finish is heard and answered on the loop's own thread (GIL and
#: wake-up; measured <= 0.5 ms on a 2-core host at 2x overload).  A late dispatch (the
#: scheduler's grace) never plans into it: at 2x overload of a 50 ms plan, accepted requests
#: on time went from 97.5 % to 100 % (event loop: see EVENT_LOOP_TIMER_SLOP_US, 90.7 -> 100 %).
THREAD_ANSWER_SLOP_US = 500.0


class ServingRuntime:
    """Schedulers + workers + the wall-clock loop.  Use :meth:`start` / :meth:`stop` (or
    ``with``).

    ``hop_overhead_us``/``deadline_margin_us``: as given to the schedulers (reported by
    :meth:`status`; the margin is taken off each request's deadline before its scheduler
    sees it).  ``options``: the loop's and the process's knobs (``max_pending``,
    ``switch_interval_s``, ``freeze_gc``, ``loop_yield_*``, ``stop_timeout_s``; see
    :class:`RuntimeOptions`).  ``info``: extra entries of :meth:`status`.
    """

    def __init__(self, plan: Plan, models: Mapping[str, ServedModel],
                 schedulers: Mapping[str, Scheduler], transport: Transport,
                 hop_overhead_us: float = 0.0, deadline_margin_us: float = 0.0,
                 options: RuntimeOptions | None = None,
                 clock: Callable[[], float] = monotonic_us, info: Mapping[str, Any] | None = None,
                 placement: Placement | None = None, builder: WorkerBuilder | None = None):
        missing = [m for m in models if m not in schedulers]
        if missing:
            raise PPipeError(f"no scheduler for models {missing}")
        self.plan = plan
        self._num_stages = {(m.model, i): len(p.stages)
                            for m in plan.models for i, p in enumerate(m.pipelines)}
        self.models = dict(models)
        self.hop_overhead_us = hop_overhead_us
        self.deadline_margin_us = deadline_margin_us
        self.options = options or RuntimeOptions()
        self.info = dict(info or {})
        self.stats = RuntimeStats(list(self.models))
        self._transport = transport
        self._clock = clock
        self._loop = DecisionLoop(schedulers, self.models, self, clock, self.options)
        self._post = self._loop.post
        self._saved_switch_interval_s: float | None = None
        self._workers: dict[int, WorkerHandle] = {}
        self._inflight: dict[tuple[str, int], Dispatch] = {}
        self._inflight_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._zeros: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        self._answer_slop_us = 0.0  # how late an answer may be heard (see start)
        self._submit_lock = threading.Lock()
        self.quarantined: list[QuarantineRecord] = []  # appended on the loop thread
        # Plan swaps (see ppipe_trt.serving.swap): the plan in force and the earlier ones;
        # ``builder`` builds workers for a new plan (set by the assembly).
        self.builder = builder
        self.generation: Generation | None = None
        if placement is not None:
            state = getattr(next(iter(schedulers.values()), None), "cluster_state", None)
            self.generation = Generation(0, plan, placement, state)
        self.history: list[Generation] = [self.generation] if self.generation else []
        self._first_batch_id = 0        # batches with lower ids belong to an earlier plan
        self._next_worker_id = 0
        self._swap_lock = threading.Lock()
        self.adaptive = None   # the --adapt control loop, when one runs (status only)
        # what the workers of the plan in force really take, per model with real compute
        # (see calibration_status); replaced at every plan switch
        self._calibration: dict[str, LatencyCalibrator] = self._calibrators()
        self._replanner: CalibrationReplanner | None = None
        # overload control at the door, fed by the front end's event loop (watch_front_end)
        self.admission: AdmissionControl | None = None
        self._front_end_loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._accepting = False
        self.started_us = 0.0

    # ---- set-up ------------------------------------------------------------------------------
    def add_worker(self, worker: WorkerHandle) -> None:
        """Add a worker before :meth:`start` (a plan swap adds its own)."""
        if self._started:
            raise PPipeError("add workers before start(); a plan swap (swap_plan) adds "
                             "workers to a running runtime")
        self.register_worker(worker)

    def register_worker(self, worker: WorkerHandle) -> None:
        """Make ``worker`` one of the runtime's (set-up, or a plan swap on the loop
        thread)."""
        self._workers[worker.worker_id] = worker
        self._next_worker_id = max(self._next_worker_id, worker.worker_id + 1)

    def unregister_worker(self, worker_id: int) -> None:
        """Forget a worker a plan swap retired (loop thread)."""
        self._workers.pop(worker_id, None)

    def next_worker_id(self) -> int:
        """The first id no worker of this runtime ever had."""
        return self._next_worker_id

    def replace_worker(self, worker: WorkerHandle) -> None:
        """Put ``worker`` in the place of the worker with its id (a re-launched Ray actor);
        the caller tells the scheduler (a :meth:`post_event` handled by the loop)."""
        if worker.worker_id not in self._workers:
            raise PPipeError(f"no worker {worker.worker_id} to replace; workers are "
                             f"{sorted(self._workers)}")
        self._workers[worker.worker_id] = worker

    @property
    def workers(self) -> tuple[WorkerHandle, ...]:
        return tuple(self._workers[w] for w in sorted(self._workers))

    def worker(self, worker_id: int) -> WorkerHandle | None:
        return self._workers.get(worker_id)

    @property
    def transport(self) -> Transport:
        return self._transport

    def scheduler(self, model: str) -> Scheduler:
        """``model``'s scheduler (of the plan in force).  Its methods may be called on the
        loop thread only."""
        return self._loop.scheduler(model)

    @property
    def decision_loop(self) -> DecisionLoop:
        return self._loop

    @property
    def timers(self):
        """The loop's timers (``call_at(time_us, callback)``): thread-less timing-only workers
        run on them."""
        return self._loop

    def start(self, event_loop: asyncio.AbstractEventLoop | None = None) -> "ServingRuntime":
        """Start the workers and the loop: on a thread of its own, or, given ``event_loop``
        (call it then on that loop's thread), on that event loop."""
        if self.options.freeze_gc:  # see RuntimeOptions.freeze_gc
            gc.collect()
            gc.freeze()
        if self.options.switch_interval_s is not None:  # see RuntimeOptions.switch_interval_s
            self._saved_switch_interval_s = sys.getswitchinterval()
            sys.setswitchinterval(self.options.switch_interval_s)
        for w in self.workers:
            w.start()
        self.started_us = self._clock()
        if self.generation is not None:
            self.generation.since_us = self.started_us
        self._accepting = True
        self._started = True
        self._loop.start(event_loop)
        if self.options.replan_on_calibration is not None and self._calibration \
                and self.builder is not None:
            self._replanner = CalibrationReplanner(
                self, self.options.replan_on_calibration).start()
        self._post = self._loop.post
        self._answer_slop_us = (EVENT_LOOP_TIMER_SLOP_US if event_loop is not None
                                else THREAD_ANSWER_SLOP_US)
        return self

    @property
    def threadless(self) -> bool:
        """Whether no worker has a thread of its own (all timing-only, on the loop's timers):
        then the loop is best run on the front end's event loop."""
        return bool(self._workers) and all(getattr(w, "threadless", False)
                                           for w in self._workers.values())

    @property
    def event_loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the runtime's loop runs on (``start(event_loop)``), else ``None``."""
        return self._loop.on_event_loop

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop accepting; drop queued requests (``shutdown``); stop workers; fail batches in
        flight.  Every outstanding future is resolved when this returns.  ``timeout_s``: how
        long to wait for the loop (default ``options.stop_timeout_s``)."""
        if not self._started:
            return
        if self._replanner is not None:
            self._replanner.stop()
            self._replanner = None
        with self._submit_lock:  # no arrival can be queued behind the stop event
            self._accepting = False
            self._post(Stop())
        self._loop.join(self.options.stop_timeout_s if timeout_s is None else timeout_s)
        for w in self.workers:
            w.stop()
        self._transport.close()
        with self._inflight_lock:
            stranded, self._inflight = list(self._inflight.values()), {}
        for d in stranded:
            self._fail_requests(d, shutdown_error("batch cancelled"))
        self._started = False
        if self._saved_switch_interval_s is not None:
            sys.setswitchinterval(self._saved_switch_interval_s)
            self._saved_switch_interval_s = None

    def __enter__(self) -> "ServingRuntime":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def ready(self) -> bool:
        return self._accepting and self._loop.alive

    # ---- requests ---------------------------------------------------------------------------
    def model(self, name: str) -> ServedModel:
        return served_model(self.models, name)

    def submit(self, model: str, inputs: Mapping[str, np.ndarray] | None,
               timeout_us: float | None = None) -> Future:
        """Queue one sample for ``model``; returns a future of :class:`InferenceResult`.

        ``inputs`` maps every model input to an array of batch 1 (ignored, may be ``None``,
        for timing-only models).  ``timeout_us``: the request's deadline relative to now
        (default: the model's SLO).  Thread-safe.  Raises ``ModelNotFoundError``; rejections
        arrive on the future.
        """
        spec = self.model(model)
        pending = PendingRequest(inputs)
        with self._submit_lock:  # no arrival is queued behind the stop event
            self._admit(model, spec, pending, timeout_us)
        return pending.future

    def submit_async(self, model: str, inputs: Mapping[str, np.ndarray] | None,
                     timeout_us: float | None = None) -> asyncio.Future:
        """:meth:`submit` for a coroutine on the running event loop: an asyncio future.  When
        the runtime runs on this event loop (``start(event_loop)``) the request is answered
        on it directly; otherwise this wraps :meth:`submit`'s future."""
        aloop = self._loop.on_event_loop
        if aloop is None or not self._loop.on_loop_thread():
            return asyncio.wrap_future(self.submit(model, inputs, timeout_us))
        spec = self.model(model)
        pending = PendingRequest(inputs, aloop.create_future())
        with self._submit_lock:
            self._admit(model, spec, pending, timeout_us)
        return pending.future

    def submit_answer(self, model: str, inputs: Mapping[str, np.ndarray] | None,
                      timeout_us: float | None, answer: CallbackAnswer) -> bool:
        """:meth:`submit_async` answered through ``answer`` (a :class:`CallbackAnswer`)
        instead of a future, for a caller on the event loop the runtime runs on; returns
        ``False``, doing nothing, anywhere else (then use :meth:`submit_async`).  Raises
        ``ModelNotFoundError``; rejections arrive through ``answer``."""
        loop = self._loop
        if loop.on_event_loop is None or threading.get_ident() != loop.thread_id:
            return False
        spec = self.models.get(model)
        if spec is None:
            spec = self.model(model)  # raises ModelNotFoundError
        pending = PendingRequest(inputs, answer)
        with self._submit_lock:
            self._admit(model, spec, pending, timeout_us)
        return True

    def _admit(self, model: str, spec: ServedModel, pending: PendingRequest,
               timeout_us: float | None) -> None:
        """Queue ``pending`` for its scheduler, or answer it at once (not accepting, full).
        Called holding the submit lock."""
        if not self._accepting:
            pending.future.set_exception(RequestRejectedError(
                DropReason.SHUTDOWN.value, "server is not accepting requests (shutting down)"))
            return
        clock = self._clock
        now = time.monotonic_ns() / 1000.0 if clock is monotonic_us else clock()
        admission = self.admission
        refused = admission is not None and not admission.admit(now)
        with self._pending_lock:
            full = not refused and self._pending >= self.options.max_pending
            if not (full or refused):
                self._pending += 1
        self.stats.request(model)
        if full or refused:
            self.stats.drop(model, DropReason.QUEUE_FULL.value)
            self._resolve(pending.future, error=RequestRejectedError(
                DropReason.QUEUE_FULL.value,
                f"server overloaded: {self.options.max_pending} requests already in the system"
                if full else
                f"server overloaded: the front end is {admission.lag_us / 1000.0:.1f} ms "
                f"behind; admitting {admission.limit_rps:.0f} req/s"))
            return
        pending.counted = True
        budget = spec.slo_us if timeout_us is None else timeout_us
        pending.deadline_us = now + budget
        # The scheduler plans against a deadline that leaves room for the hand-offs it does
        # not see (dispatch, answer); the result is judged against the real one.  A late
        # dispatch (the grace) may use the margin, never the answer's own slop (on an event
        # loop a finish is heard up to EVENT_LOOP_TIMER_SLOP_US late) nor the front end's
        # lag (what the answer will wait to be written, as the request waited to be read).
        slop = self._answer_slop_us
        if admission is not None:
            slop += admission.lag_us
        planned = max(0.0, budget - self.deadline_margin_us - slop)
        self._post(Arrive(Request(next(self._ids), model, now, now + planned, pending,
                                  grace_us=max(0.0, budget - slop - planned))))

    def _answer(self, pending: PendingRequest, result: Any = None,
                error: BaseException | None = None) -> None:
        """Answer an admitted request (any thread): it stops counting as pending, and its
        future gets the outcome (once; a later outcome is ignored)."""
        if pending.counted:
            pending.counted = False
            with self._pending_lock:
                self._pending -= 1
        self._resolve(pending.future, result, error)

    def _resolve(self, fut, result: Any = None, error: BaseException | None = None) -> None:
        """Set a request's future once, from any thread: an asyncio future (of
        :meth:`submit_async`) is set on its event loop's thread."""
        if type(fut) is not Future and not self._loop.on_loop_thread():
            try:
                self._loop.on_event_loop.call_soon_threadsafe(resolve, fut, result, error)
            except RuntimeError:  # its event loop is closed: nobody waits for it any more
                pass
            return
        resolve(fut, result, error)

    # ---- calibration (see ppipe_trt.scheduler.calibration) -------------------------------------
    def _calibrators(self) -> dict[str, LatencyCalibrator]:
        """A calibrator per model of the plan in force whose workers run real compute (an
        emulated or timing-only worker takes exactly its profile) and whose scheduler plans
        from latency tables; none with ``options.calibrate`` off."""
        if not self.options.calibrate:
            return {}
        out = {}
        for name, spec in self.models.items():
            if spec.timing_only or spec.emulated:
                continue
            sched = self._loop.scheduler(name)
            if sched.calibratable:
                out[name] = LatencyCalibrator(name, sched.pipelines, self.options.calibration)
        return out

    def calibrators(self) -> dict[str, LatencyCalibrator]:
        """The calibrators of the plan in force, by model (a copy; any thread)."""
        return dict(self._calibration)

    def calibration_status(self) -> dict[str, Any]:
        """Per calibrated model: profile vs measured per stage, worker and batch size, and
        the capacity the plan has with the measured latencies (JSON-ready)."""
        return {m: c.status() for m, c in self._calibration.items()}

    def _calibrate(self, d: Dispatch, hop: int, start_us: float, finish_us: float) -> None:
        """Tell ``d``'s model's calibrator what route position ``hop`` took; a row that moved
        goes to the scheduler on the loop thread (any thread)."""
        cal = self._calibration.get(d.model)
        first = self._first_batch_id
        if cal is None or d.batch_id < first:
            return   # not measured, or a batch of an earlier plan
        res = d.route[hop]
        row = cal.observe(d.pipeline, res.stage, res.worker_id, len(d.requests),
                          finish_us - start_us)
        if row is not None:
            self._post(Recalibrated(d.model, first, d.pipeline, res.stage, row))

    def _recalibrated(self, ev: Recalibrated) -> None:
        """Loop thread: the scheduler plans with the measured row (if its plan is still in
        force)."""
        if ev.first_batch_id == self._first_batch_id and ev.model in self._calibration:
            self.scheduler(ev.model).set_stage_latency(ev.pipeline, ev.stage, ev.latency_us)

    # ---- admission (see ppipe_trt.serving.admission) ---------------------------------------
    def watch_front_end(self, event_loop: asyncio.AbstractEventLoop) -> None:
        """Admit requests under :class:`~ppipe_trt.serving.admission.AdmissionControl`, fed
        by how late a probe timer runs on ``event_loop`` (the front end's, where requests are
        read and admitted).  Call on that loop's thread after :meth:`start`; with
        ``options.admission`` off, or only emulated models (their figures are the
        simulator's), nothing."""
        if self.options.admission is None or self._front_end_loop is not None:
            return
        if all(m.timing_only or m.emulated for m in self.models.values()):
            return   # emulated workers: the data plane as the simulator runs it
        control = AdmissionControl(self.options.admission)
        every_s = control.options.probe_every_us / 1e6
        clock = self._clock

        def probe(due_s: float) -> None:
            if not self._accepting:
                return
            ran_s = event_loop.time()
            control.observe_lag(max(0.0, ran_s - due_s) * 1e6, clock())
            event_loop.call_at(ran_s + every_s, probe, ran_s + every_s)

        self.admission = control
        self._front_end_loop = event_loop
        first = event_loop.time() + every_s
        event_loop.call_at(first, probe, first)

    def replan_status(self) -> list[dict] | None:
        """The re-plans from measurements tried (None: ``replan_on_calibration`` off)."""
        return self._replanner.status() if self._replanner is not None else None

    def admission_status(self) -> dict[str, Any] | None:
        """The admission limit, the front end's lag and the refusals (None: not watched)."""
        return self.admission.status() if self.admission is not None else None

    # ---- worker sink (worker threads) -----------------------------------------------------
    def stage_finished(self, job: StageJob, start_us: float, finish_us: float) -> None:
        """A worker ran stage ``job.stage`` of its batch: the scheduler hears of it at once on
        the loop's thread (a thread-less worker's timer), through the inbox from another.
        ``start_us``: when the batch could start on the worker (its occupancy, from then to
        ``finish_us``, is what calibration measures)."""
        d = job.dispatch
        if self._calibration:
            self._calibrate(d, job.stage, start_us, finish_us)
        loop = self._loop
        if loop.on_loop_thread():
            loop.stage_finished(d.model, d.batch_id, d.route[job.stage].stage, finish_us)
        else:
            self._post(StageFinished(d.model, d.batch_id, d.route[job.stage].stage, finish_us))

    def batch_completed(self, job: StageJob, outputs: dict[str, np.ndarray],
                        finish_us: float) -> None:
        d = job.dispatch
        with self._inflight_lock:
            self._inflight.pop((d.model, d.batch_id), None)
        spec = self.models[d.model]
        # (an earlier plan's batch, below _first_batch_id, always has its whole route: plan
        # swaps need a policy that dispatches whole pipelines)
        if d.batch_id >= self._first_batch_id and \
                d.route[-1].stage < self._num_stages[(d.model, d.pipeline)] - 1:
            # A per-stage dispatch (reactive policy) ended mid-pipeline: keep each request's
            # activations for the dispatch of its next stage.  Set before stage_finished
            # reports the finish, so that dispatch always finds them.
            if not spec.timing_only:
                for i, r in enumerate(d.requests):
                    r.payload.carried = {k: v[i:i + 1] for k, v in outputs.items()}
            return
        requests, model = d.requests, d.model
        size = len(requests)
        if spec.timing_only:
            outputs = self._zero_outputs(spec, 1)
        if size == 1:  # the common case, as below without the lists
            r = requests[0]
            p = r.payload
            arrival, deadline = r.arrival_us, p.deadline_us
            self.stats.completion(model, finish_us - arrival, finish_us <= deadline)
            if p.counted:
                p.counted = False
                with self._pending_lock:
                    self._pending -= 1
            result = InferenceResult(r.request_id, model, outputs, arrival, finish_us,
                                     deadline, 1)
            fut = p.future
            if type(fut) is Future or threading.get_ident() == self._loop.thread_id:
                resolve(fut, result)
            else:
                self._resolve(fut, result)
            return
        if spec.timing_only:
            slices = [outputs] * size
        else:
            slices = [{k: v[i:i + 1] for k, v in outputs.items()} for i in range(size)]
        pendings = [r.payload for r in requests]
        arrivals = [r.arrival_us for r in requests]
        deadlines = [p.deadline_us for p in pendings]
        self.stats.completions(model, arrivals, finish_us, deadlines)
        counted = 0
        for p in pendings:
            if p.counted:
                p.counted = False
                counted += 1
        if counted:
            with self._pending_lock:
                self._pending -= counted
        here = self._loop.on_loop_thread()
        for r, p, sample, arrival, deadline in zip(requests, pendings, slices, arrivals,
                                                   deadlines):
            result = InferenceResult(r.request_id, model, sample, arrival, finish_us, deadline,
                                     size)
            fut = p.future
            if here or type(fut) is Future:
                resolve(fut, result)
            else:
                self._resolve(fut, result)

    def _zero_outputs(self, spec: ServedModel, batch: int) -> dict[str, np.ndarray]:
        """A timing-only model's outputs: zeros of its output shapes, read-only, shared."""
        key = (spec.name, batch)
        outputs = self._zeros.get(key)
        if outputs is None:
            outputs = {}
            for o in spec.outputs:
                a = np.zeros((batch,) + tuple(max(1, x) for x in o.shape[1:]), o.dtype)
                a.flags.writeable = False
                outputs[o.name] = a
            self._zeros[key] = outputs
        return outputs

    def batch_failed(self, job: StageJob, error: BaseException, now_us: float) -> None:
        d = job.dispatch
        if self.settle(d.model, d.batch_id) is None:
            return  # answered already (dropped with its failed worker, cancelled at stop)
        if isinstance(error, RequestRejectedError) and self._accepting:
            # a worker dropped a batch that could only answer late: a drop, not a failure
            for r in d.requests:
                self.stats.drop(d.model, error.reason)
                self._answer(r.payload, error=error)
            self.release_reservations(d, job.stage, now_us)
            return
        log.error("batch %d of %s failed in stage %d: %s", d.batch_id, d.model, job.stage, error)
        if not self._accepting:  # hand-offs fail while the server stops: say so
            error = shutdown_error("batch cancelled")
        elif not isinstance(error, RequestRejectedError):
            error = StageFailedError(
                f"stage {job.stage} of {d.model} failed on worker "
                f"{d.route[job.stage].worker_id} (batch of {d.batch_size}): "
                f"{type(error).__name__}: {error}")
        self._fail_requests(d, error)
        self.release_reservations(d, job.stage, now_us)

    def worker_failed(self, worker_id: int, reason: str, now_us: float) -> None:
        """A local worker quarantined itself (any thread): the loop takes it out of its
        pool."""
        self._post(WorkerQuarantined(worker_id, reason, now_us))

    def _fail_requests(self, d: Dispatch, error: BaseException) -> None:
        self.stats.failure(d.model, len(d.requests))
        for r in d.requests:
            self._answer(r.payload, error=error)

    # ---- carrying out decisions (the loop's host; loop thread) -------------------------------
    def dispatch(self, d: Dispatch, now: float) -> None:
        """Send batch ``d`` to its stage-0 worker (loop thread)."""
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
        self.stats.batch(d.model, len(d.requests))
        with self._inflight_lock:
            self._inflight[(d.model, d.batch_id)] = d
        job = StageJob(d, 0, tensors, not_before_us=d.route[0].start_us)
        try:
            self._transport.send(d.route[0].worker_id, job, now)
        except PPipeError as exc:
            self.batch_failed(job, exc, now)

    def answer_drop(self, model: str, request: Request, reason: DropReason, detail: str) -> None:
        """Tell a dropped request why (after :meth:`before_answer_drop`); counts the drop.
        Loop thread (or :meth:`stop`)."""
        reason, detail = self.before_answer_drop(model, request, reason, detail)
        reason_value = getattr(reason, "value", str(reason))
        self.stats.drop(model, reason_value)
        self._answer(request.payload, error=drop_error(request, reason_value, detail))

    def answer_refused(self, model: str, requests: list[Request], error: PPipeError) -> None:
        """The scheduler raised ``error`` on ``requests``: each gets it (loop thread)."""
        for r in requests:
            self._answer(r.payload, error=error)

    def apply_decisions(self, model: str, decisions: Decisions, now_us: float) -> None:
        """Carry out a decision pass of ``model``'s scheduler that a hook obtained (e.g. from
        ``remove_worker``): dispatches, then drops (through :meth:`on_drops`).  Loop thread."""
        self._loop.apply(model, decisions, now_us)

    def release_reservations(self, d: Dispatch, from_stage: int, now_us: float) -> None:
        """Batch ``d`` will not run its stages from route position ``from_stage`` on: they
        "finish" now, so the scheduler frees what they reserved.  Any thread."""
        for hop in d.route[from_stage:]:
            self._post(StageFinished(d.model, d.batch_id, hop.stage, now_us))

    def settle(self, model: str, batch_id: int) -> Dispatch | None:
        """Take batch ``batch_id`` of ``model`` out of the in-flight table and return it, or
        ``None`` if it was settled already (answered, failed, cancelled).  Whoever gets it
        answers its requests.  Any thread."""
        with self._inflight_lock:
            return self._inflight.pop((model, batch_id), None)

    def settle_requests(self, model: str, request_ids: set[int]) -> None:
        """Take every in-flight batch of ``model`` holding one of ``request_ids`` out of the
        in-flight table (their requests are being answered elsewhere; a late report of the
        batch then changes nothing).  Any thread."""
        with self._inflight_lock:
            for key in [k for k, d in self._inflight.items() if d.model == model
                        and any(r.request_id in request_ids for r in d.requests)]:
                del self._inflight[key]

    def post_event(self, event: LoopEvent) -> None:
        """Queue ``event`` for the loop (any thread); events the loop does not know go to
        :meth:`on_cluster_event`."""
        self._post(event)

    # ---- hooks (override in a subclass; loop thread) -------------------------------------------
    def on_cluster_event(self, event: LoopEvent, now_us: float) -> None:
        """Handle an event posted with :meth:`post_event` that is none of the loop's own
        (:class:`~ppipe_trt.serving.events.Arrive`, ``StageFinished``, ``Stop``): e.g. a
        worker declared down.  Called on the loop thread, in inbox order; an exception is
        logged and the loop goes on.  The base runtime handles
        :class:`~ppipe_trt.serving.faults.WorkerQuarantined` (a subclass passes the events
        it does not know to this method)."""
        if type(event) is WorkerQuarantined:
            self._remove_quarantined(event, now_us)
            return
        if type(event) is SwapPlan:
            self._switch(event.prepared, now_us)
            return
        if type(event) is Recalibrated:
            self._recalibrated(event)
            return
        raise PPipeError(f"no handler for loop event {event!r}")

    def on_drops(self, model: str, drops: list[Drop], now_us: float) -> list[Drop]:
        """Called with the drops of each decision pass of ``model``'s scheduler, after the
        pass's dispatches were sent and before any drop is answered; returns the drops to
        answer.  A runtime that can still serve some of them (re-dispatch after a worker
        failure) takes those out, and must then answer them itself.  Default: all; the
        batches of ``worker_failed`` drops are settled first (a later report of them, e.g.
        a hand-off refused by the quarantined worker, changes nothing)."""
        failed = {dr.request.request_id for dr in drops
                  if dr.reason == DropReason.WORKER_FAILED}
        if failed:
            self.settle_requests(model, failed)
        return drops

    def before_answer_drop(self, model: str, request: Request, reason: DropReason,
                           detail: str) -> tuple[DropReason, str]:
        """Called just before ``request`` is told it was dropped, whatever dropped it (a
        decision pass, the drain at stop, a subclass); returns the reason and detail to tell.
        Loop thread, or the thread calling :meth:`stop`.  Default: unchanged."""
        return reason, detail

    def _remove_quarantined(self, ev: WorkerQuarantined, now: float) -> None:
        """Take a quarantined worker out of its scheduler's pool (loop thread): the batches
        still reserved on it are dropped (``worker_failed``); when it was the last worker of
        a stage, the model's requests are answered ``no_workers`` from now on."""
        w = self.worker(ev.worker_id)
        if w is None or any(r.worker_id == ev.worker_id for r in self.quarantined):
            return
        model = w.info.model
        self.quarantined.append(QuarantineRecord(ev.worker_id, model, w.info.stage, ev.reason,
                                                 ev.detected_us, now))
        self.remove_from_pools(model, ev.worker_id, now)

    def remove_from_pools(self, model: str, worker_id: int, now: float) -> None:
        """Take ``worker_id`` out of the pool of every plan that has it (the plan in force,
        and an earlier one still draining after a swap) and carry out what that decides:
        its reserved batches dropped ``worker_failed``.  Loop thread."""
        for sched in self._loop.schedulers_of_worker(model, worker_id):
            dec = sched.remove_worker(worker_id, now)
            if sched is self.scheduler(model):
                self.apply_decisions(model, dec, now)
            else:   # an earlier plan's, still draining
                self._loop.apply_old(model, dec, now)

    # ---- plan swap (see ppipe_trt.serving.swap) ------------------------------------------------
    def prepare_swap(self, plan: Plan, reason: str = "operator") -> PreparedSwap:
        """Build what switching to ``plan`` needs and start its added workers (any thread
        but the loop's; seconds for real engines).  Raises :class:`PlanSwapError`."""
        if not self._started:
            raise PlanSwapError("the runtime is not running; start it with the plan instead")
        return prepare_swap(self, plan, reason)

    def swap(self, prepared: PreparedSwap) -> Future:
        """Switch to ``prepared`` on the loop thread; a future of :class:`SwapReport` (or
        the error; then the added workers are stopped)."""
        self._post(SwapPlan(prepared))
        return prepared.future

    def swap_plan(self, plan: Plan, reason: str = "operator",
                  timeout_s: float = 60.0) -> SwapReport:
        """:meth:`prepare_swap` then :meth:`swap`, waiting for the switch (not on the loop
        thread).  One swap at a time."""
        import time as _time

        asked = _time.perf_counter()
        with self._swap_lock:
            prepared = self.prepare_swap(plan, reason)
            prepared.asked_at = asked
            return self.swap(prepared).result(timeout_s)

    def _switch(self, prepared: PreparedSwap, now: float) -> None:
        try:
            report = apply_swap(self, prepared, now)
        except BaseException as exc:  # the plan in force stays; its added workers go
            log.error("plan swap refused: %s", exc)
            for w in prepared.workers:
                w.stop(0.0)
            prepared.future.set_exception(exc)
            return
        prepared.future.set_result(report)

    def plan_switched(self, plan: Plan, first_batch_id: int) -> None:
        """The loop now schedules ``plan`` (loop thread; called by the swap)."""
        self.plan = plan
        self._num_stages = {(m.model, i): len(p.stages)
                            for m in plan.models for i, p in enumerate(m.pipelines)}
        self._first_batch_id = first_batch_id
        self._calibration = self._calibrators()

    def old_plans_drained(self, now_us: float) -> None:
        """Hook of the loop: the earlier plans' batches are finished; retire their workers."""
        retire_drained(self, now_us)

    # ---- introspection ---------------------------------------------------------------------
    def now_us(self) -> float:
        """The runtime clock (microseconds)."""
        return self._clock()

    def worker_stats(self) -> list[WorkerStats]:
        return [w.stats() for w in self.workers]

    def status(self) -> dict[str, Any]:
        """The plan in force, the workers and how they run (JSON-ready)."""
        return runtime_status(self)
