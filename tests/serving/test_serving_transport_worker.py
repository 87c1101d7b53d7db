"""Transport hand-offs and a worker's ordering of its reserved jobs (real threads)."""

from __future__ import annotations

import threading

import pytest

from ppipe_trt.scheduler.interface import Dispatch, Request, StageReservation
from ppipe_trt.scheduler.placement import WorkerSlot
from ppipe_trt.serving.emulation import EmulatedTiming
from ppipe_trt.serving.transport import InProcessTransport, StageJob, TransportError
from ppipe_trt.serving.worker import StageWorker, monotonic_us


def _dispatch(batch_id: int, starts: list[float], xfer_us: float = 0.0) -> Dispatch:
    route = tuple(StageReservation(s, s, start, start + 10.0, start - xfer_us, start)
                  for s, start in enumerate(starts))
    return Dispatch(batch_id, "m", 0, (Request(batch_id, "m", 0.0, 1e12),), route)


def test_emulated_links_delay_only_hand_offs_between_stages():
    got: list[StageJob] = []
    t = InProcessTransport(emulate_links=True)
    t.register(7, got.append)
    d = _dispatch(1, [100.0, 500.0], xfer_us=250.0)
    t.send(7, StageJob(d, 0, not_before_us=5.0), now_us=1000.0)
    t.send(7, StageJob(d, 1), now_us=2000.0)
    assert got[0].not_before_us == 5.0 and got[0].sent_us == 1000.0
    assert got[1].not_before_us == 2250.0  # sent at 2000 + the reserved 250 us link time
    with pytest.raises(TransportError, match="no worker 8 registered"):
        t.send(8, StageJob(d, 0), now_us=0.0)
    t.close()
    with pytest.raises(TransportError, match="transport closed"):
        t.send(7, StageJob(d, 0), now_us=0.0)


class _Sink:
    """Collects what the worker reports (the runtime's role)."""

    def __init__(self):
        self.finished: list[tuple[int, float, float]] = []
        self.done = threading.Event()

    def stage_finished(self, job, start_us, finish_us):
        self.finished.append((job.dispatch.batch_id, start_us, finish_us))
        if len(self.finished) == 3:
            self.done.set()

    def batch_completed(self, job, outputs, finish_us):
        pass

    def batch_failed(self, job, error, now_us):
        raise AssertionError(f"unexpected failure: {error}")


def test_worker_runs_ready_jobs_by_reserved_start_and_never_early():
    timing = EmulatedTiming("m", "T4", 1, 0, 0, (2_000.0,))
    transport = InProcessTransport()
    sink = _Sink()
    worker = StageWorker(WorkerSlot(0, "m", 0, 0, "T4"), None, timing, transport, sink)
    worker.start()
    try:
        _send_three_out_of_order_and_check(transport, sink, worker)
    finally:
        worker.stop()


def _send_three_out_of_order_and_check(transport, sink, worker) -> None:
    """Batch 3 is reserved first, batch 2 not before +30 ms, queued out of order: they run
    3, 1, 2, never before their reserved start, each held for the emulated 2 ms."""
    now = monotonic_us()
    later = now + 30_000.0
    for bid, start in ((2, later), (1, now + 1_000.0), (3, now)):
        transport.send(0, StageJob(_dispatch(bid, [start]), 0), now_us=monotonic_us())
    assert sink.done.wait(5)
    assert [b for b, _, _ in sink.finished] == [3, 1, 2]
    starts = {b: s for b, s, _ in sink.finished}
    assert starts[2] >= later                         # never before its reserved start
    for _, start, finish in sink.finished:
        assert finish - start >= 2_000.0              # held for the emulated latency
    assert worker.stats().batches == 3 and worker.stats().queue_length == 0


def test_timed_worker_keeps_the_thread_workers_rules_on_the_loop_timers():
    """The thread-less timing-only worker (timers of the real runtime loop): same order,
    never early, held for the emulated latency; no thread of its own."""
    from ppipe_trt.serving.events import Stop
    from ppipe_trt.serving.loop import DecisionLoop
    from ppipe_trt.serving.options import RuntimeOptions
    from ppipe_trt.serving.timed_worker import TimedWorker

    loop = DecisionLoop({}, [], host=None, clock=monotonic_us, options=RuntimeOptions())
    loop.start()
    timing = EmulatedTiming("m", "T4", 1, 0, 0, (2_000.0,))
    transport = InProcessTransport()
    sink = _Sink()
    threads_before = threading.active_count()
    worker = TimedWorker(WorkerSlot(0, "m", 0, 0, "T4"), timing, transport, sink, loop)
    worker.start()
    assert threading.active_count() == threads_before
    try:
        _send_three_out_of_order_and_check(transport, sink, worker)
    finally:
        loop.post(Stop())
        loop.join(5)
    assert worker.stop() == [] and not worker.alive


def test_an_emulated_runtime_runs_timing_only_workers_without_threads(shared_profiles,
                                                                    profiles_dir):
    """A 100-GPU paper plan served timing-only: one loop thread, no thread per worker, and
    answers no sooner than the profiled pipeline latency."""
    from ppipe_trt.cluster import load_paper_setting
    from ppipe_trt.serving.assembly import RuntimeOptions, build_runtime
    from ppipe_trt.serving.local import emulated_plan
    from ppipe_trt.serving.timed_worker import TimedWorker

    models = ["googlenet-v3-pytorch", "repvgg-b3"]
    plan = emulated_plan(shared_profiles, load_paper_setting(profiles_dir).cluster("L4-T4"),
                         models)
    before = threading.active_count()
    rt = build_runtime(plan, shared_profiles, {}, RuntimeOptions(hop_overhead_us=50.0))
    # the reference TimedWorker, or its compiled form (tests/serving/test_timed_pool.py)
    assert all(isinstance(w, TimedWorker) or type(w).__name__ == "PooledWorker"
               for w in rt.workers) and len(rt.workers) > 20
    import numpy as np

    with rt:
        assert threading.active_count() == before + 1  # the loop
        futures = [rt.submit(m, {"INPUT__0": np.zeros((1, 1), np.float32)}, None)
                   for m in models for _ in range(5)]
        results = [f.result(10) for f in futures]
    for r in results:
        pipe_us = min(p.latency_us for p in plan.model(r.model).pipelines)
        assert r.latency_us >= 0.9 * pipe_us and r.met_deadline
