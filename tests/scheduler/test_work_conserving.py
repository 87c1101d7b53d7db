"""The reservation policy's work-conserving option, on a fake clock."""

from __future__ import annotations

import heapq

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
    # when the decaying estimate lets a held request go if nothing else arrives
    rule = WorkConservingRule(tables, max_load=0.1, window_us=100_000.0)
    for k in range(2000):
        rule.observe(k * 1000.0)
    now = 2_000_000.0
    at = rule.allowed_at(1, now)
    assert not rule.allows(1, now) and now < at < now + 200_000.0
    assert rule.allows(1, at) and not rule.allows(1, at - 2.0)
    assert rule.allowed_at(1, at) == at   # allowed now: now


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


class _ClosedLoop(FakeClockDriver):
    """``clients`` clients, each sending its next request the moment the last stage of its
    previous one finishes (as perf_analyzer at ``--concurrency-range N`` or a sequential
    tritonclient loop does)."""

    def __init__(self, scheds, clients: int, until_us: float):
        super().__init__(scheds)
        self.until_us = until_us
        self.rid = 0
        self.waits = []    # us from arrival to the batch's start, per request
        self.batches = {}  # batch id -> (stages, requests)
        for _ in range(clients):
            self._send(0.0)

    def _send(self, t):
        if t < self.until_us:
            self.arrive(t, "toy", rid=self.rid)
            self.rid += 1

    def _apply(self, model, dec):
        for d in dec.dispatches:
            self.waits += [d.route[0].start_us - r.arrival_us for r in d.requests]
            self.batches[d.batch_id] = (len(d.route), d.batch_size)
        super()._apply(model, dec)

    def run(self, until=float("inf")):
        while self.heap:
            t, _, kind, payload = heapq.heappop(self.heap)
            self.now = t
            if kind == "arrival":
                self._apply("toy", self.scheds["toy"].on_arrival(payload, t))
            elif kind == "finish":
                model, bid, stage = payload
                self._apply(model, self.scheds[model].on_stage_finished(bid, stage, t, t))
                stages, size = self.batches[bid]
                if stage == stages - 1:   # answered: each of its clients sends again
                    for _ in range(size):
                        self._send(t)
            elif payload[1] == self.wake_token[payload[0]]:
                self._apply(payload[0], self.scheds[payload[0]].on_wake(t))


@pytest.mark.parametrize("clients", [1, 2, 3])
def test_a_closed_loop_client_is_not_held_to_the_last_moment(clients):
    """One worker, batch 4 planned (2 ms at batch 1): a closed-loop client on it runs at the
    worker's speed, above what the rule calls light (max_load x capacity), so its request is
    held for a fuller batch; but it sends nothing while it waits, so no batch forms.  The
    scheduler looks again when the decaying rate estimate lets the request go, not at its
    last moment (SLO - 2 ms = 18 ms after arrival; what it waited before)."""
    from ppipe_trt.scheduler import build_schedulers, place_workers
    from ppipe_trt.simulator.handplan import ModelSpec, hand_plan
    from toys import CLUSTER, toy_profiles

    profiles = toy_profiles()
    plan = hand_plan(profiles, CLUSTER, [ModelSpec("toy", SLO_MS, [(4, [(0, 1, "H", 1, 1)])])])
    scheds = build_schedulers(plan, profiles, place_workers(plan), work_conserving=True)
    drv = _ClosedLoop(scheds, clients, until_us=1_000_000.0)
    drv.run()
    assert not drv.drops and len(drv.waits) == drv.rid > 200
    last_moment = SLO_MS * 1000 - P0_LAT[1]
    assert max(drv.waits) <= 0.25 * last_moment, max(drv.waits)
    if clients == 1:  # nothing of the model in flight when it arrives: it goes at once
        assert max(drv.waits) == 0.0


def test_nothing_in_flight_means_no_hold_even_at_a_heavy_rate():
    """The rate estimate says heavy (a burst just came and went), but no batch of the model
    is running: holding the lone request would only idle the pools."""
    scheds, _ = schedulers(work_conserving=True)
    drv = FakeClockDriver(scheds)
    for i in range(300):                     # 3,000 req/s for 0.1 s
        drv.arrive(i * 333.0, "toy", rid=i)
    drv.run()                                # all answered; the queue is empty
    s = scheds["toy"]
    t = drv.now + 1.0
    assert not s.batches_in_flight and not s.queue_length
    assert not s._early.allows(1, t)         # the estimate alone would hold the next one
    dec = s.on_arrival(Request(300, "toy", t, t + SLO_MS * 1000), t)
    assert len(dec.dispatches) == 1 and dec.dispatches[0].route[0].start_us == t
