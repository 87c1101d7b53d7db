"""Calibration in the live runtime: a worker with real compute starts a first-stage batch as
soon as it is free, reports when the batch could start, and the runtime hands what its
workers take to the scheduler in place of the profile (real threads, a small real model on
ONNX Runtime; emulated and timing-only models are not calibrated)."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from ppipe_trt.profiles.types import ProfileSet
from ppipe_trt.scheduler.interface import Dispatch, Request, StageReservation
from ppipe_trt.scheduler.placement import WorkerSlot
from ppipe_trt.scheduler.work_conserving import capacity_by_batch_rps
from ppipe_trt.serving.assembly import RuntimeOptions, build_runtime
from ppipe_trt.serving.emulation import EmulatedTiming
from ppipe_trt.serving.executors import StageExecutor
from ppipe_trt.serving.local import pipeline_plan
from ppipe_trt.serving.transport import InProcessTransport, StageJob
from ppipe_trt.serving.worker import StageWorker, monotonic_us

MODEL = "demo_resnet"


# ---- the worker -------------------------------------------------------------------------------

class _FastExecutor(StageExecutor):
    """Real compute that takes next to no time (the worker's rules, not a model's, under
    test)."""

    label = "fast"

    @property
    def inputs(self):
        return ()

    @property
    def outputs(self):
        return ()

    def run(self, tensors, batch_size):
        return {}


class _Sink:
    """What the worker reports (the runtime's role): per batch (start_us, finish_us)."""

    def __init__(self, expect: int):
        self.finished: dict[int, tuple[float, float]] = {}
        self.order: list[int] = []
        self.expect = expect
        self.done = threading.Event()

    def stage_finished(self, job, start_us, finish_us):
        self.finished[job.dispatch.batch_id] = (start_us, finish_us)
        self.order.append(job.dispatch.batch_id)
        if len(self.order) == self.expect:
            self.done.set()

    def batch_completed(self, job, outputs, finish_us):
        pass

    def batch_failed(self, job, error, now_us):
        raise AssertionError(f"unexpected failure: {error}")


def _job(batch_id: int, start_us: float, position: int = 0, worker_id: int = 0) -> StageJob:
    """A job for ``worker_id`` at route position ``position`` (the route's last), reserved
    from ``start_us`` for 10 us."""
    route = tuple(StageReservation(s, worker_id if s == position else 100 + s,
                                   start_us if s == position else 0.0,
                                   (start_us if s == position else 0.0) + 10.0,
                                   None, None)
                  for s in range(position + 1))
    d = Dispatch(batch_id, "m", 0, (Request(batch_id, "m", 0.0, 1e12),), route)
    return StageJob(d, position)


def _worker(sink, executor=None, emulation=None) -> StageWorker:
    return StageWorker(WorkerSlot(0, "m", 0, 0, "T4"), executor, emulation,
                       InProcessTransport(), sink)


def test_real_compute_starts_a_first_stage_batch_before_its_reserved_start():
    sink = _Sink(1)
    worker = _worker(sink, executor=_FastExecutor())
    assert worker.early_start
    reserved = monotonic_us() + 5e6            # 5 s from now
    worker.start()
    try:
        worker.submit(_job(1, reserved))
        assert sink.done.wait(4), "the batch waited for its reserved start"
    finally:
        worker.stop()
    start, finish = sink.finished[1]
    assert start <= finish < reserved - 1e6


@pytest.mark.parametrize("kind", ["executor+emulation", "timing-only"])
def test_an_emulated_worker_keeps_its_reserved_start(kind):
    sink = _Sink(1)
    timing = EmulatedTiming("m", "T4", 1, 0, 0, (1_000.0,))
    executor = _FastExecutor() if kind == "executor+emulation" else None
    worker = _worker(sink, executor=executor, emulation=timing)
    assert not worker.early_start
    reserved = monotonic_us() + 300_000.0
    worker.start()
    try:
        worker.submit(_job(1, reserved))
        assert sink.done.wait(10)
    finally:
        worker.stop()
    start, finish = sink.finished[1]
    assert start >= reserved and finish - start >= 1_000.0


def test_only_the_first_job_in_reserved_order_may_start_early_and_only_at_position_0():
    """A later-stage job reserved first waits for its reserved start (its input may come
    from elsewhere); the first-stage job reserved after it then starts as soon as the worker
    is free, long before its own reserved start."""
    sink = _Sink(2)
    worker = _worker(sink, executor=_FastExecutor())
    now = monotonic_us()
    stage1_at, stage0_at = now + 300_000.0, now + 5e6
    worker.submit(_job(1, stage0_at, position=0))
    worker.submit(_job(2, stage1_at, position=1))
    worker.start()
    try:
        assert sink.done.wait(4), "the first-stage batch waited for its reserved start"
    finally:
        worker.stop()
    assert sink.order == [2, 1]
    s2, f2 = sink.finished[2]
    s1, f1 = sink.finished[1]
    assert s2 >= stage1_at                    # not early: route position 1
    assert f2 <= s1 <= f1 < stage0_at - 1e6   # early, right behind it


def test_the_reported_start_is_when_the_batch_could_start():
    """Two batches reserved in the past, queued before the thread runs: the first is
    reported from its reserved start (the thread's late wake-up is the worker's time), the
    second from the first's finish (its wait behind the first is not)."""
    sink = _Sink(2)
    timing = EmulatedTiming("m", "T4", 1, 0, 0, (20_000.0,))
    worker = _worker(sink, executor=_FastExecutor(), emulation=timing)
    now = monotonic_us()
    worker.submit(_job(1, now - 5_000.0))
    worker.submit(_job(2, now - 4_000.0))
    worker.start()
    try:
        assert sink.done.wait(10)
    finally:
        worker.stop()
    assert sink.order == [1, 2]
    s1, f1 = sink.finished[1]
    s2, f2 = sink.finished[2]
    assert s1 == now - 5_000.0
    assert s2 == f1
    assert f1 - s1 >= 20_000.0 and f2 - s2 >= 20_000.0


# ---- the runtime ------------------------------------------------------------------------------

def _scaled(profile, factor: float):
    """``profile`` with every latency of its own class times ``factor`` (a profile that is
    wrong for this machine; its workers still run the real engines)."""
    tables = {k: replace(t, latency_us=tuple(tuple(x * factor for x in row)
                                             for row in t.latency_us))
              for k, t in profile.tables.items()}
    return replace(profile, tables=tables)


@pytest.fixture(scope="module")
def wrong_profile(cpu_builds):
    """demo_resnet built for this CPU, with a profile 10x too fast, and a two-stage plan of
    it (planned batch 2, a long SLO)."""
    from ppipe_trt.profiles import load_profiles

    built = cpu_builds[MODEL]
    profiles = ProfileSet({MODEL: _scaled(load_profiles(built.profile_path)[MODEL], 0.1)})
    plan = pipeline_plan(profiles, MODEL, cuts=[4], gpu_class="cpu", batch_size=2,
                         slo_ms=5_000.0)
    return built, profiles, plan


def _serve_one_at_a_time(rt, n: int) -> None:
    x = {"image": np.random.default_rng(0).standard_normal((1, 3, 224, 224))
         .astype(np.float32)}
    for _ in range(n):
        assert rt.submit(MODEL, x).result(timeout=30).outputs["logits"].shape == (1, 1000)


def _rows(rt):
    return [st.latency_us for st in rt.scheduler(MODEL).pipelines[0].stages]


def _wait_for(cond, timeout_s: float = 15.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_the_scheduler_plans_with_what_the_workers_take(wrong_profile):
    from api.metrics import calibration_families
    from ppipe_trt.serving.status import runtime_status

    built, profiles, plan = wrong_profile
    opts = RuntimeOptions(scheduler_kwargs={"work_conserving": True})
    with build_runtime(plan, profiles, {MODEL: built}, opts) as rt:
        assert not rt.models[MODEL].emulated and not rt.models[MODEL].timing_only
        profile_rows = _rows(rt)
        assert all(len(r) == 3 for r in profile_rows)       # batch sizes 1 and 2
        cal = rt.calibration_status()[MODEL]
        assert cal["planned_capacity_rps"] == cal["measured_capacity_rps"] > 0
        _serve_one_at_a_time(rt, 12)   # one at a time: batches of 1, reserved at once

        def settled():
            # a worker reports its finish after the answer, and a new row reaches the
            # scheduler through the loop: wait until every execution is counted and the
            # scheduler has the rows the calibrator handed over last
            stages = rt.calibration_status()[MODEL]["stages"]
            return all(st["executions"] == 12 and row != prof and
                       st["in_use_us"] == [round(x, 1) for x in row[1:]]
                       for st, row, prof in zip(stages, _rows(rt), profile_rows))

        assert _wait_for(settled), f"{_rows(rt)} {rt.calibration_status()}"
        rows = _rows(rt)
        cal = rt.calibration_status()[MODEL]
        status = runtime_status(rt)["calibration"]
        families = {f.name: f for f in calibration_families(rt)}
        stats = {w.info.stage: w.stats() for w in rt.workers}
    for stage, (row, prof) in enumerate(zip(rows, profile_rows)):
        # measured: real compute takes far more than the profile's tenth of it
        assert row[1] > 2.0 * prof[1], (stage, row, prof)
        # batch 2 was never measured: the profile's batch 2 scaled as batch 1 was
        assert row[2] == pytest.approx(prof[2] * row[1] / prof[1], rel=1e-9)
        st = cal["stages"][stage]
        assert (st["pipeline"], st["stage"]) == (0, stage)
        assert st["executions"] == 12
        assert st["profile_us"] == [round(x, 1) for x in prof[1:]]
        assert st["in_use_us"] == [round(x, 1) for x in row[1:]]
        (wid, by_batch), = st["workers"].items()
        assert set(by_batch) == {"1"} and by_batch["1"]["samples"] == 12
        # the estimate (quantile 0.95 of 12 samples: their max, recomputed at once for a
        # sample 5 % above it) covers the worker's mean compute: a batch occupies the worker
        # at least as long as it computes
        ws = stats[stage]
        measured = by_batch["1"]["measured_us"]
        assert ws.worker_id == int(wid) and ws.batches == 12
        assert 1.05 * measured >= ws.busy_us / ws.batches - 0.1
        # the scheduler has the row last handed over: within rel_change (5 %) of the estimate
        assert row[1] - 0.1 <= measured <= 1.05 * row[1] + 0.1
    # both capacities: the plan's with the profile, and what it has with the measurement
    tables = rt.scheduler(MODEL).pipelines
    measured = capacity_by_batch_rps(tables)[2]
    assert cal["measured_capacity_rps"] == pytest.approx(measured, abs=0.1)
    assert 0 < cal["measured_capacity_rps"] < 0.5 * cal["planned_capacity_rps"]
    assert status[MODEL]["planned_capacity_rps"] == cal["planned_capacity_rps"]
    caps = {s.labels["latencies"]: s.value for s in families["ppipe_capacity_rps"].samples}
    assert caps == {"profile": cal["planned_capacity_rps"],
                    "measured": cal["measured_capacity_rps"]}
    assert {"ppipe_stage_latency_profile_seconds", "ppipe_stage_latency_planned_seconds",
            "ppipe_worker_latency_measured_seconds"} <= set(families)


def test_without_calibration_the_profile_stays(wrong_profile):
    from api.metrics import calibration_families

    built, profiles, plan = wrong_profile
    opts = RuntimeOptions(calibrate=False, scheduler_kwargs={"work_conserving": True})
    with build_runtime(plan, profiles, {MODEL: built}, opts) as rt:
        profile_rows = _rows(rt)
        _serve_one_at_a_time(rt, 12)
        time.sleep(0.2)     # what a posted row would have needed to arrive
        assert _rows(rt) == profile_rows
        assert rt.calibration_status() == {}
        assert calibration_families(rt) == []


def test_an_emulated_class_is_not_calibrated(cpu_builds, emulated_class):
    """Real sub-graphs held to the profile of a slower class: their times are the
    profile's, nothing to measure."""
    from ppipe_trt.profiles import load_profiles

    built = cpu_builds[MODEL]
    profile = emulated_class(load_profiles(built.profile_path)[MODEL], "SLOW", 400.0)
    profiles = ProfileSet({MODEL: profile})
    plan = pipeline_plan(profiles, MODEL, cuts=[4], gpu_class="SLOW", slo_ms=5_000.0)
    with build_runtime(plan, profiles, {MODEL: built}) as rt:
        assert rt.models[MODEL].emulated
        profile_rows = _rows(rt)
        _serve_one_at_a_time(rt, 8)
        time.sleep(0.2)
        assert rt.calibration_status() == {}
        assert _rows(rt) == profile_rows


def test_a_timing_only_model_is_not_calibrated(cpu_builds):
    from ppipe_trt.profiles import load_profiles
    from ppipe_trt.serving.status import runtime_status

    profiles = load_profiles(cpu_builds[MODEL].profile_path)
    plan = pipeline_plan(profiles, MODEL, cuts=[4], gpu_class="cpu", slo_ms=5_000.0)
    with build_runtime(plan, profiles) as rt:
        assert rt.models[MODEL].timing_only
        profile_rows = _rows(rt)
        for _ in range(8):
            rt.submit(MODEL, None).result(timeout=30)
        time.sleep(0.2)
        assert rt.calibration_status() == {}
        assert runtime_status(rt)["calibration"] == {}
        assert _rows(rt) == profile_rows


class _DropSink(_Sink):
    def __init__(self):
        super().__init__(expect=1)
        self.failed = []

    def batch_failed(self, job, error, now_us):
        self.failed.append((job.dispatch.batch_id, error))
        self.done.set()


def _late_job(batch_id: int, now: float) -> StageJob:
    """A first-stage job reserved 10 ms long whose only request's deadline (with its grace)
    is 1 ms from now: it could only answer late."""
    route = (StageReservation(0, 0, now, now + 10_000.0, None, None),)
    req = Request(batch_id, "m", now, now + 500.0, grace_us=500.0)
    return StageJob(Dispatch(batch_id, "m", 0, (req,), route), 0)


def test_a_batch_that_could_only_answer_late_is_dropped_not_run():
    from ppipe_trt.errors import RequestRejectedError

    sink = _DropSink()
    w = _worker(sink, executor=_FastExecutor())
    w.start()
    try:
        w.submit(_late_job(1, monotonic_us()))
        assert sink.done.wait(5.0)
    finally:
        w.stop()
    assert not sink.finished           # never ran
    (bid, err), = sink.failed
    assert bid == 1 and isinstance(err, RequestRejectedError)
    assert err.reason == "deadline_unreachable" and "late" in str(err)


def test_an_emulated_worker_runs_a_late_batch_as_its_profile_says():
    sink = _DropSink()
    w = _worker(sink, executor=None, emulation=EmulatedTiming("m", "T4", 1, 0, 0, (100.0,)))
    w.start()
    try:
        w.submit(_late_job(1, monotonic_us()))
        assert sink.done.wait(5.0)
    finally:
        w.stop()
    assert not sink.failed and 1 in sink.finished
