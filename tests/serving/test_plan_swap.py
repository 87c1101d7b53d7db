"""Plan swap in the live runtime: a new plan replaces the one in force while requests flow;
every request is answered once, queued requests move with their deadlines, kept workers keep
running, retired workers stop once empty, and no worker (nor a GPU share of a retiring
worker) is reserved for two batches at once across the swap."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from ppipe_trt.serving.options import RuntimeOptions
from ppipe_trt.serving.swap import PlanSwapError

MODELS = ["googlenet-v3-pytorch", "repvgg-b3"]


@pytest.fixture(scope="module")
def plans(shared_profiles, profiles_dir):
    from ppipe_trt.adapt import replan
    from ppipe_trt.cluster import load_paper_setting
    from ppipe_trt.serving.local import emulated_plan

    cluster = load_paper_setting(profiles_dir).cluster("L4-T4")
    first = emulated_plan(shared_profiles, cluster, MODELS)
    second = replan(first, shared_profiles, {MODELS[0]: 3.0, MODELS[1]: 1.0})
    return first, second


def _recording(rt):
    """Record every dispatch the runtime sends (the batches of both plans)."""
    sent = []
    send = rt.dispatch

    def dispatch(d, now):
        sent.append(d)
        send(d, now)
    rt.dispatch = dispatch
    return sent


def _drive(rt, submit, seconds, rate_rps):
    """Submit ``rate_rps`` per model (evenly spaced) for ``seconds`` from this thread."""
    futures = []
    gap = 1.0 / rate_rps
    t_end = time.perf_counter() + seconds
    nxt = time.perf_counter()
    while nxt < t_end:
        for m in MODELS:
            futures.append(submit(m))
        nxt += gap
        time.sleep(max(0.0, nxt - time.perf_counter()))
    return futures


def test_swap_under_load_answers_everything_and_retires_workers(shared_profiles, plans):
    from ppipe_trt.serving.assembly import build_runtime

    first, second = plans
    rt = build_runtime(first, shared_profiles, {}, RuntimeOptions(hop_overhead_us=50.0))
    sent = _recording(rt)
    rt.start()
    try:
        futures: list = []
        worker = threading.Thread(target=lambda: futures.extend(
            _drive(rt, lambda m: rt.submit(m, None), 1.5, 300.0)))
        worker.start()
        time.sleep(0.6)
        old_ids = {w.worker_id for w in rt.workers}
        report = rt.swap_plan(second, "test: more of the first model")
        worker.join()
        results = [f.result(10) for f in futures]          # no request failed
        assert len(results) == len(futures) and len({r.request_id for r in results}) == len(results)
        late = [r for r in results if not r.met_deadline]
        assert len(late) <= 0.01 * len(results)
        assert report.generation == 1 and rt.plan is second
        assert report.kept and report.added and report.retired
        deadline = time.monotonic() + 5
        while rt.decision_loop.old_batches_in_flight() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.1)
        now_ids = {w.worker_id for w in rt.workers}
        assert now_ids == set(rt.generation.placement.worker_ids)
        assert not (set(report.retired) & now_ids) and set(report.added) <= now_ids
        assert set(report.kept) <= old_ids
        # new batches never go to retired workers; batches of the first plan run on its own
        first_new = rt.generation.first_batch_id
        for d in sent:
            if d.batch_id >= first_new:
                assert not {r.worker_id for r in d.route} & set(report.retired)
        assert any(d.batch_id >= first_new for d in sent)
        per_worker: dict[int, list] = {}
        for d in sent:
            for r in d.route:
                per_worker.setdefault(r.worker_id, []).append((r.start_us, r.finish_us))
        for wid, ivs in per_worker.items():
            ivs.sort()
            for (s0, f0), (s1, f1) in zip(ivs, ivs[1:]):
                assert s1 >= f0 - 1e-6, f"worker {wid} double-booked"
        # an added worker on a GPU share of retiring workers starts after their last batch
        for added, waited in rt.generation.waits.items():
            starts = [s for s, _ in per_worker.get(added, [])]
            ends = [f for w in waited for _, f in per_worker.get(w, [])]
            if starts and ends:
                assert min(starts) >= max(ends) - 1e-6
        status = rt.status()
        assert status["plan_generation"]["generation"] == 1
        assert status["plan_generation"]["reason"].startswith("test")
        assert [g["generation"] for g in status["plan_history"]] == [0, 1]
        assert status["plan_generation"]["old_plan_drained_s"] is not None
    finally:
        rt.stop()


def test_repeated_swaps_do_not_grow_the_runtime(shared_profiles, plans):
    """A server that re-plans all day must not keep what each plan retired: after every
    swap (back and forth between two plans, under load) the runtime, the transport and the
    compiled timing-only pool hold the workers of the plan in force and no others."""
    from ppipe_trt.serving.assembly import build_runtime

    first, second = plans
    rt = build_runtime(first, shared_profiles, {}, RuntimeOptions(hop_overhead_us=50.0))
    rt.start()
    try:
        retired: set[int] = set()
        for k, plan in enumerate([second, first, second, first]):
            futures = [rt.submit(m, None) for _ in range(5) for m in MODELS]
            report = rt.swap_plan(plan, f"swap {k}")
            futures += [rt.submit(m, None) for _ in range(5) for m in MODELS]
            errors = [f.exception(10) for f in futures]     # every request is answered
            assert errors.count(None) >= len(futures) // 2, errors
            deadline = time.monotonic() + 5
            in_force = set(rt.generation.placement.worker_ids)
            while ({w.worker_id for w in rt.workers} != in_force
                   and time.monotonic() < deadline):
                time.sleep(0.02)
            retired |= set(report.retired)
            assert {w.worker_id for w in rt.workers} == in_force
            assert all(rt.transport.receiver(w) is None for w in retired)
            assert all(rt.transport.receiver(w) is not None for w in in_force)
            pool = rt.decision_loop._pool     # the compiled workers, where built
            if pool is not None:
                assert {w.worker_id for w in pool.workers} == in_force
        assert retired and rt.generation.number == 4
    finally:
        rt.stop()


def test_queued_requests_move_with_their_deadlines(shared_profiles, plans):
    """Requests still queued at the switch are handed to the new plan's scheduler with
    their original deadlines and answered there."""
    from ppipe_trt.serving.assembly import build_runtime

    first, second = plans
    rt = build_runtime(first, shared_profiles, {}, RuntimeOptions(hop_overhead_us=50.0))
    rt.start()
    try:
        moved_at_switch = {}
        loop = rt.decision_loop

        def spy(model, sched):
            orig = sched.take_queued

            def take_queued(now):
                got = orig(now)
                moved_at_switch[model] = [(r.request_id, r.deadline_us) for r in got]
                return got
            sched.take_queued = take_queued
        for m in MODELS:
            spy(m, loop.scheduler(m))
        # the reservation policy holds a request until the last moment at which its batch
        # still meets the deadline: with a 1 s budget, these are queued at the switch
        futures = [rt.submit(m, None, timeout_us=1e6) for _ in range(5) for m in MODELS]
        time.sleep(0.05)
        report = rt.swap_plan(second, "burst")
        results = [f.result(10) for f in futures]
        assert report.requests_moved == sum(len(v) for v in moved_at_switch.values())
        assert 0 < report.requests_moved <= len(futures)   # full batches left at once
        assert all(r.met_deadline for r in results)
        by_id = {r.request_id: r for r in results}
        for m, moved in moved_at_switch.items():
            for rid, deadline in moved:
                assert by_id[rid].model == m
                # the deadline the client is judged by did not move (scheduler deadline is
                # the real one minus the margins, never later)
                assert by_id[rid].deadline_us >= deadline
    finally:
        rt.stop()


def test_swap_on_the_event_loop(shared_profiles, plans):
    from ppipe_trt.serving.assembly import build_runtime

    first, second = plans
    rt = build_runtime(first, shared_profiles, {}, RuntimeOptions(hop_overhead_us=50.0))

    async def main():
        rt.start(asyncio.get_running_loop())
        futures = [rt.submit_async(m, None) for _ in range(10) for m in MODELS]
        report = await asyncio.to_thread(rt.swap_plan, second, "on the event loop")
        futures += [rt.submit_async(m, None) for _ in range(10) for m in MODELS]
        results = await asyncio.gather(*futures)
        rt.stop()
        return report, results

    report, results = asyncio.run(main())
    assert report.generation == 1 and len(results) == 40
    assert all(r.met_deadline for r in results)


def test_a_plan_for_other_models_or_a_stopped_runtime_is_refused(shared_profiles, plans,
                                                                profiles_dir):
    from ppipe_trt.cluster import load_paper_setting
    from ppipe_trt.serving.assembly import build_runtime
    from ppipe_trt.serving.local import emulated_plan

    first, _ = plans
    rt = build_runtime(first, shared_profiles, {}, RuntimeOptions(hop_overhead_us=50.0))
    with pytest.raises(PlanSwapError, match="not running"):
        rt.swap_plan(first)
    other = emulated_plan(shared_profiles, load_paper_setting(profiles_dir).cluster("L4-T4"),
                          MODELS[:1])
    rt.start()
    try:
        with pytest.raises(PlanSwapError, match="keeps the models"):
            rt.swap_plan(other)
        assert rt.generation.number == 0
        assert rt.submit(MODELS[0], None).result(10).met_deadline   # still serving
    finally:
        rt.stop()


def test_reactive_policy_cannot_swap(shared_profiles, plans):
    from ppipe_trt.serving.assembly import build_runtime

    first, second = plans
    rt = build_runtime(first, shared_profiles, {},
                       RuntimeOptions(hop_overhead_us=50.0, policy="reactive"))
    rt.start()
    try:
        with pytest.raises(PlanSwapError, match="plan swaps need 'reservation'"):
            rt.swap_plan(second)
    finally:
        rt.stop()
