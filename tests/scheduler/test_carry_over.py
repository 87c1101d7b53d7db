"""carry_over: a new plan's placement keeps the workers whose role persists; scheduler
hand-over primitives (take_queued, hold_worker, batches_in_flight)."""

from __future__ import annotations

import pytest

from ppipe_trt.errors import ConfigError
from ppipe_trt.scheduler import build_schedulers, place_workers
from ppipe_trt.scheduler.carry_over import carry_over, role_of
from ppipe_trt.scheduler.interface import Request
from ppipe_trt.scheduler.tables import ClusterState
from ppipe_trt.simulator.handplan import ModelSpec, hand_plan
from toys import CLUSTER, SLO_MS, toy_plan, toy_profiles


def _plan(pipelines):
    return hand_plan(toy_profiles(), CLUSTER, [ModelSpec("toy", SLO_MS, pipelines)])


def _share_map(placement):
    return {(w.gpu_class, w.gpu_index, w.share_index): w.worker_id for w in placement.workers}


def test_identical_plan_keeps_every_worker_in_place():
    old = place_workers(toy_plan())
    co = carry_over(toy_plan(), old, first_new_id=100)
    assert sorted(co.kept) == list(old.worker_ids) and co.added == () and co.retired == ()
    assert _share_map(co.placement) == _share_map(old)


def test_changed_plan_keeps_roles_adds_and_retires():
    old = place_workers(toy_plan())   # p0: 2 x H whole model; p1: H(MPS 2) block 0 -> L block 1
    # New: the whole-model pool grows to 3 H, the two-stage pipeline goes away; a new
    # pipeline puts block 0 on H and block 1 on 2 L GPUs.
    new = _plan([(4, [(0, 1, "H", 1, 3)]), (2, [(0, 0, "H", 1, 1), (1, 1, "L", 1, 2)])])
    co = carry_over(new, old, first_new_id=10)
    # The two L workers of block 1 keep their GPUs (same role, pipeline index unchanged);
    # the two H MPS-2 block-0 workers retire; the whole-model workers 0, 1 are kept.
    assert set(co.kept) == {0, 1, 4, 5}
    assert set(co.retired) == {2, 3}
    assert co.added == (10, 11)
    slots = {w.worker_id: w for w in co.placement.workers}
    for wid in co.kept:
        assert role_of(slots[wid]) == role_of(old.worker(wid))
        assert slots[wid].gpu_index == old.worker(wid).gpu_index
    # no GPU share holds two workers of the new plan
    shares = [(w.gpu_class, w.gpu_index, w.share_index) for w in co.placement.workers]
    assert len(shares) == len(set(shares))
    # H has 4 GPUs: 2 kept (0, 1 -> GPUs 2, 3), the retiring MPS pair on GPU 0; the two
    # added H workers need whole GPUs: GPU 1 is free, the other must wait for GPU 0's pair.
    h_added = [w for w in co.placement.workers if w.worker_id in co.added]
    gpus = sorted(w.gpu_index for w in h_added)
    assert gpus == [0, 1]
    waiting = [w.worker_id for w in h_added if w.gpu_index == 0]
    assert co.waits == {waiting[0]: (2, 3)}
    # the carried placement feeds the scheduler tables as any other
    state = ClusterState(old)
    scheds = build_schedulers(new, toy_profiles(), co.placement,
                              state=state.successor(co.placement))
    assert scheds["toy"].pipelines[1].stages[1].worker_ids == (4, 5)


def test_too_few_gpus_is_an_error_naming_the_stage():
    old = place_workers(toy_plan())
    with pytest.raises(ConfigError, match="no L GPU share"):
        # 5 L workers do not fit 4 L GPUs
        carry_over(_plan([(2, [(0, 0, "H", 1, 1), (1, 1, "L", 1, 5)])]), old, 10)


def test_another_cluster_is_refused():
    from ppipe_trt.cluster import ClusterSpec, GpuPool

    old = place_workers(toy_plan())
    other = ClusterSpec((GpuPool("H", 2, 2, 2, 10.0), GpuPool("L", 4, 2, 1, 10.0)), "H-L")
    plan = hand_plan(toy_profiles(), other, [ModelSpec("toy", SLO_MS, [(4, [(0, 1, "H", 1, 1)])])])
    with pytest.raises(ConfigError, match="keeps the cluster"):
        carry_over(plan, old, 10)


def test_take_queued_hands_over_in_deadline_order_and_hold_worker_delays():
    plan = toy_plan()
    placement = place_workers(plan)
    scheds = build_schedulers(plan, toy_profiles(), placement)
    s = scheds["toy"]
    # p0 workers (H, whole model, batch 4) are idle: a lone request waits for a batch
    r1 = Request(1, "toy", 0.0, 20_000.0)
    r2 = Request(2, "toy", 10.0, 15_000.0)
    dec = s.on_arrivals([r1, r2], 10.0)
    assert not dec.dispatches and s.queue_length == 2
    taken = s.take_queued(20.0)
    assert [r.request_id for r in taken] == [2, 1]
    assert s.queue_length == 0 and s.batches_in_flight == 0 and s.wake_at_us is None
    # a fresh scheduler of the same plan, every worker held until 12 ms: nothing can start
    # before then, so a batch with both is placed at >= 12 ms (and still meets 15 ms)
    fresh = build_schedulers(plan, toy_profiles(), placement)["toy"]
    for w in placement.worker_ids:
        fresh.hold_worker(w, 12_000.0)
    assert fresh.reserved_until(0) == 12_000.0
    dec = fresh.on_arrivals(taken, 20.0)
    while not dec.dispatches and dec.wake_at_us is not None:
        dec = fresh.on_wake(dec.wake_at_us)
    assert dec.dispatches and all(d.route[0].start_us >= 12_000.0 for d in dec.dispatches)
    assert fresh.batches_in_flight == len(dec.dispatches)
    fresh.hold_worker(0, 5.0)   # never moves a reservation earlier
    assert fresh.reserved_until(0) >= 12_000.0
