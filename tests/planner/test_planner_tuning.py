"""Planning against the simulator: the margin with the highest simulated goodput is kept."""

from __future__ import annotations

import pytest

from ppipe_trt.errors import BadInputError
from ppipe_trt.profiles import load_profiles

from planner.tuning import TuningOptions, plan_by_simulation


def test_the_kept_plan_is_the_best_trial(setting, profiles_dir):
    profiles = load_profiles(profiles_dir)
    tuning = TuningOptions(slo_margins=(0.4, 0.2), duration_s=1.0, warmup_s=0.5, rel_tol=0.05,
                           adjust_weights=False)
    tuned = plan_by_simulation(profiles, setting.cluster("L4-T4"),
                               setting.workloads(2, profiles), tuning=tuning)
    assert [t.slo_margin for t in tuned.trials] == [0.4, 0.2]
    best = max(tuned.trials, key=lambda t: t.goodput_rps)
    assert tuned.goodput_rps == best.goodput_rps > 0
    assert tuned.slo_margin == best.slo_margin
    assert tuned.plan.params["slo_margin"] == tuned.slo_margin
    # a smaller margin leaves the planner more room: it never plans less
    assert tuned.trials[1].planned_rps >= tuned.trials[0].planned_rps - 1e-6


@pytest.mark.parametrize("bad", [(), (1.0,), (-0.1,)])
def test_bad_margins_are_refused(bad):
    with pytest.raises(BadInputError, match="margin"):
        TuningOptions(slo_margins=bad)


def test_with_weights_restores_the_real_weights(setting, profiles_dir):
    from planner import plan_cluster
    from planner.tuning import with_weights

    profiles = load_profiles(profiles_dir)
    plan = plan_cluster(profiles, setting.cluster("L4-T4"), setting.workloads(2, profiles))
    doubled = with_weights(plan, {m.model: 2 * m.weight for m in plan.models})
    assert [m.weight for m in doubled.models] == [2 * m.weight for m in plan.models]
    assert doubled.normalized_throughput == pytest.approx(plan.normalized_throughput / 2)


def test_a_weight_adjusted_replan_keeps_the_real_weights(setting, profiles_dir):
    from ppipe_trt.simulator import SimConfig

    from planner import PlannerOptions, plan_cluster
    from planner.tuning import _replan_by_load_factor

    profiles = load_profiles(profiles_dir)
    workloads = setting.workloads(2, profiles)
    plan = plan_cluster(profiles, setting.cluster("L4-T4"), workloads)
    tuning = TuningOptions(duration_s=1.0, warmup_s=0.5, rel_tol=0.05)
    out = _replan_by_load_factor(plan, profiles, setting.cluster("L4-T4"), workloads,
                                 PlannerOptions(), SimConfig(duration_s=1.0, warmup_s=0.5),
                                 tuning)
    assert out is not None
    goodput, replanned = out
    assert goodput > 0
    real = {w.model: w.weight for w in workloads}
    assert {m.model: m.weight for m in replanned.models} == real
    planned = replanned.params["planned_weights"]
    # a weight is divided by the model's load factor (<= 1): never smaller than the real one
    assert all(planned[m] >= real[m] - 1e-12 for m in real)
    assert replanned.normalized_throughput == pytest.approx(
        min(m.throughput_rps / m.weight for m in replanned.models))
