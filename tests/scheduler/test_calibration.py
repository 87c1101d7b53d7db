"""Measured latencies replace the profile: the calibrator's rules, ``with_stage_latency``,
``set_stage_latency`` on every calibratable policy, the early stage-0 finish that pulls a
worker's reservations forward, and the work-conserving rule's ``min_gain``.

On a fake clock with hand-built completions.  The tests that take ``impl`` run against the
compiled scheduler and the Python reference (conftest's rule); those that take ``compiled``
run both side by side on the same events and compare every decision.
"""

from __future__ import annotations

import dataclasses
import os
import random
import threading

import pytest

from ppipe_trt.errors import ConfigError
from ppipe_trt.profiles.types import ProfileSet
from ppipe_trt.scheduler import build_schedulers, native, place_workers
from ppipe_trt.scheduler.calibration import (CalibrationOptions, LatencyCalibrator,
                                             StageCalibration, quantile)
from ppipe_trt.scheduler.interface import Request, Scheduler
from ppipe_trt.scheduler.tables import ClusterState, with_stage_latency
from ppipe_trt.scheduler.work_conserving import WorkConservingRule, capacity_by_batch_rps
from ppipe_trt.simulator.handplan import ModelSpec, hand_plan, synthetic_profile
from toys import CLUSTER, SLO_MS, decision_words, schedulers, toy_plan, toy_profiles

# The toy plan's tables (tests/scheduler/toys.py), index = batch size:
# pipeline 0 (planned batch 4): one stage on workers 0, 1
P0S0 = (0.0, 2000.0, 3000.0, 4000.0, 5000.0)
# pipeline 1 (planned batch 2): stage 0 on workers 2, 3; stage 1 on workers 4, 5
P1S0 = (0.0, 1600.0, 2400.0, 3200.0, 4000.0)
P1S1 = (0.0, 3000.0, 4500.0, 6000.0, 7500.0)


@pytest.fixture
def scheduler_impl():
    """(Overrides conftest's: only the tests that take ``impl`` run per implementation.)"""
    return None


@pytest.fixture(params=["compiled", "python"])
def impl(request, monkeypatch):
    """The scheduler implementation ``build_schedulers`` picks (conftest's rule)."""
    monkeypatch.delenv("PPIPE_NATIVE", raising=False)
    if request.param == "python":
        monkeypatch.setenv("PPIPE_NATIVE", "0")
    elif native.native_module() is None:
        _no_native()
    return request.param


@pytest.fixture
def compiled(monkeypatch):
    """The compiled module, for tests that run both implementations side by side."""
    monkeypatch.delenv("PPIPE_NATIVE", raising=False)
    if native.native_module() is None:
        _no_native()
    return native.native_module()


def _no_native():
    why = native.native_status()["detail"]
    if os.environ.get("PPIPE_REQUIRE_NATIVE") == "1":
        pytest.fail(f"the compiled scheduler is required here but not available: {why}")
    pytest.skip(f"compiled scheduler not available: {why}")


def _t(x):
    return "-" if x is None else repr(float(x))


def canon(dec) -> str:
    return " ".join(decision_words(dec, _t, details=True))


def _twins(plan=None, profiles=None, **kw):
    """The same plan's schedulers twice: (compiled, Python reference)."""
    plan = plan or toy_plan()
    profiles = profiles or toy_profiles()
    placement = place_workers(plan)
    return tuple(build_schedulers(plan, profiles, placement,
                                  state=ClusterState(placement, native=flag), **kw)
                 for flag in (True, False))


def _tables(plan, profiles, model):
    """``model``'s latency tables (as its scheduler has them; built by the reference)."""
    placement = place_workers(plan)
    return build_schedulers(plan, profiles, placement,
                            state=ClusterState(placement, native=False))[model].pipelines


@pytest.fixture
def tables():
    """The toy model's latency tables."""
    pts = _tables(toy_plan(), toy_profiles(), "toy")
    assert pts[0].stages[0].latency_us == P0S0
    assert pts[1].stages[0].latency_us == P1S0 and pts[1].stages[1].latency_us == P1S1
    return pts


def _feed(cal, pipeline, stage, worker, batch, values):
    """Observe every value; the rows returned, in order."""
    rows = []
    for v in values:
        row = cal.observe(pipeline, stage, worker, batch, v)
        if row is not None:
            rows.append(row)
    return rows


# ---- quantile and options ---------------------------------------------------------------------

def test_quantile_is_the_higher_nearest_rank():
    values = [float(x) for x in range(20, 0, -1)]       # 20 .. 1, unsorted on purpose
    assert quantile(values, 0.95) == 19.0               # rank ceil(19) = 19
    assert quantile(values, 0.5) == 10.0
    assert quantile(values, 1.0) == 20.0
    assert quantile(values, 1e-9) == 1.0
    assert quantile([float(x) for x in range(1, 11)], 0.95) == 10.0  # ceil(9.5) rounds up
    assert quantile([7.0], 0.5) == 7.0


@pytest.mark.parametrize("bad,match", [
    ({"quantile": 0.0}, "quantile must be in"),
    ({"quantile": 1.5}, "quantile must be in"),
    ({"window": 4, "min_samples": 5}, "min_samples <= window"),
    ({"min_samples": 0}, "min_samples <= window"),
    ({"window": 0, "min_samples": 0}, "min_samples <= window"),
    ({"rel_change": -0.1}, "rel_change must be >= 0"),
    ({"recompute_every": 0}, "recompute_every >= 1"),
])
def test_bad_calibration_options_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        CalibrationOptions(**bad)


# ---- the calibrator ---------------------------------------------------------------------------

def test_a_worker_counts_once_it_has_min_samples(tables):
    cal = LatencyCalibrator("toy", tables, CalibrationOptions(min_samples=6))
    assert _feed(cal, 0, 0, 0, 1, [4000.0] * 5) == []
    st = cal.status()["stages"][0]
    assert st["executions"] == 5 and st["workers"]["0"] == {}   # no estimate yet
    assert st["in_use_us"] == list(P0S0[1:])
    row = cal.observe(0, 0, 0, 1, 4000.0)
    # measured 2x the profile at batch 1; the other batch sizes scaled by the same ratio
    assert row == (0.0, 4000.0, 6000.0, 8000.0, 10000.0)
    st = cal.status()["stages"][0]
    assert st["workers"]["0"] == {"1": {"measured_us": 4000.0, "samples": 6}}
    assert st["in_use_us"] == [4000.0, 6000.0, 8000.0, 10000.0]
    assert st["profile_us"] == list(P0S0[1:])
    # the other stages keep their profile
    assert cal.current_tables()[1].stages[0].latency_us == P1S0
    assert cal.current_tables()[0].stages[0].latency_us == row


def test_the_estimate_is_the_quantile_of_the_last_window_samples(tables):
    opts = CalibrationOptions(quantile=0.5, window=8, min_samples=4, rel_change=0.0,
                              recompute_every=1)
    cal = LatencyCalibrator("toy", tables, opts)
    samples = [5000.0, 100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 700.0, 800.0, 900.0]
    rows = _feed(cal, 0, 0, 1, 1, samples)
    assert rows
    # the window holds the last 8 (200 .. 900): the median's higher nearest rank is 500
    last8 = samples[-8:]
    assert quantile(last8, 0.5) == 500.0
    assert rows[-1][1] == 500.0
    assert cal.status()["stages"][0]["workers"]["1"]["1"] == {"measured_us": 500.0,
                                                              "samples": 8}


def test_a_stage_takes_its_slowest_worker(tables):
    opts = CalibrationOptions(min_samples=2, window=4)
    cal = LatencyCalibrator("toy", tables, opts)
    _feed(cal, 0, 0, 0, 1, [1000.0] * 4)
    _feed(cal, 0, 0, 1, 1, [3000.0] * 4)
    assert cal.current_tables()[0].stages[0].latency_us[1] == 3000.0
    _feed(cal, 0, 0, 0, 1, [3500.0] * 4)     # now worker 0 is the slower one
    assert cal.current_tables()[0].stages[0].latency_us[1] == 3500.0


def test_unmeasured_batch_sizes_scale_by_the_nearest_measured_one_ties_to_the_larger(tables):
    opts = CalibrationOptions(min_samples=2, window=4, rel_change=0.0)
    cal = LatencyCalibrator("toy", tables, opts)
    _feed(cal, 0, 0, 0, 1, [1000.0] * 2)     # batch 1: half the profile's 2000
    rows = _feed(cal, 0, 0, 0, 3, [8000.0] * 2)   # batch 3: twice the profile's 4000
    # batch 2 lies as near to 1 as to 3: the larger (3) gives the ratio; batch 4 is nearest 3
    assert rows[-1] == (0.0, 1000.0, 2.0 * P0S0[2], 8000.0, 2.0 * P0S0[4])


def test_the_row_never_decreases_in_batch_size(tables):
    opts = CalibrationOptions(min_samples=2, window=4, rel_change=0.0)
    cal = LatencyCalibrator("toy", tables, opts)
    _feed(cal, 0, 0, 0, 1, [3000.0] * 2)     # batch 1: 1.5 x the profile
    rows = _feed(cal, 0, 0, 0, 2, [1000.0] * 2)   # batch 2 measured faster than batch 1
    row = rows[-1]
    # batch 2 (1000), batch 3 and 4 (scaled by batch 2's ratio 1/3: 1333, 1667) are
    # raised to batch 1's 3000
    assert row == (0.0, 3000.0, 3000.0, 3000.0, 3000.0)
    sc = StageCalibration(0, 0, (0.0, 10.0, 20.0, 30.0), (7,))
    assert sc.row_us() == (0.0, 10.0, 20.0, 30.0)            # nothing measured: the profile
    sc.workers[7].estimate.update({1: 50.0, 3: 40.0})
    assert sc.row_us() == (0.0, 50.0, 50.0, 50.0)
    assert all(a <= b for a, b in zip(sc.row_us()[1:], sc.row_us()[2:]))


def test_a_row_is_returned_only_when_it_moved_by_more_than_rel_change(tables):
    opts = CalibrationOptions(quantile=1.0, window=64, min_samples=6, rel_change=0.05,
                              recompute_every=4)
    cal = LatencyCalibrator("toy", tables, opts)
    # within 5 % of the profile (2000 at batch 1): never handed to the scheduler
    assert _feed(cal, 0, 0, 0, 1, [2090.0] * 30) == []
    assert cal.status()["stages"][0]["workers"]["0"]["1"]["measured_us"] == 2090.0
    assert cal.current_tables()[0].stages[0].latency_us == P0S0
    # a slow-down beyond 5 % is heard at the first sample (quantile 1.0: the max)
    row = cal.observe(0, 0, 0, 1, 2200.0)
    assert row is not None and row[1] == 2200.0
    # again within 5 % of the row returned last: nothing
    assert _feed(cal, 0, 0, 0, 1, [2250.0] * 10) == []
    assert cal.current_tables()[0].stages[0].latency_us[1] == 2200.0
    row = cal.observe(0, 0, 0, 1, 2400.0)
    assert row is not None and row[1] == 2400.0


def test_a_speed_up_is_heard_once_the_window_forgets_the_slow_samples(tables):
    opts = CalibrationOptions(quantile=1.0, window=8, min_samples=4, rel_change=0.05,
                              recompute_every=4)
    cal = LatencyCalibrator("toy", tables, opts)
    first = _feed(cal, 0, 0, 0, 1, [4000.0] * 8)
    assert [r[1] for r in first] == [4000.0]
    rows = _feed(cal, 0, 0, 0, 1, [1000.0] * 8)   # the max of the window drops to 1000 ...
    assert [r[1] for r in rows] == [1000.0]       # ... once all 4000s left it, recomputed
    assert cal.current_tables()[0].stages[0].latency_us == (0.0, 1000.0, 1500.0, 2000.0,
                                                            2500.0)


@pytest.mark.parametrize("args", [
    (2, 0, 0, 1, 5000.0),      # no pipeline 2
    (0, 1, 0, 1, 5000.0),      # pipeline 0 has one stage
    (-1, 0, 0, 1, 5000.0),
    (0, 0, 0, 0, 5000.0),      # batch 0
    (0, 0, 0, 5, 5000.0),      # beyond the tables' batch sizes (1..4)
    (0, 0, 0, -1, 5000.0),
    (0, 0, 0, 1, 0.0),         # no occupancy
    (0, 0, 0, 1, -3.0),
    (0, 0, 0, 1, float("nan")),
])
def test_what_the_tables_do_not_cover_is_ignored(tables, args):
    cal = LatencyCalibrator("toy", tables, CalibrationOptions(min_samples=1, window=1))
    assert cal.observe(*args) is None
    assert all(st["executions"] == 0 for st in cal.status()["stages"])
    assert cal.current_tables() == tuple(tables)


def test_a_worker_the_plan_does_not_name_is_still_measured(tables):
    cal = LatencyCalibrator("toy", tables, CalibrationOptions(min_samples=1, window=1))
    row = cal.observe(1, 1, 99, 2, 9000.0)
    assert row is not None and row[2] == 9000.0
    assert cal.status()["stages"][2]["workers"]["99"]["2"]["measured_us"] == 9000.0


def test_capacities_follow_the_measured_rows(tables):
    cal = LatencyCalibrator("toy", tables, CalibrationOptions(min_samples=1, window=1))
    planned, measured = cal.capacity_rps()
    # pipeline 0: 2 workers x 4 / 5 ms = 1600 req/s; pipeline 1: stage 1 bounds it,
    # 2 workers x 2 / 4.5 ms = 888.9 req/s
    assert planned == measured == pytest.approx(1600.0 + 4e6 / 4500.0)
    cal.observe(0, 0, 0, 4, 10_000.0)             # pipeline 0 twice as slow at batch 4
    planned2, measured2 = cal.capacity_rps()
    assert planned2 == planned
    assert measured2 == pytest.approx(800.0 + 4e6 / 4500.0)
    assert measured2 == pytest.approx(capacity_by_batch_rps(cal.current_tables())[4])
    status = cal.status()
    assert status["planned_capacity_rps"] == round(planned, 1)
    assert status["measured_capacity_rps"] == round(measured2, 1)
    assert status["quantile"] == 0.95 and status["window"] == 1
    assert [(s["pipeline"], s["stage"]) for s in status["stages"]] == [(0, 0), (1, 0), (1, 1)]


def test_workers_report_from_many_threads(tables):
    """4 threads, each a worker of pipeline 0 at its own speed, observe concurrently: every
    execution is counted, every row returned is well formed, and the rows end at the slowest
    worker's figures."""
    opts = CalibrationOptions(min_samples=4, window=16, rel_change=0.0, recompute_every=1)
    cal = LatencyCalibrator("toy", tables, opts)
    rows, errors = [], []
    rows_lock = threading.Lock()
    barrier = threading.Barrier(4)

    def worker(wid):
        try:
            barrier.wait(5)
            for k in range(400):
                b = 1 + k % 4
                row = cal.observe(0, 0, wid, b, P0S0[b] * (1.0 + 0.25 * wid))
                if row is not None:
                    with rows_lock:
                        rows.append(row)
        except Exception as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not errors
    assert cal.status()["stages"][0]["executions"] == 1600
    assert rows
    for row in rows:
        assert len(row) == 5 and all(a <= b for a, b in zip(row[1:], row[2:]))
    # worker 3 is 1.75x the profile at every batch size
    assert cal.current_tables()[0].stages[0].latency_us == tuple(1.75 * x for x in P0S0)


# ---- with_stage_latency ---------------------------------------------------------------------

def test_with_stage_latency_replaces_one_row(tables):
    new = (0.0, 10.0, 20.0, 30.0, 40.0)
    out = with_stage_latency(tables, 1, 1, new)
    assert isinstance(out, tuple) and len(out) == 2
    assert out[1].stages[1].latency_us == new
    assert out[1].stages[0] == tables[1].stages[0] and out[0] == tables[0]
    assert out[1].stages[1].transfer_in_us == tables[1].stages[1].transfer_in_us
    assert out[1].stages[1].worker_ids == tables[1].stages[1].worker_ids
    assert tables[1].stages[1].latency_us == P1S1          # the input is not changed
    # index 0 (unused) may be anything; entries become floats
    assert with_stage_latency(tables, 0, 0, [7, 1, 2, 3, 4])[0].stages[0].latency_us == \
        (7.0, 1.0, 2.0, 3.0, 4.0)


@pytest.mark.parametrize("pipeline,stage,row,match", [
    (0, 0, (0.0, 1.0, 2.0, 3.0), r"a latency row of 4 entries for a table of 5 \(batch "
                                 r"sizes 0..4\)"),
    (0, 0, (0.0, 1.0, 2.0, 3.0, 4.0, 5.0), "a latency row of 6 entries for a table of 5"),
    (0, 0, (0.0, 1.0, 0.0, 3.0, 4.0), r"latencies must be > 0, got \[1.0, 0.0, 3.0, 4.0\]"),
    (1, 1, (0.0, 1.0, 2.0, -3.0, 4.0), "pipeline 1 stage 1: latencies must be > 0"),
    (0, 0, (0.0, 1.0, float("nan"), 3.0, 4.0), "latencies must be > 0"),
    (2, 0, (0.0, 1.0, 2.0, 3.0, 4.0), "no stage 0 of pipeline 2 in these tables"),
    (0, 1, (0.0, 1.0, 2.0, 3.0, 4.0), "no stage 1 of pipeline 0 in these tables"),
    (-1, 0, (0.0, 1.0, 2.0, 3.0, 4.0), "no stage 0 of pipeline -1"),
    (1, -1, (0.0, 1.0, 2.0, 3.0, 4.0), "no stage -1 of pipeline 1"),
])
def test_with_stage_latency_refuses_a_bad_row(tables, pipeline, stage, row, match):
    with pytest.raises(ConfigError, match=match):
        with_stage_latency(tables, pipeline, stage, row)


# ---- set_stage_latency ------------------------------------------------------------------------

def test_only_policies_with_latency_tables_are_calibratable():
    assert Scheduler.calibratable is False

    class Fixed(Scheduler):   # a policy of its own, with no tables
        def on_arrival(self, request, now_us):
            raise NotImplementedError

        def on_wake(self, now_us):
            raise NotImplementedError

        def on_stage_finished(self, batch_id, stage, finish_us, now_us):
            raise NotImplementedError

        def remove_worker(self, worker_id, now_us):
            raise NotImplementedError

        def add_worker(self, worker_id, now_us):
            raise NotImplementedError

    with pytest.raises(NotImplementedError, match="Fixed plans from no latency table"):
        Fixed().set_stage_latency(0, 0, (0.0, 1.0))


@pytest.mark.parametrize("work_conserving", [False, True])
def test_new_dispatches_reserve_the_new_latencies(impl, work_conserving):
    scheds, _ = schedulers(work_conserving=work_conserving)
    s = scheds["toy"]
    assert s.calibratable and type(s).__name__ == ("NativeReservationScheduler"
                                                  if impl == "compiled"
                                                  else "ReservationScheduler")
    caps_before = [s._early.capacity_rps(n) for n in range(5)] if work_conserving else None
    p0 = (0.0, 2500.0, 4000.0, 5500.0, 7000.0)
    p1s1 = (0.0, 3300.0, 5100.0, 6900.0, 8700.0)
    s.set_stage_latency(0, 0, p0)
    s.set_stage_latency(1, 1, p1s1)
    assert s.pipelines[0].stages[0].latency_us == p0
    assert s.pipelines[1].stages[1].latency_us == p1s1
    assert s.pipelines[1].stages[0].latency_us == P1S0
    dec = s.on_arrivals([Request(i, "toy", 0.0, 1e6) for i in range(12)], 0.0)
    by_pipe = {}
    for d in dec.dispatches:
        by_pipe.setdefault(d.pipeline, []).append(d)
        b = d.batch_size
        for r in d.route:
            row = s.pipelines[d.pipeline].stages[r.stage].latency_us
            assert r.finish_us - r.start_us == row[b]
    assert by_pipe[0] and by_pipe[1]
    assert {d.route[0].finish_us - d.route[0].start_us for d in by_pipe[0]} == {p0[4]}
    assert {d.route[1].finish_us - d.route[1].start_us for d in by_pipe[1]} == {p1s1[2]}
    if work_conserving:
        want = capacity_by_batch_rps(s.pipelines)
        assert [s._early.capacity_rps(n) for n in range(5)] == want
        assert want != caps_before
        assert s._early.capacity_rps(4) == pytest.approx(2 * 4e6 / 7000.0 + 2 * 2e6 / 5100.0)


def test_a_bad_row_changes_nothing(impl):
    s = schedulers(work_conserving=True)[0]["toy"]
    before = s.pipelines
    caps = [s._early.capacity_rps(n) for n in range(5)]
    with pytest.raises(ConfigError, match="a latency row of 3 entries for a table of 5"):
        s.set_stage_latency(0, 0, (0.0, 1.0, 2.0))
    with pytest.raises(ConfigError, match="no stage 2 of pipeline 1"):
        s.set_stage_latency(1, 2, P1S1)
    assert s.pipelines == before
    assert [s._early.capacity_rps(n) for n in range(5)] == caps
    d = s.on_arrivals([Request(i, "toy", 0.0, 1e6) for i in range(4)], 0.0).dispatches[0]
    assert d.route[0].finish_us - d.route[0].start_us == P0S0[4]


@pytest.mark.parametrize("policy", ["reactive", "triton"])
def test_the_baselines_take_the_new_latencies(impl, policy):
    s = schedulers(policy=policy)[0]["toy"]
    assert s.calibratable
    p0 = (0.0, 2100.0, 3300.0, 4500.0, 5700.0)
    p1s0 = (0.0, 1700.0, 2500.0, 3300.0, 4100.0)
    p1s1 = (0.0, 3100.0, 4600.0, 6100.0, 7600.0)
    s.set_stage_latency(0, 0, p0)
    s.set_stage_latency(1, 0, p1s0)
    s.set_stage_latency(1, 1, p1s1)
    dec = s.on_arrivals([Request(i, "toy", 0.0, 1e6) for i in range(8)], 0.0)
    assert dec.dispatches
    want = {(0, 0): p0, (1, 0): p1s0, (1, 1): p1s1}
    for d in dec.dispatches:
        for r in d.route:
            assert r.finish_us - r.start_us == want[(d.pipeline, r.stage)][d.batch_size]
    # a request's remaining work (reactive: which queue waits least) follows the new rows
    hop = s.pipelines[1].stages[1].transfer_in_us[1]
    assert hop == 100.0
    assert s._rest1 == [[p0[1]], [p1s0[1] + hop + p1s1[1], hop + p1s1[1]]]
    with pytest.raises(ConfigError, match="latencies must be > 0"):
        s.set_stage_latency(0, 0, (0.0, 0.0, 1.0, 2.0, 3.0))


# ---- an early first-stage finish pulls the worker's reservations forward ----------------------

def _busy_toy(s):
    """24 requests at 0 on the toy plan: worker 0 runs batches 0 [0, 5 ms] and 6 [5, 10 ms]
    (pipeline 0); worker 4 runs stage 1 of batches 2 [2.6, 7.1 ms] and 4 [7.1, 11.6 ms]."""
    dec = s.on_arrivals([Request(i, "toy", 0.0, 1e6) for i in range(24)], 0.0)
    routes = {d.batch_id: [(r.worker_id, r.start_us, r.finish_us) for r in d.route]
              for d in dec.dispatches}
    assert routes[0] == [(0, 0.0, 5000.0)] and routes[6] == [(0, 5000.0, 10000.0)]
    assert routes[2][1] == (4, 2600.0, 7100.0) and routes[4][1] == (4, 7100.0, 11600.0)
    return dec


def test_an_early_first_stage_finish_pulls_the_workers_later_batches_forward(impl):
    s = schedulers()[0]["toy"]
    _busy_toy(s)
    assert s.reserved_until(0) == 10000.0
    dec = s.on_stage_finished(0, 0, 4000.0, 4000.0)   # 1 ms early, batch 6 behind it
    assert not dec.dispatches
    assert s.reserved_until(0) == 9000.0
    # a new batch on pipeline 0 goes behind batch 6 at its pulled-forward end
    d = s.on_arrivals([Request(100 + i, "toy", 4000.0, 1e6) for i in range(4)],
                      4000.0).dispatches
    assert d and d[0].pipeline == 0 and d[0].route[0].start_us == 9000.0


def test_an_early_later_stage_finish_does_not_pull_forward(impl):
    s = schedulers()[0]["toy"]
    _busy_toy(s)
    assert s.reserved_until(4) == 11600.0
    s.on_stage_finished(2, 0, 2400.0, 2400.0)
    s.on_stage_finished(2, 1, 6100.0, 6100.0)        # stage 1, 1 ms early, batch 4 behind
    # batch 4's stage 1 waits for its input and its reserved start: nothing moves
    assert s.reserved_until(4) == 11600.0


def test_a_late_finish_pushes_back_as_before(impl):
    s = schedulers()[0]["toy"]
    _busy_toy(s)
    s.on_stage_finished(1, 0, 5400.0, 5400.0)        # worker 1, 400 us late, batch 7 behind
    assert s.reserved_until(1) == 10400.0


@pytest.mark.parametrize("finish", [4200.0, 5600.0])
def test_the_last_reservation_on_a_worker_takes_the_truth(impl, finish):
    s = schedulers()[0]["toy"]
    d = s.on_arrivals([Request(i, "toy", 0.0, 1e6) for i in range(4)], 0.0).dispatches[0]
    w = d.route[0].worker_id
    assert s.reserved_until(w) == d.route[0].finish_us == 5000.0
    s.on_stage_finished(d.batch_id, 0, finish, finish)
    assert s.reserved_until(w) == finish


def test_a_pulled_forward_batch_finishing_as_expected_leaves_the_worker_free_then(impl):
    s = schedulers()[0]["toy"]
    _busy_toy(s)
    s.on_stage_finished(0, 0, 4000.0, 4000.0)        # 1 ms early: batch 6 starts at 4 ms
    assert s.reserved_until(0) == 9000.0
    # batch 6 takes its reserved 5 ms from 4 ms: worker 0 is free at 9 ms, no earlier
    s.on_stage_finished(6, 0, 9000.0, 9000.0)
    assert s.reserved_until(0) == 9000.0


def test_both_implementations_pull_forward_alike(compiled):
    a, b = (x["toy"] for x in _twins())
    for s in (a, b):
        _busy_toy(s)
    now = 0.0
    for bid, stage, finish in ((0, 0, 4000.0), (2, 0, 2100.0), (3, 0, 2400.0),
                               (1, 0, 3500.0), (4, 0, 3900.0), (2, 1, 6000.0)):
        now = max(now, finish)
        da = a.on_stage_finished(bid, stage, finish, now)
        db = b.on_stage_finished(bid, stage, finish, now)
        assert canon(da) == canon(db)
        assert [a.reserved_until(w) for w in range(6)] == [b.reserved_until(w)
                                                           for w in range(6)]
    assert a.reserved_until(0) == 9000.0 and a.reserved_until(1) == 8500.0
    arrivals = [Request(200 + i, "toy", now, now + 15_000.0) for i in range(10)]
    assert canon(a.on_arrivals(arrivals, now)) == canon(b.on_arrivals(arrivals, now))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("options", [{}, {"work_conserving": True},
                                     {"work_conserving": True, "work_conserving_min_gain": 0.1}],
                         ids=["ppipe", "work-conserving", "min-gain"])
def test_recalibrated_schedulers_decide_alike(compiled, seed, options):
    """Random bursts, finishes on time, early and late, and new latency rows now and then:
    the compiled scheduler and the reference make the same decisions, reserve the same
    times and keep the same capacities."""
    a, b = _twins(toy_plan(with_other=True), toy_profiles(), **options)
    rng = random.Random(seed)
    models = ["toy", "other"]
    workers = {m: sorted({w for pt in a[m].pipelines for st in pt.stages
                          for w in st.worker_ids}) for m in models}
    inflight = []          # [model, batch id, next stage, route]
    now, rid, pulled, recalibrated = 0.0, 0, 0, 0
    for _ in range(700):
        now += rng.expovariate(1 / 500.0)
        model = rng.choice(models)
        kind = rng.random()
        if kind < 0.4:
            reqs = [Request(rid + k, model, now, now + SLO_MS * 1000.0 * rng.choice((1.0, 0.5)))
                    for k in range(rng.choice((1, 1, 2, 5, 9)))]
            rid += len(reqs)
            da, db = a[model].on_arrivals(reqs, now), b[model].on_arrivals(reqs, now)
        elif kind < 0.8 and inflight:
            i = rng.randrange(len(inflight))
            model, bid, stage, route = inflight[i]
            r = route[stage]
            finish = max(r.finish_us + rng.choice((0.0, -300.0, -900.0, 400.0)),
                         r.start_us + 1.0)
            now = max(now, finish)
            if stage == 0 and finish < r.finish_us and \
                    a[model].reserved_until(r.worker_id) > r.finish_us:
                pulled += 1
            da = a[model].on_stage_finished(bid, stage, finish, now)
            db = b[model].on_stage_finished(bid, stage, finish, now)
            if stage + 1 < len(route):
                inflight[i] = [model, bid, stage + 1, route]
            else:
                inflight.pop(i)
        elif kind < 0.9:
            p = rng.randrange(len(a[model].pipelines))
            st = rng.randrange(len(a[model].pipelines[p].stages))
            old = a[model].pipelines[p].stages[st].latency_us
            f = rng.uniform(0.5, 2.0)
            row = (0.0,) + tuple(x * f for x in old[1:])
            a[model].set_stage_latency(p, st, row)
            b[model].set_stage_latency(p, st, row)
            recalibrated += 1
            assert a[model].pipelines == b[model].pipelines
            if "work_conserving" in options:
                n = len(capacity_by_batch_rps(a[model].pipelines))
                assert [a[model]._early.capacity_rps(k) for k in range(n)] == \
                    [b[model]._early.capacity_rps(k) for k in range(n)]
            continue
        else:
            da, db = a[model].on_wake(now), b[model].on_wake(now)
        assert canon(da) == canon(db)
        for d in da.dispatches:
            inflight.append([model, d.batch_id, 0, d.route])
        for w in workers[model]:
            assert a[model].reserved_until(w) == b[model].reserved_until(w)
        assert a[model].queue_length == b[model].queue_length
    assert pulled > 5 and recalibrated > 30


# ---- work-conserving min_gain -------------------------------------------------------------------

def _one_stage_plan(model: str, batch_growth: float):
    """One pipeline, planned batch 4, one stage on 2 H workers: batch b takes
    1000 x (1 + batch_growth (b - 1)) us (growth 1.0: the time per sample is flat)."""
    prof = synthetic_profile(model, {("H", 1): [1000.0]}, batch_growth=batch_growth)
    profiles = ProfileSet({model: prof}, model)
    return hand_plan(profiles, CLUSTER, [ModelSpec(model, SLO_MS, [(4, [(0, 0, "H", 1, 2)])])]), \
        profiles


def _lone_request_after_a_burst(model, batch_growth, min_gain):
    """A full batch at 0 (worker A busy until 4 ms at most), then one request at 10 us with
    the rate estimate far above capacity (window 1 ms); worker B is free."""
    plan, profiles = _one_stage_plan(model, batch_growth)
    s = build_schedulers(plan, profiles, place_workers(plan), work_conserving=True,
                         work_conserving_window_us=1000.0,
                         work_conserving_min_gain=min_gain)[model]
    first = s.on_arrivals([Request(i, model, 0.0, SLO_MS * 1000.0) for i in range(4)], 0.0)
    assert [d.batch_size for d in first.dispatches] == [4]
    lone = s.on_arrival(Request(9, model, 10.0, 10.0 + SLO_MS * 1000.0), 10.0)
    assert s._early.rate_rps(10.0) > 2.0 * s._early.capacity_rps(1)   # a high rate
    return s, first, lone


def test_min_gain_sends_a_lone_request_at_once_where_batching_gains_nothing(impl):
    s, _, lone = _lone_request_after_a_burst("flat", 1.0, 0.1)
    assert s._early.min_gain == 0.1
    assert [s._early.batching_gains_little(n) for n in range(6)] == [False] + [True] * 5
    assert len(lone.dispatches) == 1
    d = lone.dispatches[0]
    assert d.batch_size == 1 and d.route[0].start_us == 10.0
    assert d.route[0].finish_us == 1010.0
    # without min_gain the same request waits (PPipe's rule at this rate)
    _, _, held = _lone_request_after_a_burst("flat", 1.0, None)
    assert not held.dispatches and held.wake_at_us > 10.0


def test_min_gain_keeps_holding_where_batching_pays(impl):
    s, first, lone = _lone_request_after_a_burst("gainy", 0.2, 0.1)
    # batch b serves b / (1 + 0.2 (b - 1)): batch 4 serves 2.5x, 1.5x, 1.17x what batches of
    # 1, 2, 3 serve (at the planned batch itself the test holds trivially)
    assert [s._early.batching_gains_little(n) for n in range(6)] == [False] * 4 + [True] * 2
    assert not lone.dispatches and lone.wake_at_us > 10.0
    _, first_none, lone_none = _lone_request_after_a_burst("gainy", 0.2, None)
    assert canon(first) == canon(first_none) and canon(lone) == canon(lone_none)


def test_batching_gains_little_on_the_toy_plan(impl):
    s = schedulers(work_conserving=True, work_conserving_min_gain=0.1)[0]["toy"]
    caps = capacity_by_batch_rps(s.pipelines)
    # batch 4 serves 4.2 % more than batch 3, 12 % more than batch 2, 49 % more than batch 1
    assert caps[4] / caps[3] < 1.1 < caps[4] / caps[2]
    assert [s._early.batching_gains_little(n) for n in range(7)] == \
        [False, False, False, True, True, True, True]
    assert not schedulers(work_conserving=True)[0]["toy"]._early.batching_gains_little(4)


@pytest.mark.parametrize("bad", [-0.1, float("nan")])
def test_a_negative_min_gain_is_refused(impl, bad):
    with pytest.raises(ConfigError, match="work_conserving_min_gain must be >= 0 or None"):
        schedulers(work_conserving=True, work_conserving_min_gain=bad)


@pytest.mark.parametrize("seed", range(6))
def test_the_compiled_min_gain_rule_matches_the_reference(compiled, seed):
    """Random arrivals and queries on a flat and on a batching profile, with capacities that
    change (set_pipelines): every answer equal to the bit."""
    rng = random.Random(1000 + seed)
    model, growth = rng.choice((("flat", 1.0), ("gainy", 0.2), ("mild", 0.9)))
    pipelines = _tables(*_one_stage_plan(model, growth), model)
    if rng.random() < 0.3:
        model, pipelines = "toy", _tables(toy_plan(), toy_profiles(), "toy")
    max_load = rng.choice((0.5, 0.2, 1.0))
    window = rng.choice((100_000.0, 5_000.0))
    min_gain = rng.choice((0.0, 0.05, 0.1, 0.5))
    ref = WorkConservingRule(pipelines, max_load, window, min_gain)
    com = compiled.NativeWorkConservingRule(pipelines, max_load, window, min_gain)
    assert com.min_gain == ref.min_gain == min_gain
    allowed_by_gain = 0
    t = 0.0
    for step in range(2000):
        t += rng.expovariate(1 / rng.choice((50.0, 500.0, 20_000.0)))
        when = t - rng.choice((0.0, 0.0, 300.0))
        ref.observe(when)
        com.observe(when)
        now = t + rng.uniform(0.0, 3000.0)
        for n in (0, 1, 2, 3, rng.randint(4, 12)):
            assert com.batching_gains_little(n) == ref.batching_gains_little(n)
            assert com.allows(n, now) == ref.allows(n, now)
            assert com.allowed_at(n, now) == ref.allowed_at(n, now)
            if ref.batching_gains_little(n) and \
                    not ref.rate_rps(now) <= ref.max_load * ref.capacity_rps(n):
                allowed_by_gain += 1
                assert ref.allows(n, now) and ref.allowed_at(n, now) == now
        if step % 400 == 399:   # re-measured latencies: both take the new capacities
            f = rng.uniform(0.5, 2.0)
            pipelines = with_stage_latency(
                pipelines, 0, 0, (0.0,) + tuple(x * f for x in
                                                pipelines[0].stages[0].latency_us[1:]))
            ref.set_pipelines(pipelines)
            com.set_pipelines(pipelines)
            assert com._capacity_rps == ref._capacity_rps == capacity_by_batch_rps(pipelines)
    if min_gain > 0.0 and model == "flat" and len(pipelines) == 1:
        assert allowed_by_gain > 0


def test_the_compiled_rule_refuses_capacities_of_another_length(compiled):
    rule = compiled.NativeWorkConservingRule(_tables(toy_plan(), toy_profiles(), "toy"),
                                             0.5, 100_000.0, 0.1)
    flat = _tables(*_one_stage_plan("flat", 1.0), "flat")
    rule.set_pipelines(flat)                                 # both batch sizes 0..4
    assert rule._capacity_rps == capacity_by_batch_rps(flat)
    smaller = (dataclasses.replace(flat[0], planned_batch=2),)
    with pytest.raises(ConfigError, match="3 capacities for a rule of 5"):
        rule.set_pipelines(smaller)
    assert rule._capacity_rps == capacity_by_batch_rps(flat)
