"""The goodput search on a small exact plan."""

from __future__ import annotations

import pytest

from ppipe_trt.cluster import ClusterSpec, GpuPool
from ppipe_trt.errors import ConfigError
from ppipe_trt.profiles.types import ProfileSet
from ppipe_trt.simulator import ModelSpec, SimConfig, hand_plan, simulate, synthetic_profile
from ppipe_trt.simulator.goodput import model_rates_rps, search_goodput

CLUSTER = ClusterSpec((GpuPool("H", 4, 2, 2, 10.0), GpuPool("L", 4, 2, 1, 10.0)), "H-L")
QUICK = SimConfig(duration_s=1.0, warmup_s=0.2)


def _setup():
    profiles = ProfileSet({
        "a": synthetic_profile("a", {("H", 1): [1000.0, 1000.0], ("L", 1): [3000.0, 3000.0]}),
        "b": synthetic_profile("b", {("H", 1): [500.0, 500.0], ("L", 1): [1500.0, 1500.0]})})
    plan = hand_plan(profiles, CLUSTER, [
        ModelSpec("a", 20.0, [(2, [(0, 1, "H", 1, 2)])], weight=0.25),
        ModelSpec("b", 20.0, [(2, [(0, 1, "L", 1, 4)])], weight=0.75)])
    return profiles, plan


def test_rates_follow_the_weights():
    _, plan = _setup()
    rates = model_rates_rps(plan, 1000.0)
    assert rates == pytest.approx({"a": 250.0, "b": 750.0})


def test_goodput_meets_the_target_and_a_little_more_does_not():
    profiles, plan = _setup()
    res = search_goodput(plan, profiles, QUICK, rel_tol=0.02)
    assert res.goodput_rps > 0
    assert res.at_goodput.min_attainment >= 0.99
    passed = [r for r, a in res.probes if a >= 0.99]
    failed = [r for r, a in res.probes if a < 0.99]
    assert max(passed) == res.goodput_rps
    assert failed and min(f for f in failed if f > res.goodput_rps) <= res.goodput_rps * 1.021
    # the goodput run offered the models their weighted shares
    offered = {m.model: m.offered_rps for m in res.at_goodput.models}
    assert offered["b"] == pytest.approx(3 * offered["a"])
    again = simulate(plan, profiles, SimConfig(duration_s=1.0, warmup_s=0.2,
                                               rates_rps=model_rates_rps(plan, res.goodput_rps)))
    assert again.min_attainment == res.at_goodput.min_attainment


def test_bad_search_parameters_are_refused():
    profiles, plan = _setup()
    with pytest.raises(ConfigError, match="target"):
        search_goodput(plan, profiles, QUICK, target=1.5)
    with pytest.raises(ConfigError, match="start rate"):
        search_goodput(plan, profiles, QUICK, start_rps=0.0)
