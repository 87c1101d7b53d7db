"""The simulator: determinism, physical model, metrics, arrivals, search and the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from ppipe_trt.cluster import ClusterSpec, GpuPool
from ppipe_trt.errors import ConfigError
from ppipe_trt.plan import save_plan
from ppipe_trt.profiles.types import ProfileSet
from ppipe_trt.simulator import (ArrivalSpec, ModelSpec, SimConfig, arrival_times_us, hand_plan,
                                 search_load_factor, simulate, synthetic_profile)

CLUSTER = ClusterSpec((GpuPool("H", 4, 2, 2, 10.0), GpuPool("L", 4, 2, 1, 10.0)), "H-L")


def _profiles():
    return ProfileSet({"toy": synthetic_profile(
        "toy", {("H", 1): [1000.0, 1000.0], ("H", 2): [1600.0, 1600.0],
                ("L", 1): [3000.0, 3000.0]})})


def _plan(profiles, slo_ms=20.0):
    return hand_plan(profiles, CLUSTER, [ModelSpec("toy", slo_ms, [
        (4, [(0, 1, "H", 1, 2)]), (2, [(0, 0, "H", 2, 2), (1, 1, "L", 1, 2)])])])


QUICK = SimConfig(duration_s=1.0, warmup_s=0.2)


def _strip(d):
    d = dict(d)
    d.pop("wall_s")
    return d


def test_same_seed_same_metrics_and_another_seed_differs():
    profiles = _profiles()
    plan = _plan(profiles)
    a = simulate(plan, profiles, replace(QUICK, seed=3, latency_cv=0.1))
    b = simulate(plan, profiles, replace(QUICK, seed=3, latency_cv=0.1))
    c = simulate(plan, profiles, replace(QUICK, seed=4, latency_cv=0.1))
    assert _strip(a.to_dict(workers=True)) == _strip(b.to_dict(workers=True))
    assert _strip(a.to_dict()) != _strip(c.to_dict())


@pytest.mark.parametrize("load", [0.5, 1.0, 1.5])
def test_reservations_hold_physically_without_noise(load):
    profiles = _profiles()
    plan = _plan(profiles)
    res = simulate(plan, profiles, replace(QUICK, load_factor=load))
    m = res.model("toy")
    assert m.requests > 0
    assert m.late == 0, "a reserved batch finished after its deadline with exact latencies"
    assert m.completed + m.late + m.dropped_total == m.requests
    assert "unresolved" not in m.dropped
    if load == 0.5:
        assert m.attainment >= 0.99


@pytest.mark.parametrize("policy", ["reactive", "triton"])
def test_baselines_resolve_every_request(policy):
    profiles = _profiles()
    plan = _plan(profiles)
    res = simulate(plan, profiles, replace(QUICK, policy=policy))
    m = res.model("toy")
    assert m.completed + m.late + m.dropped_total == m.requests > 0
    assert "unresolved" not in m.dropped


def test_utilisation_latency_and_queueing_are_exact_on_a_regular_trace(tmp_path):
    profiles = _profiles()
    plan = hand_plan(profiles, CLUSTER, [ModelSpec("toy", 20.0, [(1, [(0, 1, "H", 1, 1)])])])
    trace = tmp_path / "trace.txt"
    trace.write_text("\n".join(f"{0.01 * i:.2f}" for i in range(50)) + "\n")
    cfg = SimConfig(duration_s=1.0, warmup_s=0.105, arrivals=ArrivalSpec.parse(f"trace:{trace}"),
                    rates_rps={"toy": 100.0})  # one arrival every 10 ms
    res = simulate(plan, profiles, cfg)
    m = res.model("toy")
    assert m.requests == 100 and m.completed == 100
    # planned batch 1: each request runs at once, for 2000 us
    assert m.latency_p50_us == pytest.approx(2000.0, abs=1e-6)
    assert m.latency_max_us == pytest.approx(2000.0, abs=1e-6)
    assert m.batch_histogram == {1: 100}
    assert res.gpu_utilization["H"][0] == pytest.approx(0.2, rel=1e-6)
    assert res.utilization["H"] == pytest.approx(0.05, rel=1e-6)   # 4 H GPUs, 3 idle
    assert res.utilization["L"] == 0.0
    w0 = [w for w in res.workers if w.worker_id == 0][0]
    assert w0.mean_wait_us == 0.0 and w0.busy_fraction == pytest.approx(0.2, rel=1e-6)


def test_impossible_slo_drops_everything_with_a_reason():
    profiles = _profiles()
    plan = _plan(profiles, slo_ms=1.0)
    res = simulate(plan, profiles, QUICK)
    m = res.model("toy")
    assert m.completed == 0 and m.dropped == {"deadline_unreachable": m.requests}


def test_noise_makes_some_requests_late_but_every_one_is_resolved():
    profiles = _profiles()
    plan = _plan(profiles)
    res = simulate(plan, profiles, replace(QUICK, load_factor=1.0, latency_cv=0.3))
    m = res.model("toy")
    assert m.late > 0
    assert m.completed + m.late + m.dropped_total == m.requests


def test_poisson_and_gamma_arrivals_have_the_asked_rate_and_burstiness():
    rng = np.random.default_rng(1)
    t = np.array(arrival_times_us(ArrivalSpec.parse("poisson"), 2000.0, 0.0, 20e6, rng))
    assert len(t) / 20.0 == pytest.approx(2000.0, rel=0.03)
    gaps = np.diff(t)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)
    g = np.array(arrival_times_us(ArrivalSpec.parse("gamma:3"), 2000.0, 0.0, 20e6, rng))
    gg = np.diff(g)
    assert len(g) / 20.0 == pytest.approx(2000.0, rel=0.1)
    assert gg.std() / gg.mean() == pytest.approx(3.0, rel=0.1)
    assert np.all(np.diff(g) >= 0)


def test_bad_arrival_specs_are_errors(tmp_path):
    for text in ("gamma:x", "gamma:0", "uniform", "trace:/no/such/file"):
        with pytest.raises(ConfigError):
            ArrivalSpec.parse(text)
    bad = tmp_path / "bad.txt"
    bad.write_text("0.1\nabc\n")
    with pytest.raises(ConfigError, match="bad.txt:2"):
        arrival_times_us(ArrivalSpec.parse(f"trace:{bad}"), 10.0, 0.0, 1e6,
                         np.random.default_rng(0))


def test_search_finds_full_load_when_easy_and_less_when_overloaded():
    profiles = _profiles()
    plan = _plan(profiles)
    easy = search_load_factor(plan, profiles, replace(QUICK, rates_rps={"toy": 300.0}))
    assert easy.per_model_load_factor == {"toy": 1.0} and len(easy.runs) == 1
    hard = search_load_factor(plan, profiles, replace(QUICK, rates_rps={"toy": 6000.0}))
    f = hard.per_model_load_factor["toy"]
    assert 0.05 <= f < 1.0
    assert [r.load_factor for r in hard.runs] == sorted((r.load_factor for r in hard.runs),
                                                        reverse=True)
    assert hard.final.model("toy").attainment >= 0.99
    assert all(r.model("toy").attainment < 0.99 for r in hard.runs[:-1])


def test_cli_simulate_writes_metrics(tmp_path, shared_profiles, profiles_dir, capsys):
    from ppipe_trt.cli import main
    cluster = ClusterSpec((GpuPool("L4", 4, 4, 4, 10.0), GpuPool("T4", 4, 2, 4, 10.0)))
    plan = hand_plan(shared_profiles, cluster, [ModelSpec("googlenet-v3-pytorch", 23.4, [
        (2, [(0, 8, "L4", 2, 4), (9, 9, "T4", 2, 2)])])])
    path = save_plan(plan, tmp_path / "plan.json")
    out = tmp_path / "m.json"
    rc = main(["simulate", str(path), "--profiles", str(profiles_dir), "--load", "0.5",
               "--duration", "1s", "--warmup", "200ms", "--arrivals", "gamma:2",
               "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "googlenet-v3-pytorch" in text and "GPU utilisation" in text
    data = json.loads(out.read_text())
    assert data["load_factor"] == 0.5 and data["arrivals"] == "gamma:2"
    assert data["models"][0]["requests"] > 0 and "L4" in data["utilization"]
    rc = main(["simulate", str(path), "--profiles", str(profiles_dir), "--duration", "1s",
               "--warmup", "0.2s", "--search", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert 0 <= data["per_model_load_factor"]["googlenet-v3-pytorch"] <= 1.0
    assert main(["simulate", str(path), "--duration", "xs"]) == 1
