"""The schedulers' decisions, pinned: the same arrivals give the same decisions as when
``data/decision_digests.json`` was written.

A change that is meant to be exact (a faster probe, a compiled hot path, a leaner data plane)
must leave every decision as it was.  Each case drives the simulator's event loop (the same
scheduler objects the live runtime uses) over fixed Poisson arrivals on a 100-GPU paper plan
(``data/plan-*.json``, planned once with ``scripts/reproduce_paper.py``'s planner and kept
here so that a solver update cannot change them) and records every scheduler call: its
kind, time, the batches it dispatched (batch id, pipeline, requests, per stage the worker,
reserved start and finish, link transfer), the requests it dropped and why, and the next
wake-up.  Times are rounded to the nanosecond; the record's SHA-256 must match.

A change that is meant to change decisions updates the digests on purpose, and says why in
its commit:

    PPIPE_UPDATE_DIGESTS=1 .venv/bin/python -m pytest tests/scheduler/test_decision_digest.py
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest

from toys import decision_words

DATA = Path(__file__).parent / "data"
DIGESTS = DATA / "decision_digests.json"
PLANS = ("plan-g5-L4-P4.json", "plan-g3-V100-P4.json", "plan-g1-L4-T4.json")
POLICIES = {
    "reservation": ("reservation", None),
    "reservation-work-conserving": ("reservation", {"work_conserving": True}),
    "reservation-max-queue": ("reservation", {"max_queue": 6}),
    "reactive": ("reactive", None),
}
LOADS = (0.7, 1.2)
SIMULATED_S = 1.5
CASES = [(plan, policy, load) for plan in PLANS for policy in POLICIES for load in LOADS]


def _t(us: float | None) -> str:
    return "-" if us is None else f"{us:.3f}"


class Recorder:
    """Wraps a scheduler; appends one line per call to ``lines``."""

    def __init__(self, inner, lines: list[str], counts: dict):
        self.inner = inner
        self.lines = lines
        self.counts = counts

    def _record(self, kind: str, now_us: float, dec):
        c = self.counts
        c["calls"] += 1
        c["dispatches"] += len(dec.dispatches)
        c["dispatched_requests"] += sum(len(d.requests) for d in dec.dispatches)
        c["drops"] += len(dec.drops)
        self.lines.append(" ".join([kind, self.inner.model, _t(now_us),
                                    *decision_words(dec, _t)]))
        return dec

    def __getattr__(self, name):  # everything else (properties, swaps) as the scheduler's
        return getattr(self.inner, name)

    def on_arrival(self, request, now_us):
        return self._record(f"a{request.request_id}", now_us,
                            self.inner.on_arrival(request, now_us))

    def on_arrivals(self, requests, now_us):
        ids = ",".join(str(r.request_id) for r in requests)
        return self._record(f"A{ids}", now_us, self.inner.on_arrivals(requests, now_us))

    def on_stage_finished(self, batch_id, stage, finish_us, now_us):
        return self._record(f"f{batch_id}.{stage}@{_t(finish_us)}", now_us,
                            self.inner.on_stage_finished(batch_id, stage, finish_us, now_us))

    def on_wake(self, now_us):
        return self._record("w", now_us, self.inner.on_wake(now_us))

    def drain(self, now_us):
        return self._record("d", now_us, self.inner.drain(now_us))


def run_case(plan_file: str, policy_name: str, load: float) -> dict:
    """The digest and counts of one case's decision record."""
    from ppipe_trt.plan import load_plan
    from ppipe_trt.profiles import default_profiles_dir, load_profiles
    from ppipe_trt.simulator import SimConfig
    from ppipe_trt.simulator.engine import run_events

    plan = load_plan(DATA / plan_file)
    profiles = load_profiles(default_profiles_dir(), plan.model_names)
    policy, options = POLICIES[policy_name]
    config = SimConfig(load_factor=load, duration_s=SIMULATED_S, warmup_s=0.0, policy=policy,
                       policy_options=options)
    end_us = SIMULATED_S * 1e6
    arrivals = []
    for i, m in enumerate(plan.models):  # Python's generator: stable across numpy versions
        rng = random.Random(f"{plan_file}:{i}")
        rate_per_us = m.throughput_rps * load / 1e6
        t, times = 0.0, []
        while True:
            t += rng.expovariate(rate_per_us)
            if t >= end_us:
                break
            times.append(t)
        arrivals.append(times)
    lines: list[str] = []
    counts = dict.fromkeys(("calls", "dispatches", "dispatched_requests", "drops"), 0)
    run = run_events(plan, profiles, config, arrivals, end_us,
                     wrap=lambda s: Recorder(s, lines, counts))
    assert run.answered_twice == 0
    counts["arrivals"] = sum(len(a) for a in arrivals)
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return {"sha256": digest, **counts}


def _key(plan_file: str, policy: str, load: float) -> str:
    return f"{plan_file.removesuffix('.json')} {policy} {load:g}"


@pytest.fixture(scope="module")
def pinned(profiles_dir):
    if os.environ.get("PPIPE_UPDATE_DIGESTS"):
        table = {_key(*case): run_case(*case) for case in CASES}
        DIGESTS.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return json.loads(DIGESTS.read_text())


@pytest.mark.parametrize("plan_file,policy,load", CASES,
                         ids=[_key(*c).replace(" ", "-") for c in CASES])
def test_decisions_are_unchanged(pinned, plan_file, policy, load):
    key = _key(plan_file, policy, load)
    assert key in pinned, f"no pinned digest for {key!r}: run with PPIPE_UPDATE_DIGESTS=1"
    got = run_case(plan_file, policy, load)
    want = pinned[key]
    # the counts first: a failure then says how the decisions differ, not only that they do
    assert {k: got[k] for k in want if k != "sha256"} == \
        {k: v for k, v in want.items() if k != "sha256"}, key
    assert got["sha256"] == want["sha256"], (
        f"{key}: same counts, different decisions (times, routes or order); if the change "
        "is meant to change decisions, update the digests (see the module docstring)")


def test_the_cases_exercise_what_they_pin(pinned):
    """Every policy dispatches; the overloaded cases drop; the light ones do not (much)."""
    for plan_file, policy, load in CASES:
        c = pinned[_key(plan_file, policy, load)]
        assert c["dispatches"] > 100 and c["dispatched_requests"] > 0.5 * c["arrivals"]
        if load > 1.0:
            assert c["drops"] > 0, (plan_file, policy, load)
