"""Candidate enumeration: SLO feasibility, exact pruning, batch and MPS limits."""

from __future__ import annotations

import pytest

from planner import PlannerOptions, plan_cluster, verify_plan
from planner.candidates import CandidateSet, enumerate_candidates
from planner.milp import solve_allocation


def _sets(profiles, cluster, workloads, prune, rate=400.0):
    return [enumerate_candidates(profiles[w.model], w, cluster, max_stages=2, max_batch=8,
                                 slo_budget_fraction=0.6, rate_rps=rate,
                                 batching_delay_factor=1.3, prune=prune)
            for w in workloads]


def test_candidates_fit_slo_and_profile_limits(shared_profiles, setting):
    cluster = setting.cluster("L4-T4")
    for wl, cset in zip(setting.workloads(3, shared_profiles),
                        _sets(shared_profiles, cluster, setting.workloads(3, shared_profiles),
                              prune=False)):
        prof = shared_profiles[wl.model]
        assert cset.candidates and cset.enumerated == len(cset.candidates)
        for c in cset.candidates:
            assert c.latency_us <= wl.slo_us * 0.6 + 1e-6
            assert c.stages[0].first_block == 0 and c.stages[-1].last_block == prof.num_blocks - 1
            for s in c.stages:
                assert c.batch_size <= prof.max_batch(s.gpu_class, s.mps_share)
                assert s.latency_us == pytest.approx(prof.range_latency_us(
                    s.gpu_class, s.mps_share, s.first_block, s.last_block, c.batch_size))


def test_pruning_removes_candidates_but_never_the_optimum(shared_profiles, setting):
    cluster = setting.cluster("V100-T4")
    workloads = setting.workloads(2, shared_profiles)
    limits = {p.gpu_class: p.count for p in cluster.pools}
    full = _sets(shared_profiles, cluster, workloads, prune=False)
    pruned = _sets(shared_profiles, cluster, workloads, prune=True)
    assert sum(len(s.candidates) for s in pruned) < sum(len(s.candidates) for s in full) / 2
    kw = dict(solver="highs", time_limit_s=120, mip_rel_gap=1e-6, tie_break=False)
    a = solve_allocation(full, workloads, limits, **kw)
    b = solve_allocation(pruned, workloads, limits, **kw)
    assert b.normalized_throughput == pytest.approx(a.normalized_throughput, rel=1e-5)


def test_no_rate_means_batch_one_only(shared_profiles, setting):
    wl = setting.workloads(2, shared_profiles)[0]
    cset = enumerate_candidates(shared_profiles[wl.model], wl, setting.cluster("L4-T4"),
                                max_stages=2, max_batch=8, slo_budget_fraction=0.6,
                                rate_rps=None, batching_delay_factor=1.3)
    assert isinstance(cset, CandidateSet)
    assert {c.batch_size for c in cset.candidates} == {1}


def test_given_arrival_rates_set_the_batching_delay(shared_profiles, setting):
    cluster = setting.cluster("V100-P4")
    workloads = setting.workloads(2, shared_profiles)
    rates = {w.model: 1000.0 for w in workloads}
    plan = plan_cluster(shared_profiles, cluster, workloads, "ppipe",
                        PlannerOptions(solver="highs", arrival_rates_rps=rates))
    verify_plan(plan, shared_profiles)
    assert plan.params["arrival_rates_rps"] == rates
    for m in plan.models:
        for p in m.pipelines:
            assert p.batching_delay_us == pytest.approx(1.3 * (p.batch_size - 1) / 1000.0 * 1e6)
