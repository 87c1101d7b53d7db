"""The bursty arrival processes: seeded checks of their mean rate and burstiness."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ppipe_trt.errors import ConfigError
from ppipe_trt.simulator import ArrivalSpec, arrival_times_us
from ppipe_trt.simulator.arrivals import NAMED_ARRIVALS


@pytest.mark.parametrize("name,cv", [("gamma-cv2", 2.0), ("gamma-cv4", 4.0)])
def test_named_gamma_processes_have_the_rate_and_cv(name, cv):
    spec = ArrivalSpec.parse(name)
    assert spec.kind == "gamma" and spec.cv == cv
    t = np.array(arrival_times_us(spec, 1000.0, 0.0, 60e6, np.random.default_rng(7)))
    assert len(t) / 60.0 == pytest.approx(1000.0, rel=0.08)
    gaps = np.diff(t)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.12)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("on_ms,off_ms", [(10.0, 10.0), (5.0, 15.0)])
def test_mmpp_has_the_rate_and_the_theoretical_cv(seed, on_ms, off_ms):
    rate = 800.0
    spec = ArrivalSpec.parse(f"mmpp:{on_ms}:{off_ms}")
    t = np.array(arrival_times_us(spec, rate, 0.0, 60e6, np.random.default_rng(seed)))
    assert np.all(np.diff(t) >= 0) and t[0] >= 0 and t[-1] < 60e6
    assert len(t) / 60.0 == pytest.approx(rate, rel=0.05)
    # interrupted Poisson process: c^2 = 1 + 2 lam_on a / (a + b)^2, a = 1/on, b = 1/off
    lam_on = rate / 1e3 * (on_ms + off_ms) / on_ms    # per ms
    a, b = 1.0 / on_ms, 1.0 / off_ms
    cv = math.sqrt(1.0 + 2.0 * lam_on * a / (a + b) ** 2)
    gaps = np.diff(t)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)
    assert cv > 1.5


def test_mmpp_is_seeded_and_named():
    spec = ArrivalSpec.parse("mmpp")
    assert str(spec) == NAMED_ARRIVALS["mmpp"]
    one = arrival_times_us(spec, 500.0, 0.0, 1e6, np.random.default_rng(3))
    two = arrival_times_us(spec, 500.0, 0.0, 1e6, np.random.default_rng(3))
    assert one == two and len(one) > 100


@pytest.mark.parametrize("text", ["mmpp:1", "mmpp:a:b", "mmpp:0:10", "gamma-cv3"])
def test_bad_bursty_specs_are_refused(text):
    with pytest.raises(ConfigError, match="arrivals"):
        ArrivalSpec.parse(text)


def test_cli_simulates_mmpp_work_conserving(tmp_path, shared_profiles, profiles_dir, capsys):
    import json

    from ppipe_trt.cli import main
    from ppipe_trt.cluster import ClusterSpec, GpuPool
    from ppipe_trt.plan import save_plan
    from ppipe_trt.simulator import ModelSpec, hand_plan

    cluster = ClusterSpec((GpuPool("L4", 4, 4, 4, 10.0), GpuPool("T4", 4, 2, 4, 10.0)))
    plan = hand_plan(shared_profiles, cluster, [ModelSpec("googlenet-v3-pytorch", 60.0, [
        (4, [(0, 8, "L4", 2, 4), (9, 9, "T4", 2, 2)])])])
    path = save_plan(plan, tmp_path / "plan.json")
    lat = {}
    for extra in ([], ["--work-conserving"]):
        out = tmp_path / "m.json"
        assert main(["simulate", str(path), "--profiles", str(profiles_dir), "--load", "0.1",
                     "--duration", "2s", "--warmup", "200ms", "--arrivals", "mmpp",
                     "--json", str(out), *extra]) == 0
        data = json.loads(out.read_text())
        assert data["arrivals"] == "mmpp:10:10"
        m = data["models"][0]
        assert m["requests"] > 0 and m["attainment"] == 1.0
        lat[bool(extra)] = m["latency_p50_us"]
    capsys.readouterr()
    # at 10 % load PPipe holds a lone request for a batch of 4; work-conserving does not
    assert lat[True] < 0.6 * lat[False]
