"""Admission at the door (ppipe_trt.serving.admission), on a fake clock, and its wiring into the
runtime's admission of requests."""

from __future__ import annotations

import math

import pytest

from ppipe_trt.errors import ConfigError
from ppipe_trt.serving.admission import AdmissionControl, AdmissionOptions

MS = 1000.0


def drive(control: AdmissionControl, start_us: float, end_us: float, rate_rps: float,
          lag_us: float) -> tuple[int, int]:
    """Offer ``rate_rps`` evenly from ``start_us`` to ``end_us`` while every probe (each 5 ms)
    reports ``lag_us``; returns (offered, admitted)."""
    offered = admitted = 0
    gap = 1e6 / rate_rps
    t, probe = start_us, start_us
    while t < end_us:
        while probe <= t:
            control.observe_lag(lag_us, probe)
            probe += 5 * MS
        offered += 1
        admitted += control.admit(t)
        t += gap
    return offered, admitted


def test_no_limit_while_the_front_end_keeps_up():
    c = AdmissionControl()
    offered, admitted = drive(c, 0.0, 2e6, 500.0, lag_us=1 * MS)
    assert admitted == offered
    assert c.limit_rps == math.inf and c.refused == 0


def test_a_lagging_front_end_gets_a_limit_below_what_it_admitted():
    c = AdmissionControl()
    drive(c, 0.0, 1e6, 400.0, lag_us=20 * MS)
    assert c.limit_rps < 400.0
    assert c.lag_us == pytest.approx(20 * MS)
    # with the lag persisting the limit keeps falling, and what is refused is refused at once
    before = c.limit_rps
    offered, admitted = drive(c, 1e6, 2e6, 400.0, lag_us=20 * MS)
    assert c.limit_rps < before
    assert admitted < offered and c.refused > 0


def test_one_pause_is_no_overload():
    c = AdmissionControl()
    drive(c, 0.0, 1e6, 400.0, lag_us=1 * MS)
    c.observe_lag(60 * MS, 1e6 + 1)   # a collection: one late probe, then the loop keeps up
    drive(c, 1e6 + 2, 2e6, 400.0, lag_us=1 * MS)
    assert c.limit_rps == math.inf


def test_a_lag_with_little_traffic_cuts_nothing():
    c = AdmissionControl()
    drive(c, 0.0, 2e6, 5.0, lag_us=30 * MS)   # below min_rate_rps
    assert c.limit_rps == math.inf


def test_the_limit_recovers_and_is_lifted_once_the_lag_is_gone():
    c = AdmissionControl()
    drive(c, 0.0, 1e6, 400.0, lag_us=20 * MS)
    assert c.limit_rps < 400.0
    drive(c, 1e6, 6e6, 100.0, lag_us=0.5 * MS)   # offered well below the limit, no lag
    assert c.limit_rps == math.inf
    offered, admitted = drive(c, 6e6, 7e6, 100.0, lag_us=0.5 * MS)
    assert admitted == offered


def test_a_burst_up_to_the_bucket_is_admitted():
    c = AdmissionControl(AdmissionOptions(burst_s=0.2))
    c.limit_rps = 50.0                      # as after a cut
    c._tokens, c._tokens_at_us = 0.0, 0.0
    # 0.2 s of 50 req/s = 10 tokens after a quiet second: a batch of 8 goes in whole
    assert all(c.admit(1e6) for _ in range(8))


@pytest.mark.parametrize("bad", [{"target_lag_us": 0.0}, {"decrease": 1.0},
                                 {"increase": 0.0}, {"confirm": 0}])
def test_bad_options_are_refused(bad):
    with pytest.raises(ConfigError, match="admission"):
        AdmissionOptions(**bad)


def test_status_says_the_limit_and_the_lag():
    c = AdmissionControl()
    assert c.status() == {"limit_rps": None, "front_end_lag_ms": 0.0, "target_lag_ms": 4.0,
                          "refused": 0}
    drive(c, 0.0, 1e6, 400.0, lag_us=20 * MS)
    s = c.status()
    assert s["limit_rps"] is not None and s["limit_rps"] < 400.0
    assert s["front_end_lag_ms"] == pytest.approx(20.0)


# ---- in the runtime ---------------------------------------------------------------------------

def _runtime(cpu_builds, emulated: bool = False):
    from ppipe_trt.profiles import load_profiles
    from ppipe_trt.serving.assembly import build_runtime
    from ppipe_trt.serving.local import pipeline_plan

    built = cpu_builds["demo_resnet"]
    profiles = load_profiles(built.profile_path)
    plan = pipeline_plan(profiles, "demo_resnet", cuts=[4], gpu_class="cpu", slo_ms=5_000.0)
    return build_runtime(plan, profiles, None if emulated else {"demo_resnet": built})


def test_a_lagging_front_end_refuses_at_the_door(cpu_builds):
    """The front end's event loop kept busy (each turn blocks it 15 ms) while requests
    arrive: after a few intervals requests are refused at once, saying why, and the status
    shows the limit and the lag."""
    import asyncio
    import time

    import numpy as np

    from ppipe_trt.errors import RequestRejectedError
    from ppipe_trt.serving.status import runtime_status

    x = {"image": np.zeros((1, 3, 224, 224), np.float32)}

    async def main(rt):
        rt.watch_front_end(asyncio.get_running_loop())
        futures = []
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            for _ in range(4):        # 4 requests per 15 ms turn: ~250 req/s offered
                futures.append(rt.submit("demo_resnet", x))
            time.sleep(0.015)         # the loop is busy: its timers run late
            await asyncio.sleep(0)
        return futures

    with _runtime(cpu_builds) as rt:
        futures = asyncio.run(main(rt))
        refused = []
        for f in futures:
            try:
                f.result(timeout=60)
            except RequestRejectedError as exc:
                refused.append(str(exc))
        status = runtime_status(rt)["admission"]
    door = [m for m in refused if "the front end is" in m]
    assert door, refused[:3]
    assert "server overloaded" in door[0] and "req/s" in door[0]
    assert status["refused"] >= len(door) and status["front_end_lag_ms"] > 4.0


def test_an_emulated_runtime_is_not_watched(cpu_builds):
    import asyncio

    with _runtime(cpu_builds, emulated=True) as rt:
        async def main():
            rt.watch_front_end(asyncio.get_running_loop())
        asyncio.run(main())
        assert rt.admission is None and rt.admission_status() is None
