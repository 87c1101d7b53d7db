"""The compiled reservation scheduler against the Python reference, side by side.

``conftest.py`` already runs every scheduler test (the decision digests included) against
both; here the two run in lockstep on the same events -- arrivals in bursts, stages that
finish late and early, workers that fail and come back, plan-swap hand-overs, every option
of the policy and every link model -- and every decision, every error message and the link
timelines must be equal.  Plus the selection rules (``PPIPE_NATIVE``, a stale build).
"""

from __future__ import annotations

import os
import random

import pytest

from ppipe_trt.errors import ConfigError, SchedulerError
from ppipe_trt.plan import load_plan
from ppipe_trt.profiles import default_profiles_dir, load_profiles
from ppipe_trt.scheduler import build_schedulers, links, native, place_workers
from ppipe_trt.scheduler.interface import Request
from ppipe_trt.scheduler.tables import ClusterState
from toys import decision_words, toy_plan, toy_profiles

from pathlib import Path

DATA = Path(__file__).parent / "data"


@pytest.fixture
def scheduler_impl(monkeypatch):
    """(Overrides conftest's: these tests compare the two, once.)"""
    monkeypatch.delenv("PPIPE_NATIVE", raising=False)
    if native.native_module() is None:
        why = native.native_status()["detail"]
        if os.environ.get("PPIPE_REQUIRE_NATIVE") == "1":
            pytest.fail(f"the compiled scheduler is required here but not available: {why}")
        pytest.skip(f"compiled scheduler not available: {why}")
    return "both"


@pytest.fixture
def compiled(scheduler_impl):
    return native.native_module()


def _t(x):
    return "-" if x is None else repr(float(x))


def canon(dec) -> str:
    """Every decision, times exact, drops with their details."""
    return " ".join(decision_words(dec, _t, details=True))


def _pair(plan, profiles, link_model="duplex", **kw):
    placement = place_workers(plan)
    out = []
    for flag in (True, False):
        state = ClusterState(placement, 5.0, link_model, native=flag)
        out.append((build_schedulers(plan, profiles, placement, state=state,
                                     link_model=link_model, hop_overhead_us=5.0, **kw), state))
    return out, placement


def _call(scheds, model, name, *args):
    """The same call on both; equal outcomes (decisions, or the error and its message)."""
    outs = []
    for s in scheds:
        try:
            outs.append(("ok", getattr(s[model], name)(*args)))
        except SchedulerError as exc:
            outs.append(("error", str(exc)))
    (ka, a), (kb, b) = outs
    assert ka == kb, (name, args, outs)
    if ka == "error":
        assert a == b, (name, args)
        return None
    if name in ("take_queued",):
        assert [r.request_id for r in a] == [r.request_id for r in b]
        return a
    if a is not None and hasattr(a, "dispatches"):
        assert canon(a) == canon(b), (name, args)
    else:
        assert a == b, (name, args)
    return a


def _lockstep(plan, profiles, seed, link_model="duplex", events=600, **kw):
    """Random events on both schedulers, compared call by call."""
    (pa, sa), (pb, sb) = _pair(plan, profiles, link_model, **kw)[0]
    scheds = (pa, pb)
    rng = random.Random(seed)
    models = [m.model for m in plan.models]
    workers = {m: sorted({w for pt in pa[m].pipelines for st in pt.stages
                          for w in st.worker_ids}) for m in models}
    now = 0.0
    inflight = []           # (model, batch id, stage count, next stage, reserved finishes)
    dead = {m: set() for m in models}
    rid = 0
    slo = {m.model: m.slo_ms * 1000.0 for m in plan.models}
    for _ in range(events):
        now += rng.expovariate(1 / 400.0)
        kind = rng.random()
        model = rng.choice(models)
        if kind < 0.45:       # a burst of arrivals (some with tight or earlier deadlines)
            reqs = []
            for _ in range(rng.choice((1, 1, 1, 2, 3, 7))):
                dl = now + slo[model] * rng.choice((1.0, 1.0, 0.3, 0.05, 2.0))
                reqs.append(Request(rid, model, now - rng.random() * 50, dl,
                                    grace_us=rng.choice((0.0, 0.0, 3000.0))))
                rid += 1
            dec = _call(scheds, model, "on_arrivals", reqs, now)
        elif kind < 0.8 and inflight:   # a stage finishes: on time, late or early
            i = rng.randrange(len(inflight))
            m, bid, nst, nxt, ends, ids = inflight[i]
            finish = ends[nxt] + rng.choice((0.0, 0.0, 250.0, -120.0, 2000.0))
            finish = max(finish, 0.0)
            now = max(now, finish)
            dec = _call(scheds, m, "on_stage_finished", bid, nxt, finish, now)
            if nxt + 1 == nst:
                inflight.pop(i)
            else:
                inflight[i] = (m, bid, nst, nxt + 1, ends, ids)
            model = m
        elif kind < 0.85:
            dec = _call(scheds, model, "on_wake", now)
        elif kind < 0.9:      # a worker fails, or one comes back
            if dead[model] and rng.random() < 0.5:
                w = dead[model].pop()
                dec = _call(scheds, model, "add_worker", w, now)
            else:
                w = rng.choice(workers[model])
                dead[model].add(w)
                dec = _call(scheds, model, "remove_worker", w, now)
        elif kind < 0.93:     # a plan swap's hand-over
            taken = _call(scheds, model, "take_queued", now)
            w = rng.choice(workers[model])
            _call(scheds, model, "hold_worker", w, now + 5000.0)
            dec = _call(scheds, model, "on_arrivals", taken, now) if taken else None
        else:                 # inspection
            for w in rng.sample(workers[model], min(3, len(workers[model]))):
                _call(scheds, model, "reserved_until", w)
            assert pa[model].queue_length == pb[model].queue_length
            assert pa[model].wake_at_us == pb[model].wake_at_us
            assert pa[model].batches_in_flight == pb[model].batches_in_flight
            dec = None
        if dec is not None:
            for d in dec.dispatches:
                inflight.append((model, d.batch_id, len(d.route), 0,
                                 [r.finish_us for r in d.route],
                                 {r.request_id for r in d.requests}))
            failed = {x.request.request_id for x in dec.drops
                      if x.reason.value == "worker_failed"}
            if failed:   # their batches are forgotten by both
                inflight = [x for x in inflight if not (x[0] == model and x[5] & failed)]
    # the end: the link timelines are equal, and so are the errors of bad calls
    assert [tuple(tl) for tl in sa.uplinks] == [tuple(tl) for tl in sb.uplinks]
    assert [tuple(tl) for tl in sa.downlinks] == [tuple(tl) for tl in sb.downlinks]
    m = models[0]
    _call(scheds, m, "on_stage_finished", 10**9, 0, now, now)      # unknown batch
    if inflight:                                                   # a stage it does not have
        _call(scheds, inflight[0][0], "on_stage_finished", inflight[0][1], 99, now, now)
    _call(scheds, m, "on_wake", now - 1.0)                         # time went backwards
    _call(scheds, m, "reserved_until", 10**6)                      # not one of its workers
    _call(scheds, m, "drain", now)
    return rid


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("options", [{}, {"max_queue": 3}, {"strict_batch_fraction": 0.75},
                                     {"work_conserving": True}, {"wake_lead_us": 700.0}],
                         ids=["default", "max-queue", "strict", "work-conserving", "wake-lead"])
def test_toy_plan_in_lockstep(compiled, seed, options):
    n = _lockstep(toy_plan(with_other=True), toy_profiles(), seed, **options)
    assert n > 100


@pytest.mark.parametrize("link_model", ["duplex", "sender", "channel"])
@pytest.mark.parametrize("plan_file", ["plan-g5-L4-P4.json", "plan-g3-V100-P4.json"])
def test_paper_plans_in_lockstep(compiled, profiles_dir, link_model, plan_file):
    plan = load_plan(DATA / plan_file)
    profiles = load_profiles(default_profiles_dir(), plan.model_names)
    _lockstep(plan, profiles, seed=hash((link_model, plan_file)) % 1000, link_model=link_model,
              events=1500)


@pytest.mark.parametrize("seed", range(20))
def test_timelines_match_the_reference(compiled, seed):
    """Random reservations at the places the scheduler would take, pruning, queries."""
    rng = random.Random(seed)
    ref_a, ref_b = links.new_timeline(), links.new_timeline()
    nat_a, nat_b = compiled.new_timeline(), compiled.new_timeline()
    now = 0.0
    for _ in range(400):
        now += rng.random() * 30
        t = now + rng.random() * 300
        dur = rng.choice((0.0, 5.0, 17.5, 40.0, rng.random() * 80))
        assert nat_a.first_free(t, dur) == links.first_free(ref_a, t, dur)
        assert nat_a.is_free(t, dur) == links.is_free(ref_a, t, dur)
        s = links.common_free(ref_a, ref_b, t, dur)
        assert nat_a.common_free(nat_b, t, dur) == s
        if dur > 0:
            which = rng.random() < 0.7
            links.reserve(ref_a if which else ref_b, s, s + dur)
            (nat_a if which else nat_b).reserve(s, s + dur)
        if rng.random() < 0.05:
            links.prune(ref_a, now)
            nat_a.prune(now)
        assert nat_a == ref_a and nat_b == ref_b
        assert nat_a.busy_until() == links.busy_until(ref_a)
    nat_a.clear()
    assert tuple(nat_a) == ([], [])


def test_timeline_pickles(compiled):
    import pickle

    tl = compiled.new_timeline()
    tl.reserve(1.0, 2.0)
    tl.reserve(5.0, 6.0)
    assert pickle.loads(pickle.dumps(tl)) == ([1.0, 5.0], [2.0, 6.0])


def test_cluster_state_chooses_the_timelines(compiled, monkeypatch):
    plan = toy_plan()
    placement = place_workers(plan)
    assert ClusterState(placement).native
    assert type(ClusterState(placement).uplinks[0]).__name__ == "Timeline"
    assert isinstance(ClusterState(placement, native=False).uplinks[0], tuple)
    scheds = build_schedulers(plan, toy_profiles(), placement)
    assert type(scheds["toy"]).__name__ == "NativeReservationScheduler"
    monkeypatch.setenv("PPIPE_NATIVE", "0")
    assert native.native_status() == {"scheduler": "python", "detail": "PPIPE_NATIVE=0"}
    state = ClusterState(placement)
    assert not state.native
    scheds = build_schedulers(plan, toy_profiles(), placement, state=state)
    assert type(scheds["toy"]).__name__ == "ReservationScheduler"
    with pytest.raises(ConfigError, match="not available"):
        ClusterState(placement, native=True)


def test_the_compiled_scheduler_refuses_python_timelines(compiled):
    plan = toy_plan()
    placement = place_workers(plan)
    state = ClusterState(placement, native=False)
    tables = build_schedulers(plan, toy_profiles(), placement, state=state)["toy"].pipelines
    with pytest.raises(ConfigError, match="compiled link timelines"):
        compiled.NativeReservationScheduler("toy", tables, state)


def test_a_stale_build_is_not_used(compiled, tmp_path, monkeypatch):
    """An edited ``reservation.pyx`` without a rebuild: the reference runs, and says why."""
    src = tmp_path / "reservation.pyx"
    src.write_text(native._SOURCE.read_text() + "\n# edited\n")
    monkeypatch.setattr(native, "_SOURCE", src)
    monkeypatch.setattr(native, "_loaded", None)
    assert native.native_module() is None
    status = native.native_status()
    assert status["scheduler"] == "python" and "stale build" in status["detail"]
    monkeypatch.setattr(native, "_loaded", None)   # the real source again for what follows


@pytest.mark.parametrize("seed", range(10))
def test_the_compiled_work_conserving_rule_matches_the_reference(compiled, seed):
    """Random arrivals (some out of order, some at equal times) and queries: every answer
    and the state equal to the bit."""
    from ppipe_trt.scheduler.work_conserving import WorkConservingRule

    plan = load_plan(DATA / "plan-g5-L4-P4.json")
    profiles = load_profiles(default_profiles_dir(), plan.model_names)
    rng = random.Random(seed)
    ((scheds, _), _), _ = _pair(plan, profiles)
    pipelines = scheds[plan.models[seed % len(plan.models)].model].pipelines
    max_load, window = rng.choice((0.5, 0.2, 1.0)), rng.choice((100_000.0, 5_000.0))
    ref = WorkConservingRule(pipelines, max_load, window)
    com = compiled.NativeWorkConservingRule(pipelines, max_load, window)
    assert com._capacity_rps == ref._capacity_rps
    t = 0.0
    for _ in range(3000):
        t += rng.expovariate(1 / rng.choice((50.0, 500.0, 20_000.0)))
        when = t - rng.choice((0.0, 0.0, 0.0, 300.0))  # now and then an earlier time
        ref.observe(when)
        com.observe(when)
        assert (com._level, com._level_at_us) == (ref._level, ref._level_at_us)
        now = t + rng.uniform(0.0, 3000.0)
        for n in (0, 1, 2, rng.randint(3, 40)):
            assert com.capacity_rps(n) == ref.capacity_rps(n)
            assert com.allows(n, now) == ref.allows(n, now)
            assert com.allowed_at(n, now) == ref.allowed_at(n, now)
        assert com.rate_rps(now) == ref.rate_rps(now)


@pytest.mark.parametrize("work_conserving", [True, False])
def test_a_quiet_finish_is_what_on_stage_finished_does(compiled, work_conserving):
    """The router's way (``FinishRouter.finish``) against ``on_stage_finished`` on twin
    schedulers: it takes a finish only when that needs no decision pass, and then leaves the
    scheduler as on_stage_finished would; otherwise it changes nothing."""
    plan, profiles = toy_plan(), toy_profiles()   # batches of 4 and 2: requests queue
    placement = place_workers(plan)
    twins = []
    for _ in range(2):
        state = ClusterState(placement, 5.0, "duplex", native=True)
        twins.append(build_schedulers(plan, profiles, placement, state=state,
                                      hop_overhead_us=5.0,
                                      work_conserving=work_conserving))
    model = "toy"
    a, b = twins[0][model], twins[1][model]
    wake: dict = {model: "unset"}
    router = compiled.FinishRouter({model: b}, wake)
    rng = random.Random(7)
    now, rid, taken, refused = 0.0, 0, 0, 0
    flight: list = []
    for step in range(1500):
        now += rng.expovariate(1 / 900.0)
        if flight and rng.random() < 0.6:
            i = rng.randrange(len(flight))
            bid, stage, route = flight[i]
            finish = route[stage].finish_us + rng.choice((0.0, 0.0, -200.0, 400.0))
            now = max(now, finish)
            want = a.on_stage_finished(bid, stage, finish, now)
            if router.finish(model, bid, stage, finish, now):
                taken += 1
                assert not want.dispatches and not want.drops
                assert wake[model] == want.wake_at_us == b.wake_at_us
            else:
                refused += 1
                got = b.on_stage_finished(bid, stage, finish, now)
                assert canon(got) == canon(want)
            if stage + 1 < len(route):
                flight[i] = (bid, stage + 1, route)
            else:
                del flight[i]
        else:
            burst = []  # now and then a burst, so that requests queue
            for _ in range(rng.choice((1, 1, 1, 12, 60))):
                rid += 1
                burst.append(Request(rid, model, now, now + rng.uniform(40_000.0, 90_000.0)))
            dec_a, dec_b = a.on_arrivals(burst, now), b.on_arrivals(burst, now)
            assert canon(dec_a) == canon(dec_b)
            for d in dec_a.dispatches:
                flight.append((d.batch_id, 0, d.route))
        assert (a.queue_length, a.batches_in_flight, a.wake_at_us) == \
            (b.queue_length, b.batches_in_flight, b.wake_at_us)
    assert taken > 100
    assert refused > 10
    # a batch it does not know, a stage out of range, a later plan's older batch: refused
    assert not router.finish(model, 10**9, 0, now, now)
    router.first_batch_id = 10**9
    assert not router.finish(model, 0, 0, now, now)
    router.first_batch_id = 0
    router.stopping = True
    assert not router.finish(model, 0, 0, now, now)
