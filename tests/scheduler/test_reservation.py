"""The reservation scheduler, driven by a fake clock and hand-built events."""

from __future__ import annotations

import pytest

from ppipe_trt.errors import SchedulerError
from ppipe_trt.scheduler.interface import DropReason, Request
from toys import SLO_MS, FakeClockDriver, poisson_times, schedulers, toy_plan

# Latencies of the toy plan (see toys.py): pipeline 0 runs both blocks on H at MPS 1:
# 2000 us at batch 1, 2000 * (1 + 0.5 (b-1)) at batch b.
P0_LAT = {b: 2000.0 * (1 + 0.5 * (b - 1)) for b in range(1, 9)}


def _intervals_disjoint(intervals):
    intervals = sorted(intervals)
    return all(a[1] <= b[0] + 1e-9 for a, b in zip(intervals, intervals[1:]))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rate", [800.0, 3000.0])
def test_reservations_never_overlap_and_meet_deadlines(seed, rate):
    scheds, placement = schedulers(toy_plan(with_other=True))
    drv = FakeClockDriver(scheds)
    for i, t in enumerate(poisson_times(rate, 300_000, seed)):
        drv.arrive(t, "toy", rid=2 * i)
    for i, t in enumerate(poisson_times(rate / 2, 300_000, seed + 100)):
        drv.arrive(t, "other", rid=2 * i + 1)
    drv.run()
    assert drv.dispatches, "nothing was dispatched"
    per_worker, per_ul, per_dl = {}, {}, {}
    for d in drv.dispatches:
        oldest = min(r.deadline_us for r in d.requests)
        assert d.finish_us <= oldest, f"batch {d.batch_id} reserved past its oldest deadline"
        prev = None
        for r in d.route:
            assert r.start_us <= r.finish_us
            assert r.transfer_finish_us <= r.start_us
            per_worker.setdefault(r.worker_id, []).append((r.start_us, r.finish_us))
            if prev is not None:
                assert r.transfer_start_us >= prev.finish_us
                if r.transfer_finish_us > r.transfer_start_us:
                    src = placement.worker(prev.worker_id).server_id
                    dst = placement.worker(r.worker_id).server_id
                    assert src != dst
                    iv = (r.transfer_start_us, r.transfer_finish_us)
                    per_ul.setdefault(src, []).append(iv)
                    per_dl.setdefault(dst, []).append(iv)
            prev = r
    for table in (per_worker, per_ul, per_dl):
        for key, ivs in table.items():
            assert _intervals_disjoint(ivs), f"overlapping reservations on {key}"
    # links shared by the two models' schedulers were used by both
    assert per_dl, "no transfer was reserved"
    # every request got exactly one outcome
    dispatched = {r.request_id for d in drv.dispatches for r in d.requests}
    dropped = {x.request.request_id for x in drv.drops}
    assert not dispatched & dropped
    assert len(dispatched) + len(dropped) == len(drv.arrived)


def test_waits_until_the_last_moment_then_dispatches_what_it_has():
    scheds, _ = schedulers()
    s = scheds["toy"]
    dec = s.on_arrival(Request(1, "toy", 0.0, SLO_MS * 1000), 0.0)
    assert not dec.dispatches and not dec.drops
    # pipeline 0 (whole model on H, 2000 us at batch 1) has least waiting; one request is
    # queued for a planned batch of 4, so it waits until 20000 - 2000 (minus a tiny guard)
    assert dec.wake_at_us == pytest.approx(SLO_MS * 1000 - P0_LAT[1], abs=0.01)
    assert dec.wake_at_us < SLO_MS * 1000 - P0_LAT[1]
    dec2 = s.on_arrival(Request(2, "toy", 1000.0, 1000.0 + SLO_MS * 1000), 1000.0)
    # two queued: the last moment moves earlier by the batch-2 latency
    assert not dec2.dispatches
    assert dec2.wake_at_us == pytest.approx(SLO_MS * 1000 - P0_LAT[2], abs=0.01)
    d = s.on_wake(dec2.wake_at_us).dispatches
    assert len(d) == 1 and d[0].batch_size == 2
    assert d[0].finish_us <= SLO_MS * 1000
    assert d[0].finish_us == pytest.approx(SLO_MS * 1000, abs=0.01)


def test_full_batch_dispatches_at_once():
    scheds, _ = schedulers()
    s = scheds["toy"]
    decs = [s.on_arrival(Request(i, "toy", 10.0 * i, 10.0 * i + 20000), 10.0 * i)
            for i in range(4)]
    assert [len(x.dispatches) for x in decs] == [0, 0, 0, 1]
    d = decs[-1].dispatches[0]
    assert d.pipeline == 0 and d.batch_size == 4
    assert d.route[0].start_us == 30.0
    assert d.route[0].finish_us == 30.0 + P0_LAT[4]
    assert decs[-1].wake_at_us is None


def test_batch_shrinks_to_meet_the_oldest_deadline_then_drops():
    scheds, _ = schedulers()
    s = scheds["toy"]
    # deadlines so tight that batch 4 (5000 us) misses but batch 2 (3000 us) fits
    reqs = [Request(i, "toy", 0.0, 3500.0 + i) for i in range(4)]
    dispatched = []
    for r in reqs:
        dispatched += s.on_arrival(r, 0.0).dispatches
    assert dispatched and dispatched[0].batch_size in (2, 1)
    assert all(d.finish_us <= min(q.deadline_us for q in d.requests) for d in dispatched)
    # now a request whose deadline no route can meet even alone
    dec = s.on_arrival(Request(9, "toy", 0.0, 1500.0), 0.0)
    assert [x.request.request_id for x in dec.drops] == [9]
    assert dec.drops[0].reason is DropReason.DEADLINE_UNREACHABLE


def test_drop_rule_drops_oldest_until_the_rest_fits():
    scheds, _ = schedulers()
    s = scheds["toy"]
    # two full batches fill both pipeline-0 workers until 5000 us
    busy = []
    for i in range(8):
        busy += s.on_arrival(Request(100 + i, "toy", 0.0, 20000.0), 0.0).dispatches
    assert [(d.pipeline, d.batch_size, d.finish_us) for d in busy] == [(0, 4, 5000.0)] * 2
    # batch 1 now finishes at best at 4700 us on pipeline 1 (1600 + 100 + 3000)
    dec = s.on_arrival(Request(1, "toy", 0.0, 4000.0), 0.0)
    assert [(x.request.request_id, x.reason) for x in dec.drops] == [
        (1, DropReason.DEADLINE_UNREACHABLE)]
    # a loose request waits; a tight one arriving later but due earlier goes to the head,
    # is dropped, and the loose one is left waiting
    dec = s.on_arrival(Request(2, "toy", 0.0, 19000.0), 0.0)
    assert not dec.dispatches and not dec.drops and dec.wake_at_us is not None
    dec = s.on_arrival(Request(3, "toy", 10.0, 4600.0), 10.0)
    assert [x.request.request_id for x in dec.drops] == [3]
    assert not dec.dispatches and s.queue_length == 1
    # one that pipeline 1 can just make alone is served with batch 1
    dec = s.on_arrival(Request(4, "toy", 20.0, 4750.0), 20.0)
    assert not dec.drops
    assert [(d.pipeline, d.batch_size) for d in dec.dispatches] == [(1, 1)]
    assert dec.dispatches[0].finish_us == pytest.approx(20.0 + 4700.0)


def test_early_and_late_finish_correct_the_worker_state():
    scheds, _ = schedulers()
    s = scheds["toy"]
    for i in range(4):
        dec = s.on_arrival(Request(i, "toy", 0.0, 20000.0), 0.0)
    d = dec.dispatches[0]
    w = d.route[0].worker_id
    assert s.reserved_until(w) == P0_LAT[4]
    s.on_stage_finished(d.batch_id, 0, 4000.0, 4000.0)  # early
    assert s.reserved_until(w) == 4000.0
    # a second batch on the same worker, then its predecessor... late case:
    for i in range(4, 8):
        dec = s.on_arrival(Request(i, "toy", 4000.0, 24000.0), 4000.0)
    d2 = dec.dispatches[0]
    w2 = d2.route[0].worker_id
    for i in range(8, 12):
        dec = s.on_arrival(Request(i, "toy", 4000.0, 30000.0), 4000.0)
    d3 = dec.dispatches[0]
    if d3.route[0].worker_id == w2:  # a reservation queued behind d2 on the same worker
        before = s.reserved_until(w2)
        s.on_stage_finished(d2.batch_id, 0, d2.finish_us + 700.0, d2.finish_us + 700.0)
        assert s.reserved_until(w2) == before + 700.0
    else:  # nothing behind: the worker is free exactly when the late batch ended
        s.on_stage_finished(d2.batch_id, 0, d2.finish_us + 700.0, d2.finish_us + 700.0)
        assert s.reserved_until(w2) == d2.finish_us + 700.0
    with pytest.raises(SchedulerError, match="unknown batch"):
        s.on_stage_finished(d2.batch_id, 0, 1e9, 1e9)


def test_late_finish_behind_a_reservation_pushes_it_back():
    scheds, _ = schedulers()
    s = scheds["toy"]
    batches = []
    for i in range(40):  # enough full batches to stack two on a pipeline-0 worker
        batches += s.on_arrival(Request(i, "toy", 0.0, 100000.0), 0.0).dispatches
    first = batches[0]
    w = first.route[0].worker_id
    behind = [b for b in batches[1:] if b.route[0].worker_id == w]
    assert behind, "expected a second reservation on the first batch's worker"
    before = s.reserved_until(w)
    s.on_stage_finished(first.batch_id, 0, first.finish_us + 250.0, first.finish_us + 250.0)
    assert s.reserved_until(w) == before + 250.0


def test_time_going_backwards_is_an_error():
    scheds, _ = schedulers()
    s = scheds["toy"]
    s.on_wake(100.0)
    with pytest.raises(SchedulerError, match="backwards"):
        s.on_wake(50.0)


def test_removed_worker_fails_its_batches_and_is_avoided():
    scheds, _ = schedulers()
    s = scheds["toy"]
    for i in range(4):
        dec = s.on_arrival(Request(i, "toy", 0.0, 20000.0), 0.0)
    d = dec.dispatches[0]
    w = d.route[0].worker_id
    dec = s.remove_worker(w, 10.0)
    assert sorted(x.request.request_id for x in dec.drops) == [0, 1, 2, 3]
    assert {x.reason for x in dec.drops} == {DropReason.WORKER_FAILED}
    for i in range(4, 12):
        dec = s.on_arrival(Request(i, "toy", 20.0, 20020.0), 20.0)
        for nd in dec.dispatches:
            assert w not in [r.worker_id for r in nd.route]
    s.add_worker(w, 30.0)
    assert s.reserved_until(w) == 30.0


def test_all_workers_gone_drops_with_no_workers():
    scheds, placement = schedulers()
    s = scheds["toy"]
    for w in placement.workers:
        if w.model == "toy" and w.stage == 0:
            s.remove_worker(w.worker_id, 0.0)
    dec = s.on_arrival(Request(1, "toy", 0.0, 20000.0), 0.0)
    assert [x.reason for x in dec.drops] == [DropReason.NO_WORKERS]


def test_drain_drops_everything_queued():
    scheds, _ = schedulers()
    s = scheds["toy"]
    s.on_arrival(Request(1, "toy", 0.0, 20000.0), 0.0)
    dec = s.drain(5.0)
    assert [(x.request.request_id, x.reason) for x in dec.drops] == [(1, DropReason.SHUTDOWN)]
    assert s.queue_length == 0


def test_same_events_same_decisions():
    runs = []
    for _ in range(2):
        scheds, _ = schedulers()
        drv = FakeClockDriver(scheds)
        for i, t in enumerate(poisson_times(2500.0, 100_000, 7)):
            drv.arrive(t, rid=i)
        drv.run()
        runs.append([(d.batch_id, d.pipeline, tuple(r.request_id for r in d.requests),
                      tuple((r.worker_id, r.start_us, r.finish_us) for r in d.route))
                     for d in drv.dispatches])
    assert runs[0] == runs[1]


def test_late_stage_finishes_are_absorbed_by_later_decisions():
    # every stage runs 300 us late; the scheduler keeps its reservations disjoint anyway
    scheds, placement = schedulers()
    drv = FakeClockDriver(scheds, delay_us=lambda bid, stage: 300.0)
    for i, t in enumerate(poisson_times(1500.0, 200_000, 3)):
        drv.arrive(t, rid=i)
    drv.run()
    per_worker = {}
    for d in drv.dispatches:
        for r in d.route:
            per_worker.setdefault(r.worker_id, []).append((r.start_us, r.finish_us))
    assert all(_intervals_disjoint(v) for v in per_worker.values())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_waiting_never_costs_a_request_at_light_load(seed):
    # two models sharing links, both with two-stage pipelines that wait for batches: every
    # wake-up must still leave time to serve what waited, so nothing is dropped
    scheds, _ = schedulers(toy_plan(with_other=True))
    drv = FakeClockDriver(scheds)
    for i, t in enumerate(poisson_times(300.0, 500_000, seed)):
        drv.arrive(t, "toy", rid=2 * i)
    for i, t in enumerate(poisson_times(200.0, 500_000, seed + 50)):
        drv.arrive(t, "other", rid=2 * i + 1)
    drv.run()
    assert not drv.drops
    assert sum(d.batch_size for d in drv.dispatches) == len(drv.arrived)
    assert any(d.batch_size > 1 for d in drv.dispatches)


def test_strict_batch_fraction_drops_instead_of_shrinking():
    # the artifact's admission rule: a fresh head request that cannot go in a batch of
    # round(fraction * planned) is dropped, even though a batch of 1 would still make it
    scheds, _ = schedulers(strict_batch_fraction=1.0)
    s = scheds["toy"]
    dec = s.on_arrival(Request(1, "toy", 0.0, 4000.0), 0.0)   # batch 4 takes 5000 us
    assert [x.request.request_id for x in dec.drops] == [1]
    scheds, _ = schedulers()
    dec = scheds["toy"].on_arrival(Request(1, "toy", 0.0, 4000.0), 0.0)
    assert not dec.drops   # the default rule shrinks the batch instead



def _decisions_key(dec):
    return ([(d.batch_id, d.pipeline, tuple(r.request_id for r in d.requests),
              tuple((r.worker_id, r.start_us, r.finish_us, r.transfer_start_us,
                     r.transfer_finish_us) for r in d.route)) for d in dec.dispatches],
            [(x.request.request_id, x.reason) for x in dec.drops], dec.wake_at_us)


def _burst_then_late():
    # 60 requests at t=0 (the SLO fits a few batches; the rest is dropped), then 3 at t=500
    # whose deadlines are earlier than any queued
    return ((([Request(i, "toy", 0.0, 20_000.0 + 10.0 * (i % 7)) for i in range(60)], 0.0),
             ([Request(100 + i, "toy", 500.0, 15_000.0 - i) for i in range(3)], 500.0)))


@pytest.mark.parametrize("policy", ["reactive", "triton"])
def test_the_interfaces_on_arrivals_is_one_arrival_at_a_time(policy):
    one_by_one, at_once = schedulers(policy=policy)[0]["toy"], schedulers(policy=policy)[0]["toy"]
    for group, now in _burst_then_late():
        got = _decisions_key(at_once.on_arrivals(group, now))
        decs = [_decisions_key(one_by_one.on_arrival(r, now)) for r in group]
        assert got == ([d for dec in decs for d in dec[0]], [d for dec in decs for d in dec[1]],
                       decs[-1][2])


@pytest.mark.parametrize("max_queue", [None, 5])
def test_a_burst_decided_at_once_serves_at_least_as_many_in_time(max_queue):
    one_by_one = schedulers(max_queue=max_queue)[0]["toy"]
    at_once = schedulers(max_queue=max_queue)[0]["toy"]
    queued = 0
    for group, now in _burst_then_late():
        dec = at_once.on_arrivals(group, now)
        singles = [one_by_one.on_arrival(r, now) for r in group]
        served = [r.request_id for d in dec.dispatches for r in d.requests]
        dropped = [x.request.request_id for x in dec.drops]
        # every request is served, dropped or left queued, exactly once
        assert len(set(served)) == len(served) and not set(served) & set(dropped)
        assert len(served) + len(dropped) + at_once.queue_length == queued + len(group)
        queued = at_once.queue_length
        for d in dec.dispatches:
            assert d.finish_us <= min(r.deadline_us for r in d.requests)
        assert len(served) >= sum(d.batch_size for s in singles for d in s.dispatches)
        # a bounded queue overflows no more often than with one arrival at a time
        full = sum(x.reason == DropReason.QUEUE_FULL for x in dec.drops)
        assert full <= sum(x.reason == DropReason.QUEUE_FULL for s in singles for x in s.drops)
