"""Plan swaps in the simulator: every request answered once, queues move with their
deadlines, no GPU share runs two batches at once, retired workers get no new batches."""

from __future__ import annotations

from collections import defaultdict

import pytest

from ppipe_trt.cluster import ClusterSpec, GpuPool
from ppipe_trt.errors import ConfigError
from ppipe_trt.profiles.types import ProfileSet
from ppipe_trt.simulator import ModelSpec, SimConfig, hand_plan, synthetic_profile
from ppipe_trt.simulator.adaptive import simulate_scenario
from ppipe_trt.simulator.scenarios import Phase, Scenario
from ppipe_trt.simulator.swap import PlanSwap

# two H GPUs: plan A fills both at share 1, so plan B's share-2 workers must take the GPU of
# a retiring worker and wait for it
CLUSTER = ClusterSpec((GpuPool("H", 2, 2, 2, 10.0), GpuPool("L", 2, 2, 1, 10.0)), "H-L")
SLO_MS = 20.0


def _profiles():
    return ProfileSet({"toy": synthetic_profile(
        "toy", {("H", 1): [1000.0, 1000.0], ("H", 2): [1600.0, 1600.0],
                ("L", 1): [3000.0, 3000.0]})})


def _plans(profiles):
    a = hand_plan(profiles, CLUSTER, [ModelSpec("toy", SLO_MS, [(4, [(0, 1, "H", 1, 2)])])])
    b = hand_plan(profiles, CLUSTER, [ModelSpec("toy", SLO_MS, [
        (4, [(0, 1, "H", 1, 1)]), (2, [(0, 0, "H", 2, 2), (1, 1, "L", 1, 2)])])])
    return a, b


def _run(rate=900.0, duration_s=2.0, swap_s=tuple(0.15 * k for k in range(1, 13)), seed=0):
    profiles = _profiles()
    a, b = _plans(profiles)
    scenario = Scenario("flat", ("toy",), (Phase(0.0, duration_s, (1.0,)),))
    swaps = [PlanSwap(t * 1e6, b if k % 2 == 0 else a) for k, t in enumerate(swap_s)]
    return simulate_scenario(a, profiles, scenario, rate, swaps=swaps,
                             config=SimConfig(seed=seed), record=True)


def test_every_request_is_answered_exactly_once_across_swaps():
    res = _run()
    assert len(res.swaps) == 12
    assert res.answered_twice == 0
    assert "unresolved" not in res.outcomes
    assert sum(res.outcomes.values()) == res.requests > 300
    seen = defaultdict(int)
    for _, _, d in res.dispatch_log:
        for r in d.requests:
            seen[r.request_id] += 1
    assert max(seen.values()) == 1
    dropped = res.requests - sum(seen.values())
    assert dropped == sum(v for k, v in res.outcomes.items() if k not in ("ok", "late"))
    assert res.outcomes.get("late", 0) == 0       # exact latencies: reservations hold


def test_requests_queued_at_the_switch_move_with_their_deadlines():
    res = _run()
    assert res.moved > 0, "the toy load should leave requests queued at some switch"
    for sw in res.swaps:
        moved = [r for t, p, d in res.dispatch_log if p == sw.plan_index
                 for r in d.requests if r.arrival_us < sw.at_us]
        assert len(moved) == sw.moved
        for r in moved:
            assert r.deadline_us == pytest.approx(r.arrival_us + SLO_MS * 1e3)
    # and they finish in time: nothing is late or dropped at this load
    assert res.outcomes == {"ok": res.requests}


def test_no_gpu_share_runs_two_batches_at_once_across_swaps():
    res = _run()
    by_gpu = defaultdict(list)
    for wid, slot in res.slots.items():
        for s, e in res.busy[wid]:
            by_gpu[(slot.gpu_class, slot.gpu_index)].append((s, e, slot))
    assert any(sw.added and sw.held_us > sw.at_us for sw in res.swaps), \
        "some added worker should have waited for a retiring one"
    for ivs in by_gpu.values():
        ivs.sort(key=lambda x: x[0])
        for i, (s1, e1, w1) in enumerate(ivs):
            for s2, e2, w2 in ivs[i + 1:]:
                if s2 >= e1 - 1e-6:
                    break
                shared = (w1.mps_share == w2.mps_share > 1 and w1.worker_id != w2.worker_id
                          and w1.share_index != w2.share_index)
                assert shared, (f"worker {w1.worker_id} ({s1:.0f}-{e1:.0f} us) and worker "
                                f"{w2.worker_id} ({s2:.0f}-{e2:.0f} us) overlap on one GPU "
                                "share")


def test_retired_workers_get_no_new_batches_and_kept_ones_serve_both_plans():
    res = _run()
    for sw in res.swaps:
        assert sw.retired_ids
        for t, p, d in res.dispatch_log:
            if t >= sw.at_us:
                assert not set(r.worker_id for r in d.route) & set(sw.retired_ids)
    first = res.swaps[0]
    kept = set(res.slots) - set(first.retired_ids) - set(first.added_ids)
    before = {r.worker_id for t, p, d in res.dispatch_log if p == 0 for r in d.route}
    after = {r.worker_id for t, p, d in res.dispatch_log if p == 1 for r in d.route}
    assert first.kept == 1 and kept & before & after


def test_a_swap_must_keep_the_models():
    profiles = ProfileSet({**_profiles().models, "other": synthetic_profile(
        "other", {("H", 1): [500.0, 500.0], ("L", 1): [900.0, 900.0]})})
    a, _ = _plans(profiles)
    other = hand_plan(profiles, CLUSTER, [ModelSpec("other", SLO_MS, [(1, [(0, 1, "H", 1, 1)])])])
    scenario = Scenario("flat", ("toy",), (Phase(0.0, 0.2, (1.0,)),))
    with pytest.raises(ConfigError, match="keeps the served models"):
        simulate_scenario(a, profiles, scenario, 100.0, swaps=[PlanSwap(0.1e6, other)])


def test_every_stage_starts_when_reserved_across_swaps():
    """With exact latencies each worker runs its batches no later than reserved, also where
    a new plan's worker shares a GPU with a retiring one (the hold covers its last batch)."""
    res = _run()
    per_worker = defaultdict(list)
    for _, _, d in res.dispatch_log:
        for r in d.route:
            per_worker[r.worker_id].append(r.start_us)
    for wid, starts in per_worker.items():
        actual = [s for s, _ in res.busy[wid]]
        assert len(actual) == len(starts)
        for got, reserved in zip(actual, starts):
            assert got <= reserved + 1e-6, f"worker {wid} started at {got}, reserved {reserved}"
