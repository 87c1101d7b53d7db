"""The reservation policy's work-conserving option, on a fake clock."""

from __future__ import annotations

import pytest

from ppipe_trt.errors import ConfigError
from ppipe_trt.scheduler.interface import Request
from ppipe_trt.scheduler.work_conserving import WorkConservingRule, capacity_by_batch_rps
from toys import SLO_MS, FakeClockDriver, poisson_times, schedulers

# toy pipeline 0: batch 4 on 2 H workers, 2000 * (1 + 0.5 (b - 1)) us at batch b
P0_LAT = {b: 2000.0 * (1 + 0.5 * (b - 1)) for b in range(1, 9)}


def test_an_idle_pipeline_takes_a_lone_request_at_once():
    scheds, _ = schedulers(work_conserving=True)
    s = scheds["toy"]
    dec = s.on_arrival(Request(1, "toy", 0.0, SLO_MS * 1000), 0.0)
    assert len(dec.dispatches) == 1
    d = dec.dispatches[0]
    assert d.batch_size == 1 and d.pipeline == 0
    assert d.route[0].start_us == 0.0
    assert d.finish_us == P0_LAT[1]
    assert dec.wake_at_us is None


def test_ppipe_behaviour_is_kept_without_the_option():
    scheds, _ = schedulers(work_conserving=False)
    dec = scheds["toy"].on_arrival(Request(1, "toy", 0.0, SLO_MS * 1000), 0.0)
    assert not dec.dispatches
    assert dec.wake_at_us == pytest.approx(SLO_MS * 1000 - P0_LAT[1], abs=0.01)


def test_a_busy_route_wakes_when_it_frees_not_at_the_last_moment():
    scheds, _ = schedulers(work_conserving=True)
    s = scheds["toy"]
    # occupy both pipeline-0 workers, and pipeline 1's, with full batches
    t = 0.0
    rid = 0
    busy = []
    for _ in range(4 + 2 + 4):
        dec = s.on_arrival(Request(rid, "toy", t, t + SLO_MS * 1000), t)
        busy.extend(dec.dispatches)
        rid += 1
    dec = s.on_arrival(Request(rid, "toy", t, t + SLO_MS * 1000), t)
    if dec.dispatches:  # a route was still free: then it went at once
        assert dec.dispatches[0].route[0].start_us == t
        return
    assert dec.wake_at_us is not None
    # it wakes when a worker it waits for frees, long before PPipe's last moment
    frees = {r.finish_us for d in busy for r in d.route}
    assert min(abs(dec.wake_at_us - f) for f in frees) < 1e-6
    assert dec.wake_at_us < SLO_MS * 1000 - P0_LAT[1] - 1.0
    woken = s.on_wake(dec.wake_at_us)
    assert len(woken.dispatches) == 1
    assert woken.dispatches[0].route[0].start_us == dec.wake_at_us


def test_under_load_batches_still_form():
    """At a rate above what batch-1 dispatch could serve, the rule never fires and batches
    are as large as the PPipe policy makes them."""
    horizon = 1_000_000.0
    warm = 300_000.0   # the rate estimate starts at 0: the first ~window it under-counts
    sizes = {}
    for wc in (False, True):
        scheds, _ = schedulers(work_conserving=wc)
        drv = FakeClockDriver(scheds)
        for i, t in enumerate(poisson_times(1500.0, horizon, 3)):
            drv.arrive(t, "toy", rid=i)
        drv.run()
        n = [d.batch_size for d in drv.dispatches]
        assert sum(n) + len(drv.drops) == len(drv.arrived)
        n = [d.batch_size for d in drv.dispatches if d.requests[0].arrival_us >= warm]
        sizes[wc] = sum(n) / len(n)
    assert sizes[True] > 1.5
    assert sizes[True] == pytest.approx(sizes[False], rel=0.15)


def test_low_load_latency_is_the_execution_time():
    scheds, _ = schedulers(work_conserving=True)
    drv = FakeClockDriver(scheds)
    for i, t in enumerate(poisson_times(50.0, 2_000_000, 5)):
        drv.arrive(t, "toy", rid=i)
    drv.run()
    assert not drv.drops
    arrival = {r.request_id: r.arrival_us for r in drv.arrived}
    lat = sorted(d.finish_us - arrival[r.request_id] for d in drv.dispatches
                 for r in d.requests)
    assert lat[len(lat) // 2] <= 1.5 * P0_LAT[1]


def test_rate_estimate_and_capacity():
    scheds, _ = schedulers()
    tables = scheds["toy"].pipelines
    caps = capacity_by_batch_rps(tables)
    # pipeline 0 alone at batch 1: 2 workers x 1 / 2 ms = 1000 req/s; pipeline 1 adds more
    assert caps[1] > 1000.0
    assert caps[4] > caps[1]
    rule = WorkConservingRule(tables, max_load=0.5, window_us=100_000.0)
    for k in range(2000):
        rule.observe(k * 1000.0)        # 1000 req/s for 2 s
    assert rule.rate_rps(2_000_000.0) == pytest.approx(1000.0, rel=0.06)
    assert not rule.allows(1, 2_000_000.0) or caps[1] * 0.5 >= 950.0
    assert rule.rate_rps(4_000_000.0) < 1.0   # decays once arrivals stop
    assert rule.allows(1, 4_000_000.0)


@pytest.mark.parametrize("bad", [{"work_conserving_max_load": 0.0},
                                 {"work_conserving_max_load": 1.5},
                                 {"work_conserving_window_us": 0.0}])
def test_bad_options_are_refused(bad):
    with pytest.raises(ConfigError, match="work_conserving"):
        schedulers(work_conserving=True, **bad)


def test_light_traffic_takes_the_fastest_idle_pipeline():
    """Pipeline 0 runs the model on L (6 ms at batch 1), pipeline 1 on H (2 ms): PPipe's
    least-waiting rule ties (both idle) and takes pipeline 0; work-conserving under light
    traffic takes the one that answers first."""
    from ppipe_trt.scheduler import build_schedulers, place_workers
    from ppipe_trt.simulator.handplan import ModelSpec, hand_plan
    from toys import CLUSTER, toy_profiles

    profiles = toy_profiles()
    plan = hand_plan(profiles, CLUSTER, [ModelSpec("toy", SLO_MS, [
        (1, [(0, 1, "L", 1, 2)]), (1, [(0, 1, "H", 1, 2)])])])
    finish = {}
    for wc in (False, True):
        s = build_schedulers(plan, profiles, place_workers(plan),
                             work_conserving=wc)["toy"]
        dec = s.on_arrival(Request(1, "toy", 0.0, SLO_MS * 1000), 0.0)
        assert len(dec.dispatches) == 1   # planned batch 1: no wait either way
        finish[wc] = (dec.dispatches[0].pipeline, dec.dispatches[0].finish_us)
    assert finish[False] == (0, 6000.0)
    assert finish[True] == (1, 2000.0)
