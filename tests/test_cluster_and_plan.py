import json

import pytest

from ppipe_trt.cluster import (ClusterSpec, GpuPool, Workload, load_cluster, load_paper_setting,
                               load_workloads)
from ppipe_trt.errors import ConfigError
from ppipe_trt.plan import (ModelPlan, PipelinePlan, Plan, StagePlan, load_plan, plan_to_dict,
                            save_plan)


def test_paper_setting(profiles_dir, shared_profiles):
    s = load_paper_setting(profiles_dir)
    assert [c.label for c in s.clusters] == ["L4-T4", "L4-P4", "V100-T4", "V100-P4"]
    lt = s.cluster("L4-T4")
    assert (lt.pool("L4").count, lt.pool("T4").count, lt.pool("T4").gpus_per_server) == (25, 75, 2)
    assert s.cluster("V100-P4").pool("P4").max_mps == 1
    assert s.cluster("L4-P4").pool("P4").link_bandwidth_gbps == 6
    w = s.workloads(2, shared_profiles)
    assert [x.model for x in w] == ["colorization-v2", "googlenet-v3-pytorch", "repvgg-b3"]
    assert w[0].slo_ms == pytest.approx(5 * 14350.5 / 1000)
    assert [x.weight for x in w] == [0.30, 0.33, 0.37]


def test_cluster_and_workload_files(tmp_path, shared_profiles):
    (tmp_path / "c.yaml").write_text(
        "name: small\npools:\n  - {gpu_class: L4, count: 4, gpus_per_server: 4, max_mps: 2}\n"
        "  - {gpu_class: T4, count: 12, gpus_per_server: 2, link_bandwidth_gbps: 10}\n")
    c = load_cluster(tmp_path / "c.yaml")
    assert c.label == "small" and c.pool("T4").num_servers == 6 and c.pool("L4").mps_shares == (1, 2)
    assert ClusterSpec.from_dict(c.to_dict()) == c
    (tmp_path / "w.json").write_text(json.dumps({"workloads": [
        {"model": "repvgg-b3", "slo_x_l4": 5, "weight": 0.5}, {"model": "x", "slo_ms": 20}]}))
    w = load_workloads(tmp_path / "w.json", shared_profiles)
    assert w[0].slo_ms == pytest.approx(47.54) and w[1] == Workload("x", 20.0, 1.0)


@pytest.mark.parametrize("text, message", [
    ("pools: []", "no GPU pools"),
    ("pools:\n  - {gpu_class: T4}", "misses 'count'"),
    ("pools:\n  - {gpu_class: T4, count: -1}", "count must be an integer >= 0"),
    ("pools:\n  - {gpu_class: T4, count: 2, speed: 3}", "unknown keys ['speed']"),
    ("pools:\n  - {gpu_class: T4, count: 2}\n  - {gpu_class: T4, count: 2}", "GPU class twice"),
    ("pools: [", "cannot parse"),
])
def test_bad_cluster_files(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_cluster(tmp_path / "c.yaml")


def _plan():
    cluster = ClusterSpec((GpuPool("L4", 2, 2, 4, 10.0), GpuPool("T4", 4, 2, 4, 10.0)), "L4-T4")
    pipe = PipelinePlan(4, (StagePlan(0, 3, "L4", 2, 3, 1000.0, 50.0),
                            StagePlan(4, 9, "T4", 1, 4, 1500.0, 0.0)), 2600.0, 3000.0, 200.0)
    return Plan("ppipe", cluster, (ModelPlan("m", 50.0, 0.3, (pipe,), 2600.0, {"L4": 2, "T4": 4}),),
                2600.0 / 0.3, {"L4": 2, "T4": 4}, "highs", 0.0, 0.05, {"slo_margin": 0.4})


def test_plan_round_trip(tmp_path):
    plan = _plan()
    path = save_plan(plan, tmp_path / "plan.json")
    again = load_plan(path)
    assert plan_to_dict(again) == plan_to_dict(plan)
    assert again.model("m").pipelines[0].stages[1].first_block == 4


def test_plan_errors(tmp_path):
    data = plan_to_dict(_plan())
    data["version"] = 7
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="plan format version 7"):
        load_plan(tmp_path / "p.json")
    data = plan_to_dict(_plan())
    data["models"][0]["pipelines"][0]["stages"][1]["first_block"] = 6
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="not contiguous"):
        load_plan(tmp_path / "p.json")
    with pytest.raises(ConfigError, match="no model 'zz'"):
        _plan().model("zz")
