"""The simulator's link models (duplex, sender, channel): the physical links follow the
schedulers' link model.

Two H servers (one GPU each) send to one L server.  Models ``a`` and ``b`` run block 0 on
their own H GPU (1000 us) and block 1 on an L GPU (2000 us); a hand-off takes 100 us.  On a
regular trace both models receive a request at the same instants, so their two transfers
reach the L server's downlink together.
"""

from __future__ import annotations

import json
import pytest

from ppipe_trt.cluster import ClusterSpec, GpuPool
from ppipe_trt.errors import ConfigError
from ppipe_trt.plan import save_plan
from ppipe_trt.profiles.types import ProfileSet
from ppipe_trt.simulator import (ArrivalSpec, ModelSpec, SimConfig, hand_plan, simulate,
                                 synthetic_profile)

CLUSTER = ClusterSpec((GpuPool("H", 2, 1, 1, 10.0), GpuPool("L", 2, 2, 1, 10.0)), "H-L")


def _profiles() -> ProfileSet:
    lat = {("H", 1): [1000.0, 1000.0], ("L", 1): [2000.0, 2000.0]}
    return ProfileSet({m: synthetic_profile(m, lat) for m in ("a", "b")}, "a")


def _plan(profiles, slo_ms=20.0):
    return hand_plan(profiles, CLUSTER, [ModelSpec(m, slo_ms, [(1, [(0, 0, "H", 1, 1),
                                                                    (1, 1, "L", 1, 1)])])
                                         for m in ("a", "b")])


def _regular(tmp_path, **kw):
    trace = tmp_path / "trace.txt"
    trace.write_text("\n".join(f"{0.01 * i:.2f}" for i in range(50)) + "\n")
    return SimConfig(duration_s=1.0, warmup_s=0.105, arrivals=ArrivalSpec.parse(f"trace:{trace}"),
                     rates_rps={"a": 100.0, "b": 100.0}, **kw)


def test_duplex_delays_the_second_transfer_into_one_receiver(tmp_path):
    profiles = _profiles()
    res = simulate(_plan(profiles), profiles, _regular(tmp_path, link_model="duplex"))
    a, b = res.model("a"), res.model("b")
    assert a.completed == b.completed == 100
    # one transfer of each pair goes first (usually a's: its arrival is handled first; float
    # rounding of the trace times can swap a pair); the other waits 100 us for the downlink
    assert sorted([a.latency_p50_us, b.latency_p50_us]) == pytest.approx([3100.0, 3200.0])
    assert max(a.latency_max_us, b.latency_max_us) == pytest.approx(3200.0)


def test_sender_does_not_contend_the_receiver_downlink(tmp_path):
    profiles = _profiles()
    res = simulate(_plan(profiles), profiles, _regular(tmp_path, link_model="sender"))
    for m in res.models:
        assert m.completed == 100
        assert m.latency_max_us == pytest.approx(3100.0)
        assert m.latency_p50_us == pytest.approx(3100.0)


def test_default_is_duplex_and_unknown_model_is_an_error(tmp_path):
    profiles = _profiles()
    plan = _plan(profiles)
    assert SimConfig().link_model == "duplex"
    default = simulate(plan, profiles, _regular(tmp_path)).to_dict(workers=True)
    duplex = simulate(plan, profiles, _regular(tmp_path, link_model="duplex")).to_dict(workers=True)
    default.pop("wall_s")
    duplex.pop("wall_s")
    assert default == duplex
    with pytest.raises(ConfigError, match="'full'.*sender"):
        simulate(plan, profiles, _regular(tmp_path, link_model="full"))


@pytest.mark.parametrize("link_model", ["duplex", "sender", "channel"])
@pytest.mark.parametrize("load", [0.6, 1.0])
def test_reservations_hold_physically_under_either_link_model(link_model, load):
    profiles = _profiles()
    # 3150 us: only a transfer at its earliest (1000 us) meets it, so any link delay the
    # schedulers did not reserve (e.g. a contended downlink under "sender") makes a batch late
    plan = _plan(profiles, slo_ms=3.15)
    res = simulate(plan, profiles, SimConfig(duration_s=1.0, warmup_s=0.2, load_factor=load,
                                             link_model=link_model))
    for m in res.models:
        assert m.requests > 0 and m.late == 0
        assert m.completed > 0.4 * m.requests
        assert m.completed + m.dropped_total == m.requests


def test_cli_link_model_flag(tmp_path, shared_profiles, profiles_dir, capsys):
    from ppipe_trt.cli import main
    cluster = ClusterSpec((GpuPool("L4", 4, 4, 4, 10.0), GpuPool("T4", 4, 2, 4, 10.0)))
    plan = hand_plan(shared_profiles, cluster, [ModelSpec("googlenet-v3-pytorch", 23.4, [
        (2, [(0, 8, "L4", 2, 4), (9, 9, "T4", 2, 2)])])])
    path = save_plan(plan, tmp_path / "plan.json")
    runs = {}
    for lm in ("duplex", "sender", "channel"):
        out = tmp_path / f"{lm}.json"
        assert main(["simulate", str(path), "--profiles", str(profiles_dir), "--load", "0.8",
                     "--duration", "1s", "--warmup", "200ms", "--link-model", lm,
                     "--json", str(out)]) == 0
        runs[lm] = json.loads(out.read_text())["models"][0]
        assert runs[lm]["requests"] > 0 and runs[lm]["late"] == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):   # argparse rejects an unknown choice
        main(["simulate", str(path), "--link-model", "bogus"])
    assert "invalid choice" in capsys.readouterr().err


def test_channel_does_not_contend_the_receiver_downlink(tmp_path):
    profiles = _profiles()
    res = simulate(_plan(profiles), profiles, _regular(tmp_path, link_model="channel"))
    for m in res.models:
        assert m.completed == 100
        assert m.latency_max_us == pytest.approx(3100.0)


# One H server of 2 GPUs, one L server of 2 GPUs.  Model ``a`` has two pipelines (block 0 on
# one H GPU, block 1 on one L GPU): the two H workers share the H server's uplink but are two
# channels (one per pipeline).
C2 = ClusterSpec((GpuPool("H", 2, 2, 1, 10.0), GpuPool("L", 2, 2, 1, 10.0)), "H-L")


def _two_pipelines_one_server(profiles):
    return hand_plan(profiles, C2, [ModelSpec("a", 20.0, [(1, [(0, 0, "H", 1, 1),
                                                                (1, 1, "L", 1, 1)])] * 2)])


def _pairs(tmp_path):
    """Two requests of ``a`` at each instant, instants 10 ms apart (the trailing stamp makes
    the gaps alternate 0, 10 ms also across the trace's loop)."""
    trace = tmp_path / "pairs.txt"
    trace.write_text("".join(f"{0.01 * i:.2f}\n{0.01 * i:.2f}\n" for i in range(50))
                     + "0.50\n")
    return ArrivalSpec.parse(f"trace:{trace}")


@pytest.mark.parametrize("link_model", ["channel", "sender", "duplex"])
def test_channels_of_one_server_send_in_parallel_only_under_channel(tmp_path, link_model):
    profiles = _profiles()
    res = simulate(_two_pipelines_one_server(profiles), profiles,
                   SimConfig(duration_s=1.0, warmup_s=0.105, arrivals=_pairs(tmp_path),
                             rates_rps={"a": 200.0}, link_model=link_model))
    a = res.model("a")
    assert a.requests > 150 and a.completed == a.requests and a.late == 0
    if link_model == "channel":   # the pair's transfers run side by side
        assert a.latency_max_us == pytest.approx(3100.0)
        assert a.latency_p50_us == pytest.approx(3100.0)
    else:                         # one H uplink: the second transfer of a pair waits 100 us
        assert a.latency_max_us == pytest.approx(3200.0)
        assert a.latency_p90_us == pytest.approx(3200.0)
