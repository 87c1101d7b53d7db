"""The runtime loop: what drives the schedulers on the wall clock, on one thread.

It runs either on a thread of its own (:meth:`DecisionLoop.start` without an event loop: a
library user's runtime, the Ray runtime) or on the front end's asyncio event loop
(``start(event_loop)``, what ``ppipe serve`` does for thread-less workers).  On its own
thread it sleeps until the earliest of (next wake-up any scheduler asked for, next timer, next
event in its inbox), never spinning.  Timers (:meth:`DecisionLoop.call_at`) drive the
thread-less timing-only workers (:mod:`ppipe_trt.serving.timed_worker`): an emulated batch is
a timer, not a sleeping thread, so a 100-GPU emulation costs one thread, not a hundred (their
compiled form, ``ppipe_trt._native.timed``, keeps its batches on one heap of its own that the
loop drains with its timers: :meth:`DecisionLoop.timed_pool`).  Events
(:mod:`ppipe_trt.serving.events`) are posted from any thread:
arrivals (``submit``), stage finishes (workers), cluster events (the Ray runtime).  Each is
given to its model's scheduler, and the scheduler's decisions are carried out at once by the
loop's :class:`LoopHost` (the runtime): a dispatch is sent to its stage-0 worker, a drop is
answered.  The loop never touches a request's payload; the host does.

On the event loop the same work is done in callbacks: the events posted during one turn of
the event loop are handled together in one callback (one decision pass per model for a burst
of arrivals), and one event-loop timer stands for the earliest of the timers and wake-ups.  A
request then never crosses a thread between the front end and its answer: no inbox wake-up,
no GIL hand-over, no thread-safe future per answer.  Event-loop timers have millisecond
resolution (libuv's, epoll's) and run on a 1 ms grid: a timer runs up to ~2 ms after its
time, never before; the schedulers wake that much earlier, and workers report how late they
noticed a start (``start_lag``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import queue
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Protocol

from ppipe_trt.errors import PPipeError, SchedulerError
from ppipe_trt.scheduler.interface import Decisions, Dispatch, Drop, DropReason, Request, Scheduler
from ppipe_trt.serving.events import Arrive, CallAt, LoopEvent, StageFinished, Stop
from ppipe_trt.serving.options import RuntimeOptions

log = logging.getLogger("ppipe.serving")

#: How late an event-loop timer may run (the millisecond grid below, plus epoll's and libuv's
#: millisecond); on an event loop the schedulers wake this much earlier than their
#: ``wake_lead_us`` says.
EVENT_LOOP_TIMER_SLOP_US = 2000.0
#: On an event loop, timers are run on this grid (microseconds of the runtime clock).
EVENT_LOOP_TICK_US = 1000.0


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

    def old_plans_drained(self, now_us: float) -> None:
        """The batches of earlier plans (before a plan swap) are all finished."""


class DecisionLoop:
    """Owns the schedulers, the inbox and the wake-up times; runs on its own thread or on an
    asyncio event loop (see :meth:`start`).

    ``schedulers``: by model; ``models``: the served models (those with a wake-up);
    ``clock``: microseconds.  :meth:`post` (any thread) queues an event.
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
        #: The loop's thread (``threading.get_ident()``), once started (read on hot paths).
        self.thread_id: int | None = None
        self._old: list[tuple[int, dict[str, Scheduler]]] = []  # earlier plans draining
        self._first_batch_id = 0   # batches with lower ids belong to an earlier plan
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        # the compiled timing-only workers' pool (its own timer heap), made on first use,
        # and the compiled router its stage finishes take first (see timed_pool)
        self._pool = None
        self._router = None
        self._stop_timeout_s = options.stop_timeout_s
        # event-loop mode (start(event_loop)): the loop, whether a flush is scheduled, the
        # event-loop timer standing for the earliest timer or wake-up, and when it is due
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._flush_pending = False
        self._timer_handle: asyncio.Handle | None = None
        self._armed_us = math.inf
        self._in_turn = False
        self._stopping = False
        self._ended = threading.Event()
        self._over = False  # _ended is set (a plain read for the hot paths)
        self._started = False
        #: Queue an event for the loop (thread-safe).  On a thread of its own: the inbox's own
        #: ``put``, no wrapper; on an event loop, see :meth:`_post_on_event_loop`.
        self.post: Callable[[LoopEvent], None] = self._inbox.put

    def call_at(self, time_us: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the loop thread once the clock reaches ``time_us`` (callbacks
        due at the same time run in the order they were set).  Any thread may call it."""
        if threading.get_ident() == self.thread_id:
            heapq.heappush(self._timers, (time_us, next(self._timer_seq), callback))
            if self._aloop is not None and not self._in_turn and time_us < self._armed_us:
                self._arm()  # set outside a turn (which re-arms when it ends)
        else:
            self.post(CallAt(time_us, callback))

    def timed_pool(self, make: Callable[[], Any]) -> Any:
        """The loop's pool of compiled timing-only workers (``ppipe_trt._native.timed.
        TimedPool``), made with ``make`` on first use: their batches' finishes are one heap
        the loop drains with its own timers (``run_due``, ``next_due_us``)."""
        if self._pool is None:
            self._pool = make()
            # A finish that needs no decision pass is told to its (compiled) scheduler by
            # the router in C, as stage_finished would tell it; the rest come here.
            from ppipe_trt.scheduler.native import finish_router

            self._router = finish_router(self._schedulers, self._wake)
            if self._router is not None:
                self._router.first_batch_id = self._first_batch_id
                self._router.stopping = self._stopping
                self._pool.set_fast_finish(self._router.finish)
        return self._pool

    def _next_due(self) -> float:
        """The earliest timer, of the loop's own and the pool's (inf: none)."""
        due = self._timers[0][0] if self._timers else math.inf
        if self._pool is not None:
            p = self._pool.next_due_us()
            if p < due:
                due = p
        return due

    def scheduler(self, model: str) -> Scheduler:
        return self._schedulers[model]

    # ---- plan swap (loop thread; see ppipe_trt.serving.swap) ---------------------------------
    def swap_schedulers(self, schedulers: Mapping[str, Scheduler], first_batch_id: int) -> None:
        """From now on arrivals go to ``schedulers``; finishes of batches with ids below
        ``first_batch_id`` still go to the schedulers they came from."""
        schedulers = dict(schedulers)
        if self._aloop is not None:
            for sched in schedulers.values():
                if hasattr(sched, "wake_lead_us"):  # see EVENT_LOOP_TIMER_SLOP_US
                    sched.wake_lead_us += EVENT_LOOP_TIMER_SLOP_US
        self._old.append((self._first_batch_id, self._schedulers))
        self._schedulers = schedulers
        self._first_batch_id = first_batch_id
        for m in self._wake:
            self._wake[m] = None
        if self._router is not None:
            self._router.schedulers = schedulers
            self._router.first_batch_id = first_batch_id

    def old_batches_in_flight(self) -> int:
        """Batches of earlier plans not finished yet."""
        return sum(s.batches_in_flight for _, scheds in self._old for s in scheds.values())

    def forget_old_schedulers(self) -> None:
        """Drop the earlier plans' schedulers (all their batches finished)."""
        self._old = []

    def reserved_until(self, model: str, worker_id: int) -> float:
        """Until when ``worker_id`` is reserved by any plan's scheduler of ``model`` still
        holding batches (0 if none has it)."""
        until = 0.0
        for scheds in [self._schedulers] + [s for _, s in self._old]:
            sched = scheds.get(model)
            if sched is not None:
                try:
                    until = max(until, sched.reserved_until(worker_id))
                except SchedulerError:   # not one of that plan's workers
                    pass
        return until

    def schedulers_of_worker(self, model: str, worker_id: int) -> list[Scheduler]:
        """The schedulers (current plan first, then earlier ones) that know ``worker_id``."""
        out = []
        for scheds in [self._schedulers] + [s for _, s in self._old]:
            sched = scheds.get(model)
            if sched is not None:
                try:
                    sched.reserved_until(worker_id)
                except SchedulerError:
                    continue
                out.append(sched)
        return out

    # ---- life cycle ---------------------------------------------------------------------------
    def start(self, event_loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start on a thread of its own, or, given ``event_loop``, on that event loop (then
        call it on the event loop's thread, e.g. from a coroutine running on it)."""
        self._started = True
        if event_loop is None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name="ppipe-runtime")
            self._thread.start()
            self.thread_id = self._thread.ident
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not event_loop:
            raise PPipeError("DecisionLoop.start(event_loop) must be called on that event "
                             "loop's thread, while it runs")
        self._aloop = event_loop
        self.thread_id = threading.get_ident()
        for sched in self._schedulers.values():
            if hasattr(sched, "wake_lead_us"):  # see EVENT_LOOP_TIMER_SLOP_US
                sched.wake_lead_us += EVENT_LOOP_TIMER_SLOP_US
        self.post = self._post_on_event_loop
        self._flush_pending = True  # events posted before start
        event_loop.call_soon(self._flush)

    def join(self, timeout_s: float) -> None:
        """Wait (up to ``timeout_s``) for the loop to end (after a :class:`Stop` was posted).
        On an event loop, called on its thread: the loop handles what is queued (the Stop
        included) at once, here."""
        if self._aloop is not None:
            if threading.get_ident() == self.thread_id:
                if not self._ended.is_set():
                    self._flush()
            else:
                self._ended.wait(timeout_s)
            return
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._thread = None

    @property
    def alive(self) -> bool:
        if self._aloop is not None:
            return self._started and not self._ended.is_set()
        return self._thread is not None and self._thread.is_alive()

    @property
    def on_event_loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the loop runs on, or ``None`` (a thread of its own)."""
        return self._aloop

    def on_loop_thread(self) -> bool:
        """Whether the caller runs on the loop's thread."""
        return threading.get_ident() == self.thread_id

    # ---- on an event loop -------------------------------------------------------------------
    def _post_on_event_loop(self, event: LoopEvent) -> None:
        """Queue ``event``; the first event of a turn of the event loop schedules one flush
        (from another thread: thread-safely), the rest ride on it."""
        self._inbox.put(event)
        if self._flush_pending or self._over:
            return
        self._flush_pending = True
        if threading.get_ident() == self.thread_id:
            self._aloop.call_soon(self._flush)
        else:
            try:
                self._aloop.call_soon_threadsafe(self._flush)
            except RuntimeError:  # the event loop is closed: nothing will run any more
                pass

    def _flush(self) -> None:
        """Handle every queued event, the due wake-ups and timers; re-arm the timer."""
        self._flush_pending = False  # before draining: a post from now on flushes again
        if self._over:
            return
        inbox = self._inbox
        events = []
        while not inbox.empty():  # (this thread alone takes from the inbox)
            events.append(inbox.get_nowait())
        self._turn(events)

    def _on_timer(self) -> None:
        self._timer_handle = None
        self._armed_us = math.inf
        if not self._over:
            self._turn([])

    def _turn(self, events: list[LoopEvent]) -> None:
        """Handle ``events``, the due wake-ups and timers, then what those posted (a stage
        finish a timer reported) in the same turn; re-arm the timer."""
        self._in_turn = True
        self._flush_pending = True  # what is posted meanwhile is handled in this turn
        inbox = self._inbox
        pool = self._pool
        if events and pool is not None and pool.next_due_us() <= self._clock():
            # finishes heard late by design (see _arm) before what came after them
            self._run_timers(self._clock())
        try:
            while True:
                try:
                    if not self._process(events):
                        self._end()
                        return
                except Exception:  # keep serving; the deadline guard answers the rest
                    log.exception("runtime loop: unexpected error while handling %d events",
                                  len(events))
                self._run_timers(self._clock())
                if inbox.empty():
                    break
                events = []
                while not inbox.empty():
                    events.append(inbox.get_nowait())
        finally:
            self._in_turn = False
            self._flush_pending = False
        if not inbox.empty() and not self._over:  # posted by another thread
            self._flush_pending = True                         # after the last look
            self._aloop.call_soon(self._flush)
        self._arm()

    def _arm(self) -> None:
        """Keep one event-loop timer at the earliest timer or wake-up.  Event-loop timers run
        up to ~1 ms late (epoll's millisecond) and, on uvloop, up to ~0.5 ms early (libuv
        rounds the delay); one that ran early finds nothing due and is set again for at least
        a millisecond, so a timer never runs before its time and the loop never spins."""
        due = self._timers[0][0] if self._timers else math.inf  # _next_due, inline
        for wake in self._wake.values():
            if wake is not None and wake < due:
                due = wake
        pool = self._pool
        if pool is not None and pool.next_due_us() < due:
            # The pool's finishes: those a later stage follows are heard at the latest when
            # that stage could first finish, unless a scheduler holds requests (it may act
            # on a finish) -- until then they ride on the wake-ups that come anyway (a turn
            # runs what is due before its events).  The emulated GPUs' timelines do not
            # depend on when a finish is heard.
            quiet = not self._old
            if quiet:
                for sched in self._schedulers.values():
                    if getattr(sched, "queue_length", 1):
                        quiet = False
                        break
            p = pool.next_wake_us() if quiet else pool.next_due_us()
            if p < due:
                due = p
        if due >= self._armed_us:
            return  # already armed at or before it (an early spare wake-up is harmless)
        if self._timer_handle is not None:
            self._timer_handle.cancel()
        if due == math.inf:
            self._timer_handle, self._armed_us = None, math.inf
            return
        # On the millisecond grid: everything due within one millisecond is handled in one
        # wake-up of the event loop (a timing-only worker's emulated GPU keeps its own
        # timeline, so this delays when it is told, not what it emulates).
        due = math.ceil(due / EVENT_LOOP_TICK_US) * EVENT_LOOP_TICK_US
        delay_us = due - self._clock()
        self._armed_us = due
        if delay_us <= 0.0:
            self._timer_handle = self._aloop.call_soon(self._on_timer)
        else:
            # A whole number of milliseconds, rounded up: libuv (uvloop) rounds a delay to
            # the nearest millisecond, so 1.4 ms would fire 0.4 ms early and 0.4 ms at once
            # (half of all wake-ups were such spare ones, measured at 2,300 req/s).  At least
            # 1 ms: one that still ran early (libuv's clock lags) is not set at once again.
            delay_s = math.ceil(delay_us / 1000.0) / 1000.0
            self._timer_handle = self._aloop.call_later(delay_s, self._on_timer)

    def _end(self) -> None:
        if self._timer_handle is not None:
            self._timer_handle.cancel()
            self._timer_handle = None
        self._over = True
        self._ended.set()

    # ---- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        self.thread_id = threading.get_ident()
        while True:
            wakes = [t for t in self._wake.values() if t is not None]
            due = self._next_due()
            if due != math.inf:
                wakes.append(due)
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
        """Run the timers due by ``now`` (callbacks may set new ones, run in turn if due):
        the loop's own, and the compiled timing-only workers' (their pool's heap; at equal
        times the pool's first)."""
        timers = self._timers
        pool = self._pool
        if pool is not None:
            # the thread-less emulation's case: only the pool's heap has timers
            while not timers:
                try:
                    pool.drain(now)
                    break
                except Exception:  # that batch is gone from the heap; the rest run now
                    log.exception("runtime loop: timer callback failed")
            if not timers:
                return
        while True:
            ran = False
            if pool is not None:
                limit = timers[0][0] if timers and timers[0][0] < now else now
                try:
                    ran = pool.run_due(limit) > 0
                except Exception:
                    ran = True
                    log.exception("runtime loop: timer callback failed")
            if timers and timers[0][0] <= now:
                _, _, callback = heapq.heappop(timers)
                try:
                    callback()
                except Exception:
                    log.exception("runtime loop: timer callback failed")
                ran = True
            if not ran:
                return
            if self._next_due() > now:
                now = self._clock()

    def _process(self, events: list[LoopEvent]) -> bool:
        """Handle ``events`` in order, then the wake-ups that are due; False after Stop."""
        i, n = 0, len(events)
        clock = self._clock
        while i < n:
            ev = events[i]
            now = clock()
            kind = type(ev)
            if kind is Arrive:
                # A burst that queued up meanwhile goes to its scheduler in one call (one
                # decision pass): the loop then holds the GIL for microseconds per request,
                # not a decision pass each, and the workers it dispatched to start on time.
                model = ev.request.model
                j = i + 1
                while j < n and type(events[j]) is Arrive and events[j].request.model == model:
                    j += 1
                requests = [ev.request] if j == i + 1 else [e.request for e in events[i:j]]
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
                self._stage_finished(ev.model, ev.batch_id, ev.stage, ev.finish_us, now)
            elif kind is CallAt:
                heapq.heappush(self._timers, (ev.time_us, next(self._timer_seq), ev.callback))
            elif kind is Stop:
                self._stopping = True
                if self._router is not None:
                    self._router.stopping = True
                self._drain(now)
                self._finish_timers()
                return False
            else:
                try:
                    self._host.on_cluster_event(ev, now)
                except Exception:
                    log.exception("runtime loop: %s failed", type(ev).__name__)
        now = self._clock()
        for model, wake in self._wake.items():  # apply() sets values of existing keys only
            if wake is not None and wake <= now:
                self._wake[model] = None
                self.apply(model, self._schedulers[model].on_wake(now), now)
        return True

    def stage_finished(self, model: str, batch_id: int, stage: int, finish_us: float) -> None:
        """A stage finish reported on the loop's thread (a thread-less worker's timer): the
        scheduler hears of it at once, as if it came through the inbox.  After the loop's
        Stop it is dropped, as a posted one would be."""
        if self._stopping:
            return
        now = self._clock()
        if batch_id < self._first_batch_id:
            self._old_stage_finished(model, batch_id, stage, finish_us, now)
            return
        try:  # _stage_finished, inline: the thread-less workers' every stage comes here
            decisions = self._schedulers[model].on_stage_finished(batch_id, stage, finish_us,
                                                                  now)
        except SchedulerError as exc:
            log.warning("ignored stage finish: %s", exc)
            return
        if decisions.dispatches or decisions.drops:
            self.apply(model, decisions, now)
        else:
            self._wake[model] = decisions.wake_at_us

    def _stage_finished(self, model: str, batch_id: int, stage: int, finish_us: float,
                        now: float) -> None:
        if batch_id < self._first_batch_id:
            self._old_stage_finished(model, batch_id, stage, finish_us, now)
            return
        try:
            decisions = self._schedulers[model].on_stage_finished(batch_id, stage, finish_us,
                                                                  now)
        except SchedulerError as exc:  # e.g. a batch the scheduler already dropped
            log.warning("ignored stage finish: %s", exc)
            return
        self.apply(model, decisions, now)

    def _old_stage_finished(self, model: str, batch_id: int, stage: int, finish_us: float,
                            now: float) -> None:
        """A batch of an earlier plan: its scheduler hears of it (its decisions can only be
        late dispatches or drops; it has no queue and wants no wake-up); when the earlier
        plans have nothing left in flight, the host retires their workers."""
        for first, scheds in reversed(self._old):
            if batch_id >= first:
                sched = scheds.get(model)
                break
        else:
            sched = None
        if sched is None:
            log.warning("ignored stage finish of batch %d of %s: no plan has it", batch_id,
                        model)
            return
        try:
            dec = sched.on_stage_finished(batch_id, stage, finish_us, now)
        except SchedulerError as exc:
            log.warning("ignored stage finish: %s", exc)
            return
        self.apply_old(model, dec, now)

    def apply_old(self, model: str, dec: Decisions, now: float) -> None:
        """Carry out decisions of an earlier plan's scheduler (no wake-up: it has no queue);
        tell the host when the earlier plans have nothing left in flight."""
        for d in dec.dispatches:
            self._host.dispatch(d, now)
        for drop in self._host.on_drops(model, dec.drops, now) if dec.drops else ():
            self._host.answer_drop(model, drop.request, drop.reason, drop.detail)
        if self._old and not self.old_batches_in_flight():
            self._host.old_plans_drained(now)

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
        if decisions.dispatches and len(drops) > self._yield_min_drops \
                and self._aloop is None:
            time.sleep(self._yield_s)  # see RuntimeOptions.loop_yield_s (own thread only)
        for drop in host.on_drops(model, drops, now):
            host.answer_drop(model, drop.request, drop.reason, drop.detail)

    def _finish_timers(self) -> None:
        """At stop: let the batches held on timers (timing-only workers) finish and be
        answered, for at most half the stop timeout; what is left then is failed by the
        runtime as cancelled."""
        deadline = self._clock() + self._stop_timeout_s * 0.5e6
        while True:
            nxt = self._next_due()
            if nxt == math.inf:
                return
            now = self._clock()
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
