"""The adaptive control loop (``serve --adapt``) and its pieces: rate estimates, the re-plan
policy's hysteresis, and a live runtime that re-plans when its traffic mix shifts."""

from __future__ import annotations

import time

import pytest

from ppipe_trt.adapt import AdaptOptions, RateEstimator, ReplanPolicy, mix_drift
from ppipe_trt.errors import BadInputError, RequestRejectedError
from ppipe_trt.serving.adaptive import adapt_options_from, parse_plan_push
from ppipe_trt.serving.options import RuntimeOptions

MODELS = ["googlenet-v3-pytorch", "repvgg-b3"]


def test_rate_estimator_follows_a_step_with_its_half_life():
    est = RateEstimator(["a"], half_life_s=2.0)
    est.update({"a": 0}, 0.0)
    n = 0
    for s in range(1, 11):             # 100 req/s for 10 s
        n += 100
        est.update({"a": n}, s * 1e6)
    assert est.rates_rps["a"] == pytest.approx(100.0)
    for s in range(11, 13):            # then 300 req/s: half-way after one half-life (2 s)
        n += 300
        est.update({"a": n}, s * 1e6)
    assert est.rates_rps["a"] == pytest.approx(200.0, rel=1e-6)


def test_policy_needs_a_lasting_drift_and_a_minimum_interval():
    from types import SimpleNamespace as NS

    plan = NS(models=[NS(model="a", weight=1.0, throughput_rps=1000.0),
                      NS(model="b", weight=1.0, throughput_rps=1000.0)])
    pol = ReplanPolicy(plan, AdaptOptions(confirm_windows=3, min_interval_s=10.0), 0.0)
    shifted = {"a": 300.0, "b": 100.0}   # drift 0.25
    assert mix_drift(shifted, {"a": 1, "b": 1}) == pytest.approx(0.25)
    # one noisy window, then back: nothing
    assert pol.observe(shifted, 11e6) is None
    assert pol.observe({"a": 100.0, "b": 100.0}, 12e6) is None
    # three windows in a row: a request, weights from the observed rates
    assert pol.observe(shifted, 13e6) is None and pol.observe(shifted, 14e6) is None
    ask = pol.observe(shifted, 15e6)
    assert ask is not None and ask.weights == shifted and "mix drifted 0.25" in ask.reason
    # too soon after a swap: no request however long it lasts
    pol.plan_changed(plan, 15e6)
    assert all(pol.observe(shifted, t * 1e6) is None for t in range(16, 25))
    assert pol.observe(shifted, 26e6) is not None
    # demand above capacity with the planned mix
    pol.plan_changed(plan, 30e6)
    over = {"a": 990.0, "b": 990.0}
    assert [pol.observe(over, t * 1e6) for t in (41, 42)] == [None, None]
    assert "planned capacity" in pol.observe(over, 43e6).reason


def test_pushes_and_options_are_checked():
    with pytest.raises(BadInputError, match="weight of 'a' must be a number > 0"):
        parse_plan_push({"weights": {"a": 0}})
    with pytest.raises(BadInputError, match="JSON object"):
        parse_plan_push([1])
    assert parse_plan_push({"weights": {"a": 2}}).weights == {"a": 2.0}
    with pytest.raises(BadInputError, match="unknown adapt option 'nope'"):
        adapt_options_from({"nope": "1"})
    assert adapt_options_from({"confirm_windows": "2"}).confirm_windows == 2


def test_a_shifted_mix_makes_the_live_runtime_replan(shared_profiles, profiles_dir):
    """Traffic 3:1 on a plan made for 1:1: after the confirm windows the controller solves
    a plan for the observed rates (off the serving thread) and swaps it in; requests keep
    being answered."""
    from ppipe_trt.cluster import load_paper_setting
    from ppipe_trt.serving.adaptive import AdaptiveController
    from ppipe_trt.serving.assembly import build_runtime
    from ppipe_trt.serving.local import emulated_plan

    plan = emulated_plan(shared_profiles, load_paper_setting(profiles_dir).cluster("L4-T4"),
                         MODELS)
    rt = build_runtime(plan, shared_profiles, {}, RuntimeOptions(hop_overhead_us=50.0))
    rt.start()
    ctl = AdaptiveController(rt, AdaptOptions(window_s=0.2, half_life_s=0.2, confirm_windows=2,
                                              min_interval_s=0.0))
    rt.adaptive = ctl
    try:
        futures, report = [], None
        t_end = time.monotonic() + 10
        while report is None and time.monotonic() < t_end:
            for _ in range(20):            # ~300 / 100 req/s
                futures += [rt.submit(MODELS[0], None) for _ in range(3)]
                futures.append(rt.submit(MODELS[1], None))
                time.sleep(0.01)
            report = ctl.step()
        assert report is not None and report.generation == 1
        assert report.reason.startswith("adapt: mix drifted")
        new = rt.plan
        assert new.model(MODELS[0]).weight / new.model(MODELS[1]).weight == \
            pytest.approx(3.0, rel=0.35)
        # every request answered (a loaded test host may drop a few at admission)
        outcomes = [f.exception(10) or f.result() for f in futures]
        met = [o for o in outcomes if not isinstance(o, BaseException) and o.met_deadline]
        assert all(not isinstance(o, BaseException) or isinstance(o, RequestRejectedError)
                   for o in outcomes)
        assert len(met) >= 0.95 * len(outcomes)
        st = rt.status()["adapt"]
        assert st["enabled"] and st["decisions"][-1]["swapped"]
    finally:
        rt.stop()


def test_replan_weights_are_the_recent_rates_not_the_lagging_average():
    from types import SimpleNamespace as NS

    est = RateEstimator(["a", "b"], half_life_s=3.0, recent_windows=2)
    n = {"a": 0, "b": 0}
    est.update(n, 0.0)
    for s in range(1, 6):                      # 100 / 100 req/s
        n = {"a": n["a"] + 100, "b": n["b"] + 100}
        est.update(n, s * 1e6)
    for s in range(6, 9):                      # then 100 / 300 req/s
        n = {"a": n["a"] + 100, "b": n["b"] + 300}
        est.update(n, s * 1e6)
    assert est.recent_rps == {"a": pytest.approx(100.0), "b": pytest.approx(300.0)}
    assert est.rates_rps["b"] < 260.0          # the EWMA still lags
    plan = NS(models=[NS(model="a", weight=1.0, throughput_rps=1e4),
                      NS(model="b", weight=1.0, throughput_rps=1e4)])
    pol = ReplanPolicy(plan, AdaptOptions(confirm_windows=1, min_interval_s=0.0), 0.0)
    ask = pol.observe(est.rates_rps, 9e6, est.recent_rps)
    assert ask is not None and ask.weights == {"a": pytest.approx(100.0),
                                               "b": pytest.approx(300.0)}
