"""``ppipe_trt.adapt.replan``: relative weights (an operator's push) are planned as ``ppipe
plan`` plans them, with the planner's own arrival-rate estimate; observed rates (the control
loop) are passed as the rates the batching delay assumes."""

from __future__ import annotations

from planner import PlannerOptions, plan_cluster

from ppipe_trt.adapt import replan
from ppipe_trt.cluster import Workload

MODELS = ["googlenet-v3-pytorch", "repvgg-b3"]


def _first(shared_profiles, setting):
    from ppipe_trt.serving.local import default_slo_ms

    workloads = [Workload(m, default_slo_ms(shared_profiles, m), 1.0) for m in MODELS]
    return plan_cluster(shared_profiles, setting.cluster("L4-T4"), workloads, "ppipe",
                        PlannerOptions(solver="highs")), workloads


def test_relative_weights_are_not_taken_for_request_rates(shared_profiles, setting):
    first, workloads = _first(shared_profiles, setting)
    weights = {MODELS[0]: 3.0, MODELS[1]: 1.0}
    again = replan(first, shared_profiles, weights)
    direct = plan_cluster(shared_profiles, first.cluster,
                          [Workload(w.model, w.slo_ms, weights[w.model]) for w in workloads],
                          "ppipe", PlannerOptions(solver="highs"))
    assert again.normalized_throughput == direct.normalized_throughput
    assert again.params["arrival_rates_rps"] == direct.params["arrival_rates_rps"]
    # the planner's estimate is the cluster's scale (hundreds of req/s), not 3 and 1
    assert min(again.params["arrival_rates_rps"].values()) > 10.0


def test_observed_rates_are_the_batching_delay_rates(shared_profiles, setting):
    first, _ = _first(shared_profiles, setting)
    rates = {MODELS[0]: 600.0, MODELS[1]: 200.0}
    again = replan(first, shared_profiles, rates, arrival_rates_rps=rates)
    assert again.params["arrival_rates_rps"] == rates
