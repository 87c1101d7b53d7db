"""Planning against the simulator: the margin with the highest simulated goodput is kept."""

from __future__ import annotations

import pytest

from ppipe_trt.errors import BadInputError
from ppipe_trt.profiles import load_profiles

from planner.tuning import TuningOptions, plan_by_simulation


def test_the_kept_plan_is_the_best_trial(setting, profiles_dir):
    profiles = load_profiles(profiles_dir)
    tuning = TuningOptions(slo_margins=(0.4, 0.2), duration_s=1.0, warmup_s=0.5, rel_tol=0.05)
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
