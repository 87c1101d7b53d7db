"""The compiled timing-only workers (``ppipe_trt._native.timed``) against the Python
reference (``ppipe_trt.serving.timed_worker.TimedWorker``).

Side by side on a fake clock: the same jobs (several workers, two- and three-stage routes,
emulated links, jobs out of order so that committed batches are taken back, timers heard
late) must give the same reports -- every stage finish, answer and failure, with the same
times -- the same counters and the same jobs left at stop.  Then the pool on the real
runtime loop, on its own thread and on an event loop, keeps the rules the reference's
tests check; and a served emulated plan runs on it.
"""

from __future__ import annotations

import heapq
import random
import threading

import numpy as np
import pytest

from ppipe_trt.errors import PPipeError
from ppipe_trt.scheduler import native
from ppipe_trt.scheduler.interface import Dispatch, Request, StageReservation
from ppipe_trt.scheduler.placement import WorkerSlot
from ppipe_trt.serving.clock import monotonic_us
from ppipe_trt.serving.emulation import EmulatedTiming
from ppipe_trt.serving.events import Stop
from ppipe_trt.serving.loop import DecisionLoop
from ppipe_trt.serving.options import RuntimeOptions
from ppipe_trt.serving.timed_worker import TimedWorker
from ppipe_trt.serving.transport import InProcessTransport, StageJob
from tests.serving.test_event_loop_mode import _EventLoopThread
from tests.serving.test_serving_transport_worker import _Sink, _send_three_out_of_order_and_check


@pytest.fixture
def timed():
    mod = native.native_module("timed")
    if mod is None:
        import os

        why = native.native_status("timed")["detail"]
        if os.environ.get("PPIPE_REQUIRE_NATIVE") == "1":
            pytest.fail(f"the compiled timing-only workers are required here: {why}")
        pytest.skip(f"compiled timing-only workers not available: {why}")
    return mod


class _FakeTimers:
    """The reference worker's timers on a fake clock (the pool has its own heap)."""

    def __init__(self):
        self.heap: list = []
        self.seq = 0

    def call_at(self, t, cb):
        heapq.heappush(self.heap, (t, self.seq, cb))
        self.seq += 1

    def on_loop_thread(self):
        return True


class _Log:
    """A sink that records every report with its times."""

    def __init__(self):
        self.events: list[tuple] = []

    def stage_finished(self, job, start_us, finish_us):
        self.events.append(("finished", job.dispatch.batch_id, job.stage, start_us, finish_us))

    def batch_completed(self, job, outputs, finish_us):
        self.events.append(("completed", job.dispatch.batch_id, job.stage, finish_us,
                            dict(outputs)))

    def batch_failed(self, job, error, now_us):
        self.events.append(("failed", job.dispatch.batch_id, job.stage, now_us, str(error)))


def _late(t: float) -> float:
    """How late a timer due at ``t`` is heard (a deterministic function of ``t``)."""
    return float(int(t * 7.0) % 5) * 180.0


class _World:
    """Workers (reference or pool) on a transport, a sink and a fake clock."""

    def __init__(self, kind, timed_mod, slots, timings):
        self.now = 0.0
        self.clock = lambda: self.now
        self.transport = InProcessTransport(emulate_links=True)
        self.sink = _Log()
        self.timers = _FakeTimers()
        self.kind = kind
        if kind == "pool":
            self.pool = timed_mod.TimedPool(self.transport, self.sink, self.timers, self.clock)
            self.workers = [self.pool.add(s, t) for s, t in zip(slots, timings)]
        else:
            self.pool = None
            self.workers = [TimedWorker(s, t, self.transport, self.sink, self.timers,
                                        clock=self.clock) for s, t in zip(slots, timings)]
        for w in self.workers:
            w.start()

    def next_due(self) -> float:
        due = self.timers.heap[0][0] if self.timers.heap else float("inf")
        if self.pool is not None:
            due = min(due, self.pool.next_due_us())
        return due

    def run_until(self, t_end: float) -> None:
        """Fire what is due before ``t_end``, each heard ``_late`` after its time (the clock
        is a function of the event's time alone: the reference also fires the timers of
        batches taken back, as no-ops, which the pool drops from its heap)."""
        while True:
            due = self.next_due()
            if due >= t_end:
                return
            self.now = due + _late(due)
            while self.pool is not None:
                try:
                    self.pool.run_due(due)
                    break
                except PPipeError as exc:   # the loop logs it; the rest due runs in turn
                    self.sink.events.append(("error", str(exc)))
            while self.timers.heap and self.timers.heap[0][0] <= due:
                _, _, cb = heapq.heappop(self.timers.heap)
                try:
                    cb()
                except PPipeError as exc:   # the loop logs it and goes on
                    self.sink.events.append(("error", str(exc)))

    def send(self, t: float, job: StageJob) -> None:
        self.run_until(t)
        self.now = t
        try:
            self.transport.send(job.dispatch.route[0].worker_id, job, self.now)
        except PPipeError as exc:
            self.sink.events.append(("refused", job.dispatch.batch_id, str(exc)))


def _scenario(seed: int, n_workers: int = 6, n_batches: int = 150):
    rng = random.Random(seed)
    slots = [WorkerSlot(w, "m", 0, w % 3, "T4") for w in range(n_workers)]
    timings = [EmulatedTiming("m", "T4", 1, 0, 0,
                              tuple(rng.uniform(300.0, 3000.0) * (1 + 0.4 * b)
                                    for b in range(4)))
               for _ in range(n_workers)]
    sends = []
    t = 0.0
    for bid in range(n_batches):
        t += rng.expovariate(1 / 700.0)
        n_stages = rng.choice((1, 2, 2, 3))
        route = []
        start = t + rng.uniform(-200.0, 2500.0)     # reserved start, sometimes in the past
        for s in range(n_stages):
            xfer = rng.choice((0.0, 0.0, 150.0, 900.0)) if s else 0.0
            route.append(StageReservation(s, rng.randrange(n_workers), start + xfer,
                                          start + xfer + 1000.0, start, start + xfer))
            start += xfer + rng.uniform(300.0, 2500.0)
        batch = rng.randint(1, 5)        # 5: beyond the profiled 4 (the reference's error)
        reqs = tuple(Request(bid * 10 + i, "m", t, t + 1e9) for i in range(batch))
        d = Dispatch(bid, "m", 0, reqs, tuple(route))
        sends.append((t, d, rng.uniform(0.0, 800.0)))
    return slots, timings, sends


@pytest.mark.parametrize("seed", range(8))
def test_the_pool_reports_what_the_reference_reports(timed, seed):
    slots, timings, sends = _scenario(seed)
    worlds = [_World(k, timed, slots, timings) for k in ("reference", "pool")]
    stop_at = sends[-1][0] * 0.8          # some workers stop while jobs are queued
    for w in worlds:
        left = None
        for t, d, nb in sends:
            if left is None and t >= stop_at:
                w.run_until(t)
                w.now = t
                left = [[(j.dispatch.batch_id, j.stage) for j in wk.stop()]
                        for wk in w.workers[:2]]
            w.send(t, StageJob(d, 0, {}, not_before_us=t + nb))
        w.run_until(float("inf"))
        w.left = left
    ref, pool = worlds
    assert len(ref.sink.events) > 200
    assert pool.sink.events == ref.sink.events
    assert pool.left == ref.left
    assert [wk.stats() for wk in pool.workers] == [wk.stats() for wk in ref.workers]
    kinds = {e[0] for e in ref.sink.events}
    assert {"finished", "completed", "failed", "refused", "error"} <= kinds  # every path


def _pool_worker(timed, transport, sink, loop, timing):
    pool = loop.timed_pool(lambda: timed.TimedPool(transport, sink, loop))
    return pool.add(WorkerSlot(0, "m", 0, 0, "T4"), timing)


def test_the_pool_keeps_the_rules_on_the_loops_own_thread(timed):
    loop = DecisionLoop({}, [], host=None, clock=monotonic_us, options=RuntimeOptions())
    loop.start()
    timing = EmulatedTiming("m", "T4", 1, 0, 0, (2_000.0,))
    transport, sink = InProcessTransport(), _Sink()
    threads_before = threading.active_count()
    worker = _pool_worker(timed, transport, sink, loop, timing)
    worker.start()
    assert threading.active_count() == threads_before and worker.threadless
    try:   # sent from this thread: the loop thread considers them
        _send_three_out_of_order_and_check(transport, sink, worker)
    finally:
        loop.post(Stop())
        loop.join(5)
    assert worker.stop() == [] and not worker.alive
    assert worker.stats().batches == 3 and worker.mode == "timing-only, emulated T4"


def test_the_pool_keeps_the_rules_on_an_event_loop(timed):
    with _EventLoopThread() as ev:
        loop = DecisionLoop({}, [], host=None, clock=monotonic_us, options=RuntimeOptions())
        ev.call(lambda: loop.start(ev.loop))
        timing = EmulatedTiming("m", "T4", 1, 0, 0, (2_000.0,))
        transport, sink = InProcessTransport(), _Sink()
        worker = _pool_worker(timed, transport, sink, loop, timing)
        worker.start()
        _send_three_out_of_order_and_check(transport, sink, worker)
        loop.post(Stop())
        loop.join(5)
        assert not loop.alive


@pytest.mark.parametrize("impl", ["compiled", "python"])
def test_an_emulated_runtime_serves_on_either(shared_profiles, profiles_dir, monkeypatch,
                                               impl):
    """A 100-GPU paper plan served timing-only on the compiled workers and on the
    reference: no thread per worker, answers no sooner than the profiled pipeline latency,
    the status page says which ran."""
    from ppipe_trt.cluster import load_paper_setting
    from ppipe_trt.serving.assembly import RuntimeOptions as RO, build_runtime
    from ppipe_trt.serving.local import emulated_plan

    if impl == "python":
        monkeypatch.setenv("PPIPE_NATIVE", "0")
    elif native.native_module("timed") is None:
        pytest.skip("compiled timing-only workers not available")
    models = ["googlenet-v3-pytorch", "repvgg-b3"]
    plan = emulated_plan(shared_profiles, load_paper_setting(profiles_dir).cluster("L4-T4"),
                         models)
    before = threading.active_count()
    rt = build_runtime(plan, shared_profiles, {}, RO(hop_overhead_us=50.0))
    want = "PooledWorker" if impl == "compiled" else "TimedWorker"
    assert {type(w).__name__ for w in rt.workers} == {want} and len(rt.workers) > 20
    with rt:
        assert threading.active_count() == before + 1  # the loop
        futures = [rt.submit(m, {"INPUT__0": np.zeros((1, 1), np.float32)}, None)
                   for m in models for _ in range(5)]
        results = [f.result(10) for f in futures]
        status = rt.status()
    for r in results:
        pipe_us = min(p.latency_us for p in plan.model(r.model).pipelines)
        assert r.latency_us >= 0.9 * pipe_us and r.met_deadline
    assert status["scheduler"]["timing_only_workers"] == impl
    # every request went through at least one stage's worker, counted there
    assert sum(s.samples for s in rt.worker_stats()) >= len(results)


def test_ppipe_native_chooses_the_compiled_parts_one_by_one(timed, monkeypatch):
    monkeypatch.setenv("PPIPE_NATIVE", "reservation")
    assert native.native_module("timed") is None
    assert native.native_status("timed") == {"scheduler": "python",
                                             "detail": "PPIPE_NATIVE=reservation"}
    assert native.native_status()["scheduler"] == (
        "compiled" if native._load()[0] is not None else "python")
    monkeypatch.setenv("PPIPE_NATIVE", "timed")
    assert native.native_module("timed") is timed and native.native_module() is None
    assert "timing-only workers compiled" in native.implementation()
    assert "timing-only" not in native.implementation(timing_only=False)   # none served
    assert native.implementation().startswith("reservation (Python reference: PPIPE_NATIVE=")
    monkeypatch.setenv("PPIPE_NATIVE", "0")
    assert native.native_module("timed") is None and native.native_module() is None


def test_a_finish_a_later_stage_follows_may_be_heard_later(timed):
    """``next_wake_us``: a last stage's finish at its time; an earlier stage's, whose next
    stage runs on a worker of the pool, up to the pool's shortest hold later (that stage
    cannot finish sooner); to a worker elsewhere, at its time.  ``next_due_us`` is
    unchanged, and a finish handled late hands its batch on at its emulated time."""
    now = [0.0]
    transport = InProcessTransport()
    sink = _Log()
    pool = timed.TimedPool(transport, sink, _FakeTimers(), lambda: now[0])
    timings = [EmulatedTiming("m", "T4", 1, 0, 0, (h,)) for h in (3_000.0, 5_000.0)]
    workers = [pool.add(WorkerSlot(w, "m", 0, w, "T4"), t) for w, t in enumerate(timings)]
    for w in workers:
        w.start()
    elsewhere: list = []
    transport.register(7, elsewhere.append)        # a worker of no pool

    def send(bid, wids):
        route = tuple(StageReservation(s, wid, 0.0, 1.0, 0.0, 0.0)
                      for s, wid in enumerate(wids))
        d = Dispatch(bid, "m", 0, (Request(bid, "m", 0.0, 1e9),), route)
        transport.send(wids[0], StageJob(d, 0, {}, not_before_us=0.0), 0.0)

    send(1, (0, 1))                                 # stage 0 on worker 0 (3 ms), then 1
    assert pool.next_due_us() == 3_000.0
    assert pool.next_wake_us() == 3_000.0 + 3_000.0   # + the shortest hold (3 ms)
    now[0] = 5_500.0                                # heard late, before the limit
    assert pool.run_due(now[0]) == 1
    # stage 1 started at the emulated 3 ms, not when heard: its finish is at 8 ms, last
    assert pool.next_due_us() == pool.next_wake_us() == 3_000.0 + 5_000.0
    now[0] = 8_000.0
    assert pool.run_due(now[0]) == 1
    assert [e[0] for e in sink.events] == ["finished", "completed", "finished"]
    assert sink.events[1][3] == 8_000.0
    assert pool.next_due_us() == pool.next_wake_us() == float("inf")
    send(2, (0, 7))                                 # its next stage is no pool's
    # (worker 0 is free from 3 ms on its own timeline)
    assert pool.next_wake_us() == pool.next_due_us() == 3_000.0 + 3_000.0


def test_a_stopped_worker_is_let_go_of_and_its_place_taken(timed):
    """Plan swaps retire workers and add others, so the pool must not grow with them: it
    lets go of a stopped worker once that has no batch (at stop, or when the batch it runs
    finishes), a new worker takes its place, a heap entry left from the place's old worker
    never fires for the newcomer, and the shortest hold is the live workers' (see
    ``next_wake_us``)."""
    now = [0.0]
    transport = InProcessTransport()
    sink = _Log()
    pool = timed.TimedPool(transport, sink, _FakeTimers(), lambda: now[0])

    def add(wid, hold):
        w = pool.add(WorkerSlot(wid, "m", 0, wid, "T4"),
                     EmulatedTiming("m", "T4", 1, 0, 0, (hold,)))
        w.start()
        return w

    def send(bid, wids, start):
        route = tuple(StageReservation(s, wid, start, start + 1.0, 0.0, 0.0)
                      for s, wid in enumerate(wids))
        d = Dispatch(bid, "m", 0, (Request(bid, "m", 0.0, 1e9),), route)
        transport.send(wids[0], StageJob(d, 0, {}, not_before_us=0.0), now[0])

    w0, w1, w2 = add(0, 1_000.0), add(1, 5_000.0), add(2, 4_000.0)
    send(1, (0,), 500.0)                  # committed on worker 0 for 0.5-1.5 ms, not started
    assert pool.next_due_us() == 1_500.0
    assert [j.dispatch.batch_id for j in w0.stop()] == [1]   # never started: handed back
    assert pool.workers == (w1, w2)       # let go of at once: it has no batch
    w3 = add(3, 6_000.0)                  # takes worker 0's place
    assert len(pool.workers) == 3 and set(pool.workers) == {w1, w2, w3}
    send(2, (3,), 0.0)                    # 0-6 ms
    assert pool.next_due_us() == 6_000.0  # not worker 0's old entry at 1.5 ms
    now[0] = 2_000.0
    assert pool.run_due(now[0]) == 0
    now[0] = 6_000.0
    assert pool.run_due(now[0]) == 1
    send(3, (1, 2), 0.0)                  # worker 1 for 6-11 ms, then worker 2
    # heard up to the shortest live hold later: worker 2's 4 ms (worker 0's 1 ms left)
    assert pool.next_wake_us() == 11_000.0 + 4_000.0
    now[0] = 7_000.0
    assert w1.stop() == []                # its batch has started: it runs to its end
    assert w1 in pool.workers
    now[0] = 11_000.0
    assert pool.run_due(now[0]) == 1      # handed on to worker 2; worker 1 let go of
    assert set(pool.workers) == {w2, w3}
    now[0] = 15_000.0
    assert pool.run_due(now[0]) == 1
    assert [(e[0], e[1]) for e in sink.events if e[0] == "completed"] == [("completed", 2),
                                                                           ("completed", 3)]
    assert w1.stats().batches == 1 and w0.stats().batches == 0


def test_the_loop_waits_for_quiet_finishes_only_while_nothing_is_queued(timed):
    """On an event loop, the loop's timer is set for the pool's ``next_wake_us`` while no
    scheduler holds a request, for its ``next_due_us`` while one does (a finish may let it
    dispatch), and for ``next_due_us`` while an earlier plan still has batches."""
    import asyncio

    class Pool:
        def next_due_us(self):
            return base + 5_000.0

        def next_wake_us(self):
            return base + 9_000.0

    class Sched:
        queue_length = 0

    sched = Sched()
    base = monotonic_us()

    async def armed_at(queued: int, old: bool) -> float:
        loop = DecisionLoop({"m": sched}, ["m"], host=None, clock=monotonic_us,
                            options=RuntimeOptions())
        loop.start(asyncio.get_running_loop())
        loop._pool = Pool()
        sched.queue_length = queued
        if old:
            loop._old = [(0, {"m": Sched()})]
        loop._arm()
        at = loop._armed_us
        loop._end()
        return at

    def grid(t):  # the loop's millisecond grid
        return -(-t // 1000.0) * 1000.0

    assert asyncio.run(armed_at(0, False)) == grid(base + 9_000.0)
    assert asyncio.run(armed_at(3, False)) == grid(base + 5_000.0)
    assert asyncio.run(armed_at(0, True)) == grid(base + 5_000.0)


def test_an_emulated_plan_at_low_load_on_an_event_loop(timed, shared_profiles,
                                                       profiles_dir):
    """Two-stage routes, requests a few milliseconds apart, on an event loop (first
    stages' finishes heard on the wake-ups that come anyway): every request answered no
    sooner than its pipeline's latency and within its deadline."""
    import asyncio

    from ppipe_trt.cluster import load_paper_setting
    from ppipe_trt.serving.assembly import RuntimeOptions as RO, build_runtime
    from ppipe_trt.serving.local import emulated_plan

    models = ["googlenet-v3-pytorch", "repvgg-b3"]
    plan = emulated_plan(shared_profiles, load_paper_setting(profiles_dir).cluster("L4-T4"),
                         models)
    rt = build_runtime(plan, shared_profiles, {}, RO(hop_overhead_us=50.0))

    async def serve():
        rt.start(asyncio.get_running_loop())
        try:
            futs = []
            for _ in range(60):
                for m in models:
                    futs.append(rt.submit_async(m, None, None))
                await asyncio.sleep(0.004)
            return await asyncio.gather(*futs)
        finally:
            rt.stop()

    results = asyncio.run(serve())
    assert len(results) == 120 and all(r.met_deadline for r in results)
    assert any(len(p.stages) > 1 for m in models for p in plan.model(m).pipelines)
    def fastest_us(model: str, batch: int) -> float:
        """The model's fastest pipeline at ``batch`` (a batch smaller than planned, e.g. one
        dispatched late on a loaded host, runs faster than the plan's latency)."""
        prof = shared_profiles[model]
        return min(sum(prof.range_latency_us(st.gpu_class, st.mps_share, st.first_block,
                                             st.last_block, batch) for st in p.stages)
                   for p in plan.model(model).pipelines)

    for r in results:
        assert r.latency_us >= 0.9 * fastest_us(r.model, r.batch_size)
