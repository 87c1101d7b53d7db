"""The runtime loop: the one thread that drives the schedulers on the wall clock.

It sleeps until the earliest of (next wake-up any scheduler asked for, next timer, next
event in its inbox), never spinning.  Timers (:meth:`DecisionLoop.call_at`) drive the
thread-less timing-only workers (:mod:`ppipe_trt.serving.timed_worker`): an emulated batch is
a timer, not a sleeping thread, so a 100-GPU emulation costs one thread, not a hundred.  Events (:mod:`ppipe_trt.serving.events`) are posted from any thread:
arrivals (``submit``), stage finishes (workers), cluster events (the Ray runtime).  Each is
given to its model's scheduler, and the scheduler's decisions are carried out at once by the
loop's :class:`LoopHost` (the runtime): a dispatch is sent to its stage-0 worker, a drop is
answered.  The loop never touches a request's payload; the host does.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from typing import Callable, Iterable, Mapping, Protocol

from ppipe_trt.errors import PPipeError, SchedulerError
from ppipe_trt.scheduler.interface import Decisions, Dispatch, Drop, DropReason, Request, Scheduler
from ppipe_trt.serving.events import Arrive, CallAt, LoopEvent, StageFinished, Stop
from ppipe_trt.serving.options import RuntimeOptions

log = logging.getLogger("ppipe.serving")


class LoopHost(Protocol):
    """What the loop asks of the runtime it runs for.  Called on the loop thread only."""

    def dispatch(self, d: Dispatch, now_us: float) -> None:
        """Send batch ``d`` to its stage-0 worker."""

    def on_drops(self, model: str, drops: list[Drop], now_us: float) -> list[Drop]:
        """The drops of one decision pass (after its dispatches); returns those to answer."""

    def answer_drop(self, model: str, request: Request, reason: DropReason,
                    detail: str) -> None:
        """Tell a dropped request why."""

    def answer_refused(self, model: str, requests: list[Request], error: PPipeError) -> None:
        """The scheduler refused ``requests`` (it raised ``error``)."""

    def on_cluster_event(self, event: LoopEvent, now_us: float) -> None:
        """An event the loop does not handle itself."""


class DecisionLoop:
    """Owns the schedulers, the inbox and the wake-up times; runs on its own thread.

    ``schedulers``: by model; ``models``: the served models (those with a wake-up);
    ``clock``: microseconds.  :attr:`post` (any thread) queues an event.
    """

    def __init__(self, schedulers: Mapping[str, Scheduler], models: Iterable[str],
                 host: LoopHost, clock: Callable[[], float], options: RuntimeOptions):
        self._schedulers = dict(schedulers)
        self._host = host
        self._clock = clock
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake: dict[str, float | None] = {m: None for m in models}
        self._yield_s = options.loop_yield_s
        self._yield_min_drops = options.loop_yield_min_drops
        self._thread: threading.Thread | None = None
        self._thread_id: int | None = None
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._stop_timeout_s = options.stop_timeout_s
        #: Queue an event for the loop (thread-safe; the inbox's own ``put``, no wrapper).
        self.post: Callable[[LoopEvent], None] = self._inbox.put

    def call_at(self, time_us: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the loop thread once the clock reaches ``time_us`` (callbacks
        due at the same time run in the order they were set).  Any thread may call it."""
        if threading.get_ident() == self._thread_id:
            heapq.heappush(self._timers, (time_us, next(self._timer_seq), callback))
        else:
            self.post(CallAt(time_us, callback))

    def scheduler(self, model: str) -> Scheduler:
        return self._schedulers[model]

    # ---- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="ppipe-runtime")
        self._thread.start()
        self._thread_id = self._thread.ident

    def join(self, timeout_s: float) -> None:
        """Wait (up to ``timeout_s``) for the loop to end (after a :class:`Stop` was posted)."""
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        self._thread_id = threading.get_ident()
        while True:
            wakes = [t for t in self._wake.values() if t is not None]
            if self._timers:
                wakes.append(self._timers[0][0])
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
            self._run_timers(self._clock())

    def _run_timers(self, now: float) -> None:
        """Run the timers due by ``now`` (callbacks may set new ones, run in turn if due)."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, callback = heapq.heappop(timers)
            try:
                callback()
            except Exception:
                log.exception("runtime loop: timer callback failed")
            if not timers or timers[0][0] > now:
                now = self._clock()

    def _process(self, events: list[LoopEvent]) -> bool:
        """Handle ``events`` in order, then the wake-ups that are due; False after Stop."""
        i, n = 0, len(events)
        while i < n:
            ev = events[i]
            now = self._clock()
            kind = type(ev)
            if kind is Arrive:
                # A burst that queued up meanwhile goes to its scheduler in one call (one
                # decision pass): the loop then holds the GIL for microseconds per request,
                # not a decision pass each, and the workers it dispatched to start on time.
                model = ev.request.model
                j = i + 1
                while j < n and type(events[j]) is Arrive and events[j].request.model == model:
                    j += 1
                requests = [e.request for e in events[i:j]]
                i = j
                try:
                    decisions = self._schedulers[model].on_arrivals(requests, now)
                except PPipeError as exc:
                    log.error("scheduler refused %d request(s) of %s: %s", len(requests),
                              model, exc)
                    self._host.answer_refused(model, requests, exc)
                    continue
                self.apply(model, decisions, now)
                continue
            i += 1
            if kind is StageFinished:
                try:
                    decisions = self._schedulers[ev.model].on_stage_finished(
                        ev.batch_id, ev.stage, ev.finish_us, now)
                except SchedulerError as exc:  # e.g. a batch the scheduler already dropped
                    log.warning("ignored stage finish: %s", exc)
                    continue
                self.apply(ev.model, decisions, now)
            elif kind is CallAt:
                heapq.heappush(self._timers, (ev.time_us, next(self._timer_seq), ev.callback))
            elif kind is Stop:
                self._drain(now)
                self._finish_timers()
                return False
            else:
                try:
                    self._host.on_cluster_event(ev, now)
                except Exception:
                    log.exception("runtime loop: %s failed", type(ev).__name__)
        now = self._clock()
        for model, wake in list(self._wake.items()):
            if wake is not None and wake <= now:
                self._wake[model] = None
                self.apply(model, self._schedulers[model].on_wake(now), now)
        return True

    def apply(self, model: str, decisions: Decisions, now: float) -> None:
        """Carry out one decision pass of ``model``'s scheduler (loop thread only)."""
        self._wake[model] = decisions.wake_at_us
        # dispatches first: their workers wait on reserved start times, the dropped
        # requests' clients only on their answers
        host = self._host
        for d in decisions.dispatches:
            host.dispatch(d, now)
        drops = decisions.drops
        if not drops:
            return
        if decisions.dispatches and len(drops) > self._yield_min_drops:
            time.sleep(self._yield_s)  # see RuntimeOptions.loop_yield_s
        for drop in host.on_drops(model, drops, now):
            host.answer_drop(model, drop.request, drop.reason, drop.detail)

    def _finish_timers(self) -> None:
        """At stop: let the batches held on timers (timing-only workers) finish and be
        answered, for at most half the stop timeout; what is left then is failed by the
        runtime as cancelled."""
        deadline = self._clock() + self._stop_timeout_s * 0.5e6
        while self._timers:
            now = self._clock()
            nxt = self._timers[0][0]
            if nxt > deadline:
                return
            if nxt > now:
                time.sleep((nxt - now) / 1e6)
            self._run_timers(self._clock())

    def _drain(self, now: float) -> None:
        """At stop: every scheduler drops what it holds; arrivals still queued never reached
        one.  Both are answered ``shutdown``."""
        for model, sched in self._schedulers.items():
            for drop in sched.drain(now).drops:
                self._host.answer_drop(model, drop.request, DropReason.SHUTDOWN,
                                       drop.detail or "server shutting down")
        try:
            while True:
                ev = self._inbox.get_nowait()
                if type(ev) is Arrive:
                    self._host.answer_drop(ev.request.model, ev.request, DropReason.SHUTDOWN,
                                           "server shutting down")
        except queue.Empty:
            pass
