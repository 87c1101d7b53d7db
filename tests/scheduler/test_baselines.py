"""The reactive (Nexus-like) and Triton-style baselines behind the same interface."""

from __future__ import annotations

import pytest

from ppipe_trt.errors import ConfigError
from ppipe_trt.scheduler import build_schedulers, place_workers
from ppipe_trt.scheduler.interface import Request
from toys import FakeClockDriver, poisson_times, schedulers, toy_plan, toy_profiles


@pytest.mark.parametrize("policy", ["reactive", "triton"])
def test_every_request_gets_one_outcome(policy):
    scheds, _ = schedulers(policy=policy)
    drv = FakeClockDriver(scheds)
    for i, t in enumerate(poisson_times(3000.0, 200_000, 5)):
        drv.arrive(t, rid=i)
    drv.run()
    # a request is finished when the last stage of its pipeline ran (pipeline 0 has one
    # stage, pipeline 1 two)
    done = [r.request_id for d in drv.dispatches for r in d.requests
            if d.route[-1].stage == (0 if d.pipeline == 0 else 1)]
    dropped = [x.request.request_id for x in drv.drops]
    assert len(done) == len(set(done)) and not set(done) & set(dropped)
    assert len(done) + len(dropped) == len(drv.arrived)
    assert len(done) > len(drv.arrived) // 2


def test_reactive_runs_one_stage_per_dispatch_and_never_waits():
    scheds, _ = schedulers(policy="reactive")
    s = scheds["toy"]
    dec = s.on_arrival(Request(0, "toy", 0.0, 20000.0), 0.0)
    assert len(dec.dispatches) == 1 and dec.dispatches[0].batch_size == 1
    assert len(dec.dispatches[0].route) == 1
    assert dec.wake_at_us is None


def test_reactive_moves_requests_to_the_next_stage_queue():
    scheds, _ = schedulers(policy="reactive")
    s = scheds["toy"]
    s.on_arrival(Request(0, "toy", 0.0, 20000.0), 0.0)      # pipeline 0
    d1 = s.on_arrival(Request(1, "toy", 0.0, 20000.0), 0.0).dispatches[0]  # pipeline 1
    assert d1.pipeline == 1 and d1.route[0].stage == 0
    nxt = s.on_stage_finished(d1.batch_id, 0, 1600.0, 1600.0).dispatches
    assert [(d.pipeline, d.route[0].stage, d.batch_size) for d in nxt] == [(1, 1, 1)]


def test_triton_waits_for_a_full_batch_or_the_queue_delay():
    scheds, _ = schedulers(policy="triton", max_queue_delay_us=500.0)
    s = scheds["toy"]
    dec = s.on_arrival(Request(0, "toy", 0.0, 20000.0), 0.0)
    assert not dec.dispatches and dec.wake_at_us == 500.0
    dec = s.on_wake(500.0)
    assert [d.batch_size for d in dec.dispatches] == [1]
    batch = []
    for i in range(1, 5):
        batch += s.on_arrival(Request(i, "toy", 600.0, 20600.0), 600.0).dispatches
    # instances are taken round-robin: pipeline 1's (planned batch 2, 2 stages) fills first;
    # the next idle instance is pipeline 0's (batch 4), so the last two wait for the delay
    assert [(d.pipeline, d.batch_size, len(d.route)) for d in batch] == [(1, 2, 2)]
    dec = s.on_arrival(Request(5, "toy", 700.0, 20700.0), 700.0)
    assert not dec.dispatches and dec.wake_at_us == 1100.0


def test_unknown_policy_and_option_are_errors():
    plan = toy_plan()
    pl = place_workers(plan)
    with pytest.raises(ConfigError, match="unknown scheduling policy 'fifo'"):
        build_schedulers(plan, toy_profiles(), pl, "fifo")
    with pytest.raises(ConfigError, match="takes no option"):
        build_schedulers(plan, toy_profiles(), pl, "reactive", max_queue_delay_us=5.0)
