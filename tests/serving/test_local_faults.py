"""Faults of local stage workers: a raising, hung or wrong executor fails its batch with an
explicit error, the worker is quarantined, its pool's other workers serve what follows, and
status and metrics say so (see ppipe_trt.serving.faults)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import wait

import numpy as np
import pytest

from ppipe_trt.engines.backends.base import TensorSpec
from ppipe_trt.errors import BadInputError, RequestRejectedError
from ppipe_trt.profiles.types import ProfileSet
from ppipe_trt.scheduler import place_workers
from ppipe_trt.serving.assembly import RuntimeOptions, plan_schedulers
from ppipe_trt.serving.executors import StageExecutor
from ppipe_trt.serving.faults import FaultPolicy, StageWatchdog, output_problem, expected_outputs
from ppipe_trt.serving.local import pipeline_plan
from ppipe_trt.serving.runtime import ServingRuntime, StageFailedError
from ppipe_trt.serving.specs import build_worker, worker_specs
from ppipe_trt.serving.transport import InProcessTransport
from ppipe_trt.serving.types import ServedModel
from tests.serving.conftest import with_class

MODEL = "colorization-v2"
X = TensorSpec("x", "float32", (-1, 4))
Y = TensorSpec("y", "float32", (-1, 4))
SAMPLE = {"x": np.arange(4, dtype=np.float32).reshape(1, 4)}


class FakeExecutor(StageExecutor):
    """Doubles ``x`` into ``y``, or misbehaves as ``behaviour`` says: ``raise`` (every
    batch), ``raise_bad_input``, ``hang`` (until ``release`` is set), ``bad_shape``,
    ``bad_dtype``."""

    label = "fake"

    def __init__(self, behaviour: str = "ok"):
        self.behaviour = behaviour
        self.release = threading.Event()
        self.calls = 0
        self.returned = 0

    @property
    def inputs(self):
        return (X,)

    @property
    def outputs(self):
        return (Y,)

    def run(self, tensors, batch_size):
        self.calls += 1
        x = tensors["x"]
        if self.behaviour == "raise":
            raise RuntimeError("engine exploded")
        if self.behaviour == "raise_bad_input":
            raise BadInputError("input 'x' rejected")
        if self.behaviour == "hang":
            self.release.wait(10)
        self.returned += 1
        if self.behaviour == "bad_shape":
            return {"y": np.zeros((batch_size, 3), np.float32)}
        if self.behaviour == "bad_dtype":
            return {"y": x.astype(np.float64)}
        return {"y": x * 2}


def fake_runtime(profiles_set, executors, **option_kw) -> ServingRuntime:
    """A runtime (not started) serving MODEL as one stage on a pool of one worker per
    executor (an emulated class of 10 x 1 ms blocks: the second request of a pair
    arrives while the first one's worker is busy), SLO 1 s."""
    profile = with_class(profiles_set[MODEL], "FAKE", 1000.0)
    profiles = ProfileSet({MODEL: profile})
    plan = pipeline_plan(profiles, MODEL, cuts=[], gpu_class="FAKE",
                         workers_per_stage=len(executors), slo_ms=1000.0)
    options = RuntimeOptions(hop_overhead_us=100.0, deadline_margin_fraction=0.0,
                             freeze_gc=False, switch_interval_s=None, **option_kw)
    placement = place_workers(plan)
    schedulers = plan_schedulers(plan, profiles, placement, options, options.hop_overhead_us)
    models = {MODEL: ServedModel(MODEL, (X,), (Y,), 1e6, 1, "fake")}
    transport = InProcessTransport()
    rt = ServingRuntime(plan, models, schedulers, transport, hop_overhead_us=100.0,
                        options=options)
    faults = FaultPolicy.from_options(options)
    watchdog = StageWatchdog(faults.watchdog_period_s)
    for spec, ex in zip(worker_specs(plan, profiles, {}, options, placement), executors):
        rt.add_worker(build_worker(spec, transport, rt, faults=faults, watchdog=watchdog,
                                   executor=ex))
    return rt


def _worker_of(rt, ex):
    return next(w for w in rt.workers if w._executor is ex)


def _wait_quarantined(rt, n=1, timeout_s=3.0):
    end = time.monotonic() + timeout_s
    while len(rt.quarantined) < n and time.monotonic() < end:
        time.sleep(0.005)
    assert len(rt.quarantined) >= n, "no worker was quarantined"


def _serve_pairs(rt, pairs):
    """Submit ``pairs`` pairs of requests (two at once: one per worker of the pool); returns
    every future, all answered."""
    futures = []
    for _ in range(pairs):
        pair = [rt.submit(MODEL, SAMPLE) for _ in range(2)]
        done, pending = wait(pair, timeout=3)
        assert not pending, "every request must be answered"
        futures += pair
    return futures


def _outcomes(futures):
    oks = [f.result() for f in futures if f.exception() is None]
    errors = [f.exception() for f in futures if f.exception() is not None]
    return oks, errors


def _metrics(rt) -> str:
    from api.metrics import AppMetrics

    return AppMetrics(lambda: rt).render().decode()


@pytest.mark.parametrize("behaviour,expected", [
    ("bad_shape", "output 'y': expected shape (1, 4), got (1, 3)"),
    ("bad_dtype", "output 'y': expected dtype float32, got float64"),
])
def test_wrong_outputs_fail_the_batch_and_quarantine_at_once(shared_profiles, behaviour,
                                                             expected):
    bad, good = FakeExecutor(behaviour), FakeExecutor()
    with fake_runtime(shared_profiles, [bad, good]) as rt:
        first = _serve_pairs(rt, 1)
        _wait_quarantined(rt)
        later = _serve_pairs(rt, 3)
        worker = _worker_of(rt, bad)
        status = rt.status()
        metrics = _metrics(rt)
    oks, errors = _outcomes(first)
    assert len(oks) == 1 and len(errors) == 1
    err = errors[0]
    assert isinstance(err, StageFailedError)
    assert f"stage 0 of {MODEL} failed on worker {worker.worker_id}" in str(err)
    assert "BadStageOutputError" in str(err) and expected in str(err)
    assert np.array_equal(oks[0].outputs["y"], SAMPLE["x"] * 2)
    # the pool's other worker serves everything that follows; the bad one got no more work
    oks, errors = _outcomes(later)
    assert len(oks) == 6 and not errors
    assert bad.calls == 1
    entry = next(w for w in status["workers"] if w["worker_id"] == worker.worker_id)
    assert entry["alive"] is False and expected in entry["down_reason"]
    assert [q["worker_id"] for q in status["quarantined"]] == [worker.worker_id]
    assert status["quarantined"][0]["reason"].startswith("bad outputs:")
    up = [ln for ln in metrics.splitlines() if ln.startswith("ppipe_worker_up{")]
    assert any(f'worker="{worker.worker_id}"' in ln and ln.endswith(" 0.0") for ln in up)
    assert sum(ln.endswith(" 1.0") for ln in up) == 1
    down = [ln for ln in metrics.splitlines() if ln.startswith("ppipe_worker_down_info{")]
    assert len(down) == 1 and f'worker="{worker.worker_id}"' in down[0] \
        and "bad outputs" in down[0]


def test_consecutive_errors_quarantine_after_the_limit(shared_profiles):
    bad, good = FakeExecutor("raise"), FakeExecutor()
    with fake_runtime(shared_profiles, [bad, good], quarantine_after_errors=3) as rt:
        futures = []
        for _ in range(10):
            futures += _serve_pairs(rt, 1)
            if rt.quarantined:
                break
            assert bad.calls < 3, "3 failures in a row must quarantine the worker"
        _wait_quarantined(rt)
        worker = _worker_of(rt, bad)
        later = _serve_pairs(rt, 3)
    oks, errors = _outcomes(futures)
    assert bad.calls == 3 and len(errors) == 3
    assert all(isinstance(e, StageFailedError) and "RuntimeError: engine exploded" in str(e)
               for e in errors)
    assert rt.quarantined[0].worker_id == worker.worker_id
    assert rt.quarantined[0].reason == ("3 batches in a row failed; the last with "
                                        "RuntimeError: engine exploded")
    assert not worker.alive
    oks, errors = _outcomes(later)
    assert len(oks) == 6 and not errors and bad.calls == 3


def test_one_error_or_rejected_inputs_do_not_quarantine(shared_profiles):
    bad = FakeExecutor("raise_bad_input")
    with fake_runtime(shared_profiles, [bad], quarantine_after_errors=1) as rt:
        futures = [rt.submit(MODEL, SAMPLE).exception(timeout=3) for _ in range(3)]
        time.sleep(0.05)
        assert not rt.quarantined and rt.workers[0].alive
    assert all(isinstance(e, StageFailedError) and "input 'x' rejected" in str(e)
               for e in futures)


def test_a_hung_batch_is_failed_by_the_watchdog_and_its_worker_quarantined(shared_profiles):
    hung, good = FakeExecutor("hang"), FakeExecutor()
    rt = fake_runtime(shared_profiles, [hung, good], stage_timeout_min_s=0.2)
    try:
        rt.start()
        t0 = time.monotonic()
        # a burst: some requests queue behind the hung batch on its worker
        burst = [rt.submit(MODEL, SAMPLE) for _ in range(8)]
        done, pending = wait(burst, timeout=3)
        assert not pending, "every request must be answered"
        assert time.monotonic() - t0 < 1.0
        worker = _worker_of(rt, hung)
        _wait_quarantined(rt)
        later = _serve_pairs(rt, 2)
        # the hung call returns at last: its result is dropped, nothing is answered twice
        hung.release.set()
        time.sleep(0.1)
        status = rt.status()
    finally:
        hung.release.set()
        rt.stop()
    oks, errors = _outcomes(burst)
    timeouts = [e for e in errors if isinstance(e, StageFailedError)]
    assert len(timeouts) == 1
    msg = str(timeouts[0])
    assert "StageTimeoutError" in msg and f"on worker {worker.worker_id}" in msg
    assert "stage 0" in msg and "past its limit of 200 ms" in msg
    # the others were served by the other worker or told that their worker failed
    assert all(isinstance(e, RequestRejectedError) and e.reason == "worker_failed"
               for e in errors if e not in timeouts)
    assert len(oks) >= 1
    oks, errors = _outcomes(later)
    assert len(oks) == 4 and not errors
    assert hung.calls == 1 and hung.returned == 1
    assert worker.stats().batches == 0 and worker.stats().failures == 1
    entry = next(w for w in status["workers"] if w["worker_id"] == worker.worker_id)
    assert entry["alive"] is False and entry["down_reason"].startswith("hung: ")
    snap = rt.stats.snapshot()[MODEL]
    assert snap.requests == snap.completions + snap.failures + sum(snap.drops.values())


def test_losing_the_last_worker_answers_no_workers_at_once(shared_profiles):
    bad = FakeExecutor("bad_shape")
    with fake_runtime(shared_profiles, [bad]) as rt:
        err = rt.submit(MODEL, SAMPLE).exception(timeout=3)
        assert isinstance(err, StageFailedError)
        _wait_quarantined(rt)
        t0 = time.monotonic()
        late = rt.submit(MODEL, SAMPLE).exception(timeout=3)
        waited_s = time.monotonic() - t0
    assert isinstance(late, RequestRejectedError) and late.reason == "no_workers"
    assert waited_s < 0.5  # at once, not at the deadline (1 s)


def test_output_problem_checks_names_rows_dims_and_dtype():
    expected = expected_outputs((TensorSpec("y", "float32", (-1, 4, -1)),))
    ok = np.zeros((2, 4, 7), np.float32)
    assert output_problem({"y": ok}, expected, 2) is None
    assert "missing" in output_problem({"z": ok}, expected, 2)
    assert "expected shape (2, 4, '?'), got (3, 4, 7)" in output_problem(
        {"y": np.zeros((3, 4, 7), np.float32)}, expected, 2)
    assert "got (2, 4)" in output_problem({"y": np.zeros((2, 4), np.float32)}, expected, 2)
    assert "expected an array, got list" in output_problem({"y": [1]}, expected, 2)
