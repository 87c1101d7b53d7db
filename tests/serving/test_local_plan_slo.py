"""``local_plan``: a model whose SLO cannot be met on this machine is planned at the smallest
SLO that can, and recorded; ``strict_slo`` refuses instead (profiles only, no server)."""

from __future__ import annotations

import pytest

from ppipe_trt.errors import InfeasiblePlanError
from ppipe_trt.profiles.types import BlockLatencyTable, ModelProfile, ProfileSet
from ppipe_trt.serving.local import SLO_RAISED_PARAM, local_plan, time_sliced

from planner import verify_plan


def _profile(name: str, ms: float) -> ModelProfile:
    rows = ((ms * 1000.0, ms * 1800.0),) * 2  # two blocks, batch 1..2
    return ModelProfile(name, 2, (1000,), {("cpu", 1): BlockLatencyTable(name, "cpu", 1, rows)},
                        full_model_latency_us={"cpu": 2 * ms * 1000.0})


def _profiles() -> ProfileSet:
    # "a": 4 ms a sample (needs 6.67 ms planned at 60 %); "b": 1 ms
    return ProfileSet({"a": _profile("a", 2.0), "b": _profile("b", 0.5)}, "here")


def test_a_configured_slo_too_small_is_raised_and_recorded():
    profiles = _profiles()
    plan = local_plan(profiles, ["a", "b"], "cpu", 2, {"a": 1.0, "b": 20.0}, strict_slo=False)
    assert {m.model: m.slo_ms for m in plan.models} == {"a": 6.67, "b": 20.0}
    verify_plan(plan, profiles)
    raised = plan.params[SLO_RAISED_PARAM]
    assert list(raised) == ["a"]
    assert raised["a"]["asked_slo_ms"] == 1.0 and raised["a"]["slo_ms"] == 6.67
    assert raised["a"]["derived"] is False and raised["a"]["fastest_pipeline_ms"] == 4.0
    assert ("its configured SLO of 1 ms cannot be met on 2 cpu worker(s) of this machine: its "
            "fastest pipeline takes 4.00 ms at batch 1, planned at 60% of the SLO; the smallest "
            "feasible SLO is 6.67 ms") == raised["a"]["reason"]
    # every SLO met: nothing recorded
    ok = local_plan(profiles, ["a", "b"], "cpu", 2, {"a": 6.67, "b": 20.0}, strict_slo=False)
    assert SLO_RAISED_PARAM not in ok.params


def test_strict_slo_refuses_naming_the_model_its_slo_and_the_smallest_feasible():
    with pytest.raises(InfeasiblePlanError) as err:
        local_plan(_profiles(), ["a", "b"], "cpu", 2, {"a": 1.0, "b": 0.5}, strict_slo=True)
    text = str(err.value)
    assert "model a: its configured SLO of 1 ms cannot be met" in text
    assert "the smallest feasible SLO is 6.67 ms (give it slo_ms >= 6.67, or serve without " \
           "--strict-slo" in text
    assert "model b: its configured SLO of 0.5 ms" in text and "is 1.67 ms" in text


def test_a_derived_slo_is_raised_when_workers_share_the_cores():
    """Eleven workers on two cores: block latencies planned x5.5, while the SLO derived
    from the profile (5 x the whole model's latency, at least 50 ms) is not scaled."""
    base = ProfileSet({"big": _profile("big", 10.0), "small": _profile("small", 0.5)}, "here")
    profiles = time_sliced(base, ["big", "small"], "cpu", 5.5)
    plan = local_plan(profiles, ["big", "small"], "cpu", 11, strict_slo=False)
    slo = {m.model: m.slo_ms for m in plan.models}
    # big: 20 ms x 5.5 = 110 ms a sample, needs 183.34 ms; asked 5 x 20 ms = 100 ms
    assert slo == {"big": 183.34, "small": 50.0}
    raised = plan.params[SLO_RAISED_PARAM]["big"]
    assert raised["derived"] is True and raised["asked_slo_ms"] == 100.0
    assert raised["reason"].startswith(
        "its SLO of 100 ms (derived from the profile) cannot be met on 11 cpu worker(s)")
    verify_plan(plan, profiles)
