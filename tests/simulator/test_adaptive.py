"""The adaptive control loop on the simulator: re-plans on a drift, not on noise."""

from __future__ import annotations

import pytest

from ppipe_trt.adapt import AdaptOptions
from ppipe_trt.cluster import ClusterSpec, GpuPool, Workload
from ppipe_trt.profiles.types import ProfileSet
from ppipe_trt.simulator import synthetic_profile
from ppipe_trt.simulator.adaptive import PlanCache, simulate_scenario
from ppipe_trt.simulator.replan_compare import run_policy, search_goodput
from ppipe_trt.simulator.scenarios import Phase, Scenario, step
from ppipe_trt.simulator.swap import SwapCosts

CLUSTER = ClusterSpec((GpuPool("H", 4, 2, 2, 10.0), GpuPool("L", 4, 2, 1, 10.0)), "H-L")
COSTS = SwapCosts(solve_s=0.5, worker_startup_s=0.05)


@pytest.fixture(scope="module")
def setup():
    from planner import plan_cluster
    profiles = ProfileSet({m: synthetic_profile(m, {("H", 1): [a, a], ("H", 2): [1.6 * a, 1.6 * a],
                                                    ("L", 1): [3 * a, 3 * a]})
                           for m, a in (("a", 1000.0), ("b", 1500.0))})
    base = plan_cluster(profiles, CLUSTER, [Workload("a", 20.0, 0.5), Workload("b", 30.0, 0.5)])
    return profiles, base


def test_no_replan_on_a_steady_mix(setup):
    profiles, base = setup
    flat = Scenario("flat", ("a", "b"), (Phase(0.0, 60.0, (0.5, 0.5)),))
    res = simulate_scenario(base, profiles, flat, 1500.0, adapt=AdaptOptions(), costs=COSTS)
    assert res.swaps == () and res.replans["asked"] == 0
    assert res.attainment >= 0.99


def test_a_x3_step_triggers_a_swap_soon_after_it_and_serves_better(setup):
    profiles, base = setup
    sc = step(("a", "b"), (0.5, 0.5), 90.0, model=1, factor=3.0, start_s=30.0, end_s=90.0)
    cache = PlanCache(base, profiles)
    adaptive = simulate_scenario(base, profiles, sc, 1500.0, adapt=AdaptOptions(),
                                 cache=cache, costs=COSTS)
    static = simulate_scenario(base, profiles, sc, 1500.0)
    assert adaptive.swaps, "a x3 step past the plan's capacity must trigger a swap"
    first = adaptive.swaps[0]
    assert 30e6 <= first.decided_us <= 40e6
    assert first.at_us == pytest.approx(first.decided_us + 0.55e6)
    assert adaptive.answered_twice == 0 and "unresolved" not in adaptive.outcomes
    assert adaptive.attainment > static.attainment + 0.05
    late_windows = adaptive.windows.attainment[60:90]
    assert min(late_windows) >= 0.95, "after the swap the new plan should keep up"


def test_goodput_search_brackets_and_bisects():
    calls = []

    class R:
        def __init__(self, s):
            self.scale_rps = s
            self.attainment = 1.0 if s <= 1000.0 else 0.9

    def run_at(s):
        calls.append(s)
        return R(s)

    lo, runs = search_goodput(run_at, 800.0, target=0.99, steps=8, step=0.1)
    assert len(runs) == 8 and 980.0 <= lo <= 1000.0
    lo, _ = search_goodput(run_at, 1500.0, target=0.99, steps=6, step=0.1)
    assert lo is not None and lo <= 1000.0


def test_oracle_switches_at_phase_starts(setup):
    profiles, base = setup
    sc = step(("a", "b"), (0.5, 0.5), 30.0, model=1, factor=3.0, start_s=10.0, end_s=20.0)
    res = run_policy("oracle", base, profiles, sc, 1500.0, PlanCache(base, profiles),
                     costs=COSTS)
    assert [round(s.at_us / 1e6, 6) for s in res.swaps] == [10.0, 20.0]


def test_cli_simulate_scenario_adapt(tmp_path, shared_profiles, profiles_dir, capsys):
    import json

    from planner import plan_cluster
    from ppipe_trt.cli import main
    from ppipe_trt.plan import save_plan
    cluster = ClusterSpec((GpuPool("L4", 4, 4, 4, 10.0), GpuPool("T4", 8, 2, 4, 10.0)), "L4-T4")
    models = ("googlenet-v3-pytorch", "repvgg-b3")
    wl = [Workload(m, 5 * shared_profiles[m].batch1_latency_us("L4") / 1000, 0.5) for m in models]
    plan = plan_cluster(shared_profiles, cluster, wl)
    path = save_plan(plan, tmp_path / "plan.json")
    out = tmp_path / "s.json"
    rc = main(["simulate", str(path), "--profiles", str(profiles_dir), "--scenario", "step",
               "--duration", "45s", "--load", "0.6", "--adapt", "--solve-s", "0.2",
               "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "scenario step" in text and "swap at" in text
    data = json.loads(out.read_text())
    assert data["swaps"] and 15.0 <= data["swaps"][0]["decided_s"] <= 25.0
    assert len(data["windows"]["attainment"]) == 45
    assert data["answered_twice"] == 0 and "unresolved" not in data["outcomes"]
    assert main(["simulate", str(path), "--profiles", str(profiles_dir), "--adapt"]) == 1
    assert "add --scenario" in capsys.readouterr().err
