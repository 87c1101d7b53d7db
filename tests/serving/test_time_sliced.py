"""``time_sliced``: the CPU latencies a plan counts when more workers than cores share them."""

from __future__ import annotations

from ppipe_trt.profiles.types import BlockLatencyTable, ModelProfile, ProfileSet
from ppipe_trt.serving.local import local_plan, time_sliced, usable_cores


def _profile(name: str, ms: float) -> ModelProfile:
    rows = ((ms * 1000.0, ms * 1800.0),) * 2  # two blocks, batch 1..2
    return ModelProfile(name, 2, (1000,), {
        ("cpu", 1): BlockLatencyTable(name, "cpu", 1, rows),
        ("T4", 1): BlockLatencyTable(name, "T4", 1, rows)},
        full_model_latency_us={"cpu": 2 * ms * 1000.0})


def test_scales_the_class_of_the_models_named_only():
    profiles = ProfileSet({"a": _profile("a", 2.0), "b": _profile("b", 3.0)}, "here")
    got = time_sliced(profiles, ["a"], "cpu", 1.5)
    assert got["a"].tables[("cpu", 1)].latency_us == ((3000.0, 5400.0),) * 2
    assert got["a"].tables[("T4", 1)] is profiles["a"].tables[("T4", 1)]
    assert got["b"] is profiles["b"]
    assert got["a"].full_model_latency_us == profiles["a"].full_model_latency_us  # SLO as is
    assert "x1.50" in got.source
    assert time_sliced(profiles, ["a"], "cpu", 1.0) is profiles
    assert usable_cores() >= 1


def test_a_plan_on_shared_cores_counts_the_slower_workers():
    profiles = ProfileSet({"a": _profile("a", 2.0), "b": _profile("b", 3.0)}, "here")
    alone = local_plan(profiles, ["a", "b"], "cpu", 2, {"a": 100.0, "b": 100.0})
    shared = local_plan(time_sliced(profiles, ["a", "b"], "cpu", 2.0), ["a", "b"], "cpu", 2,
                        {"a": 100.0, "b": 100.0})
    rate = {m.model: m.throughput_rps for m in alone.models}
    for m in shared.models:  # two workers on one core: each does half as much
        assert abs(m.throughput_rps - rate[m.model] / 2) <= 0.02 * rate[m.model]
