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
        now = monotonic_us()
        later = now + 30_000.0
        # queued out of order: batch 3 is reserved first, batch 2 not before +30 ms
        for bid, start in ((2, later), (1, now + 1_000.0), (3, now)):
            transport.send(0, StageJob(_dispatch(bid, [start]), 0), now_us=monotonic_us())
        assert sink.done.wait(5)
    finally:
        worker.stop()
    order = [b for b, _, _ in sink.finished]
    assert order == [3, 1, 2]
    starts = {b: s for b, s, _ in sink.finished}
    assert starts[2] >= later                         # never before its reserved start
    for _, start, finish in sink.finished:
        assert finish - start >= 2_000.0              # held for the emulated latency
    assert worker.stats().batches == 3 and worker.stats().queue_length == 0
