"""The runtime loop on an asyncio event loop (``start(event_loop)``, what ``ppipe serve``
does for timing-only plans): the same worker rules, timers never early, arrivals of one turn
decided together, answers on asyncio futures, and a clean stop from either thread."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from ppipe_trt.scheduler.placement import WorkerSlot
from ppipe_trt.serving.clock import monotonic_us
from ppipe_trt.serving.emulation import EmulatedTiming
from ppipe_trt.serving.events import Stop
from ppipe_trt.serving.loop import DecisionLoop
from ppipe_trt.serving.options import RuntimeOptions
from ppipe_trt.serving.timed_worker import TimedWorker
from ppipe_trt.serving.transport import InProcessTransport
from tests.serving.test_serving_transport_worker import _Sink, _send_three_out_of_order_and_check


class _EventLoopThread:
    """An asyncio event loop running in a thread of its own (as uvicorn's would)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self.loop = loop or asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def call(self, fn, timeout=10):
        """Run ``fn()`` on the event loop's thread; its result."""
        async def run():
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def test_timed_worker_rules_hold_on_an_event_loop():
    """Out-of-order jobs run by reserved start, never early, each held for its emulated
    latency, with the loop's timers on an event loop (sent from another thread)."""
    with _EventLoopThread() as ev:
        loop = DecisionLoop({}, [], host=None, clock=monotonic_us, options=RuntimeOptions())
        ev.call(lambda: loop.start(ev.loop))
        assert loop.on_event_loop is ev.loop and loop.alive
        timing = EmulatedTiming("m", "T4", 1, 0, 0, (2_000.0,))
        transport, sink = InProcessTransport(), _Sink()
        worker = TimedWorker(WorkerSlot(0, "m", 0, 0, "T4"), timing, transport, sink, loop)
        worker.start()
        _send_three_out_of_order_and_check(transport, sink, worker)
        loop.post(Stop())
        loop.join(5)  # from another thread: waits for the event loop to handle the Stop
        assert not loop.alive


def test_event_loop_timers_never_run_early_and_run_in_order():
    with _EventLoopThread() as ev:
        loop = DecisionLoop({}, [], host=None, clock=monotonic_us, options=RuntimeOptions())
        ev.call(lambda: loop.start(ev.loop))
        ran: list[tuple[int, float, float]] = []
        done = threading.Event()
        base = monotonic_us()
        dues = [base + d for d in (7_300.0, 300.0, 2_050.0, 2_050.0, 12_000.0, 950.0)]

        def set_all():
            for i, due in enumerate(dues):
                loop.call_at(due, lambda i=i, due=due: (
                    ran.append((i, due, monotonic_us())),
                    len(ran) == len(dues) and done.set()))
        ev.call(set_all)
        assert done.wait(5)
        assert [i for i, _, _ in ran] == [1, 5, 2, 3, 0, 4]  # by due time, ties as set
        assert all(at >= due for _, due, at in ran)          # never early
        loop.post(Stop())
        loop.join(5)


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_the_loop_wakes_once_per_timer_not_early(kind):
    """The event-loop timer standing for the loop's next timer is set for a whole number of
    milliseconds: libuv rounds a delay to the nearest millisecond, so a delay of 1.4 ms
    would wake the loop 0.4 ms early for nothing (then again for the timer), and one of
    0.4 ms at once.  Timers spread over the millisecond grid each cost one wake-up."""
    new_loop = (pytest.importorskip("uvloop").new_event_loop if kind == "uvloop"
                else asyncio.new_event_loop)
    with _EventLoopThread(new_loop()) as ev:
        loop = DecisionLoop({}, [], host=None, clock=monotonic_us, options=RuntimeOptions())
        ev.call(lambda: loop.start(ev.loop))
        wakes = {"early": 0}
        on_timer = loop._on_timer

        def counted():
            wakes["early"] += monotonic_us() < loop._armed_us
            on_timer()
        loop._on_timer = counted
        done = threading.Event()
        ran: list[tuple[float, float]] = []
        n = 40

        def next_timer():
            # each set from the previous one's callback, 1.1 .. 1.9 ms ahead of now
            now = monotonic_us()
            due = now + 1_100.0 + 800.0 * (len(ran) % 9) / 8
            loop.call_at(due, lambda: (ran.append((due, monotonic_us())),
                                      next_timer() if len(ran) < n else done.set()))
        ev.call(next_timer)
        assert done.wait(10)
        assert all(at >= due for due, at in ran)  # never early
        # one wake-up each (a rare early one: libuv's clock may lag by up to a millisecond)
        assert wakes["early"] <= n // 10, wakes
        loop.post(Stop())
        loop.join(5)


def test_start_on_an_event_loop_from_another_thread_is_refused():
    with _EventLoopThread() as ev:
        loop = DecisionLoop({}, [], host=None, clock=monotonic_us, options=RuntimeOptions())
        from ppipe_trt.errors import PPipeError
        with pytest.raises(PPipeError, match="event loop's thread"):
            loop.start(ev.loop)


@pytest.fixture(scope="module")
def emulated(shared_profiles, profiles_dir):
    from ppipe_trt.cluster import load_paper_setting
    from ppipe_trt.serving.local import emulated_plan

    models = ["googlenet-v3-pytorch", "repvgg-b3"]
    return emulated_plan(shared_profiles, load_paper_setting(profiles_dir).cluster("L4-T4"),
                         models), models


def test_an_emulated_runtime_answers_on_the_event_loop_without_other_threads(shared_profiles,
                                                                           emulated):
    """Every request is admitted, scheduled, run and answered on the event loop's thread:
    asyncio futures, no runtime thread; latencies no shorter than the profiled pipeline;
    stop() on the loop's own thread drains at once."""
    from ppipe_trt.serving.assembly import build_runtime

    plan, models = emulated
    rt = build_runtime(plan, shared_profiles, {}, RuntimeOptions(hop_overhead_us=50.0))
    assert rt.threadless
    x = {"INPUT__0": np.zeros((1, 1), np.float32)}

    async def main():
        before = threading.active_count()
        rt.start(asyncio.get_running_loop())
        assert rt.event_loop is asyncio.get_running_loop()
        assert threading.active_count() == before  # no loop thread, no worker threads
        futures = [rt.submit_async(m, x) for m in models for _ in range(6)]
        assert all(isinstance(f, asyncio.Future) for f in futures)
        results = await asyncio.gather(*futures)
        # a submit from another thread still works (a concurrent future, posted)
        other = await asyncio.to_thread(lambda: rt.submit(models[0], x).result(10))
        rt.stop()  # on the event loop's thread
        late = rt.submit_async(models[0], x)
        with pytest.raises(Exception, match="not accepting"):
            await late
        return results + [other]

    results = asyncio.run(main())
    for r in results:
        pipe_us = min(p.latency_us for p in plan.model(r.model).pipelines)
        assert r.latency_us >= 0.9 * pipe_us and r.met_deadline


def test_stop_from_another_thread_answers_everything_in_flight(shared_profiles, emulated):
    from ppipe_trt.serving.assembly import build_runtime

    plan, models = emulated
    rt = build_runtime(plan, shared_profiles, {}, RuntimeOptions(hop_overhead_us=50.0))
    x = {"INPUT__0": np.zeros((1, 1), np.float32)}

    async def main():
        rt.start(asyncio.get_running_loop())
        futures = [rt.submit_async(m, x) for m in models for _ in range(20)]
        await asyncio.sleep(0.001)
        await asyncio.to_thread(rt.stop)  # as the app's lifespan does
        return await asyncio.gather(*futures, return_exceptions=True)

    answers = asyncio.run(main())
    assert len(answers) == 40
    for a in answers:  # each answered: a result (finished while stopping) or shutdown
        assert not isinstance(a, BaseException) or "shutting down" in str(a)


def test_answers_by_callback_on_the_event_loop(shared_profiles, emulated):
    """submit_answer: the runtime calls the request's callback where it answers (once, on
    the event loop's thread), a refusal while submitting on the next turn (not inside the
    submitting call), a callback's exception is logged and the runtime goes on; anywhere but
    the runtime's event loop it declines (False) and nothing is submitted."""
    from ppipe_trt.serving.answers import CallbackAnswer
    from ppipe_trt.serving.assembly import build_runtime

    plan, models = emulated
    rt = build_runtime(plan, shared_profiles, {}, RuntimeOptions(hop_overhead_us=50.0))
    x = {"INPUT__0": np.zeros((1, 1), np.float32)}

    async def main():
        loop = asyncio.get_running_loop()
        assert not rt.submit_answer(models[0], x, None, CallbackAnswer(print, loop))
        rt.start(loop)
        got: list = []
        main_thread = threading.get_ident()

        def callback(result, error):
            assert threading.get_ident() == main_thread
            got.append((result, error))
            if len(got) == 2:
                raise RuntimeError("a front end's bug")

        answers = [CallbackAnswer(callback, loop) for _ in range(12)]
        for i, a in enumerate(answers):
            assert rt.submit_answer(models[i % 2], x, None, a)
            a.arm()
        elsewhere = await asyncio.to_thread(rt.submit_answer, models[0], x, None,
                                            CallbackAnswer(callback, loop))
        assert elsewhere is False
        for _ in range(200):
            if len(got) == 12:
                break
            await asyncio.sleep(0.01)
        assert len(got) == 12 and all(e is None and r.met_deadline for r, e in got)
        assert all(a.done() for a in answers)
        rt.stop()
        refused: list = []
        late = CallbackAnswer(lambda r, e: refused.append(e), loop)
        assert rt.submit_answer(models[0], x, None, late)
        assert refused == []  # not inside the submitting call
        late.arm()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(refused) == 1 and "not accepting" in str(refused[0])
        return rt.stats.snapshot()

    snap = asyncio.run(main())
    assert sum(c.completions for c in snap.values()) == 12


def test_a_callback_answer_takes_one_outcome():
    from concurrent.futures import InvalidStateError

    from ppipe_trt.serving.answers import CallbackAnswer, resolve

    async def main():
        got: list = []
        a = CallbackAnswer(lambda r, e: got.append((r, e)), asyncio.get_running_loop())
        a.arm()
        resolve(a, 1)
        resolve(a, 2)  # ignored, as for a future
        with pytest.raises(InvalidStateError):
            a.set_result(3)
        assert a.cancel() is False and got == [(1, None)] and a.done()
        b = CallbackAnswer(lambda r, e: got.append((r, type(e))), asyncio.get_running_loop())
        b.arm()
        assert b.cancel() is True and got[-1] == (None, asyncio.CancelledError)

    asyncio.run(main())
