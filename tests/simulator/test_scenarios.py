"""Workload-shift scenarios: rate curves and their non-homogeneous Poisson arrivals."""

from __future__ import annotations

import numpy as np
import pytest

from ppipe_trt.errors import ConfigError
from ppipe_trt.simulator.scenarios import (Phase, Scenario, build_scenario, diurnal, rotating,
                                           shifts, step)

MODELS = ("a", "b", "c")
W = (0.30, 0.33, 0.37)


def _counts(times_us, a_s, b_s):
    t = np.asarray(times_us) / 1e6
    return int(((t >= a_s) & (t < b_s)).sum())


def test_shifts_has_four_shifts_and_each_phase_the_asked_rates():
    sc = shifts(MODELS, W, duration_s=500.0, step_model=1, factor=3.0)
    assert sc.shifts == 4 and len(sc.phases) == 5
    scale = 400.0
    arr = sc.arrivals_us(scale, seed=1)
    for p in sc.phases:
        for i, times in enumerate(arr):
            expected = scale * p.relative[i] * (p.end_s - p.start_s)
            got = _counts(times, p.start_s, p.end_s)
            assert abs(got - expected) < 5 * np.sqrt(expected), (p, i, got, expected)
    assert sc.phases[2].relative == (0.30, 0.99, 0.37)          # x3 on model 1
    assert sc.phases[1].relative == (0.33, 0.37, 0.30)          # rotated by one
    for times in arr:
        assert np.all(np.diff(times) >= 0)


def test_arrivals_are_seeded():
    sc = step(MODELS, W, 60.0)
    a = sc.arrivals_us(300.0, seed=4)
    b = sc.arrivals_us(300.0, seed=4)
    c = sc.arrivals_us(300.0, seed=5)
    assert a == b and a != c


def test_diurnal_thinning_follows_the_curve():
    sc = diurnal(MODELS, W, 400.0, amplitude=0.6)
    scale = 500.0
    arr = sc.arrivals_us(scale, seed=2)
    for i, times in enumerate(arr):
        for a_s in range(0, 400, 50):
            # integral of the curve over the bin, numerically
            grid = np.linspace(a_s, a_s + 50, 2001)
            expected = scale * np.trapezoid(sc.relative_at(grid)[i], grid)
            got = _counts(times, a_s, a_s + 50)
            assert abs(got - expected) < 5 * np.sqrt(expected) + 5, (i, a_s, got, expected)
    # the mix really changes: model a's share differs by > 0.1 between two quarters
    q1 = sc.mean_relative(0, 100)
    q3 = sc.mean_relative(200, 300)
    assert abs(q1[0] / q1.sum() - q3[0] / q3.sum()) > 0.1


def test_rotating_moves_each_weight_one_model_on():
    sc = rotating(MODELS, W, 90.0, 30.0)
    assert [p.relative for p in sc.phases] == [W, (0.33, 0.37, 0.30), (0.37, 0.30, 0.33)]


def test_time_scaled_keeps_the_shape():
    sc = shifts(MODELS, W, 7200.0)
    fast = sc.time_scaled(10)
    assert fast.duration_s == pytest.approx(720.0)
    assert [p.relative for p in fast.phases] == [p.relative for p in sc.phases]
    assert np.allclose(fast.mean_relative(), sc.mean_relative())


def test_bad_scenarios_are_errors():
    with pytest.raises(ConfigError, match="tile"):
        Scenario("x", ("a",), (Phase(0, 10, (1.0,)), Phase(11, 20, (1.0,))))
    with pytest.raises(ConfigError, match="rates"):
        Scenario("x", ("a", "b"), (Phase(0, 10, (1.0,)),))
    with pytest.raises(ConfigError, match="unknown scenario"):
        build_scenario("nope", MODELS, W, 10.0)
    with pytest.raises(ConfigError):
        step(MODELS, W, 10.0, start_s=8.0, end_s=12.0)
