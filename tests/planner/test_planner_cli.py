"""`ppipe plan` end to end: paper setting and a local store, table printed, JSON written."""

from __future__ import annotations

import json

from ppipe_trt.cli import main
from ppipe_trt.plan import load_plan
from ppipe_trt.profiles import write_profile
from ppipe_trt.profiles.types import BlockLatencyTable, ModelProfile

from planner import verify_plan


def test_plan_paper_group_prints_table_and_writes_json(tmp_path, capsys, profiles_dir,
                                                       shared_profiles):
    out = tmp_path / "plan.json"
    rc = main(["plan", "--profiles", str(profiles_dir), "--paper-cluster", "V100-P4",
               "--paper-group", "2", "--solver", "highs", "-o", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "normalized throughput" in text and "GPUs used: 25/25 V100" in text
    assert "repvgg-b3" in text and "solver: highs" in text
    plan = load_plan(out)
    assert plan.normalized_throughput >= 2863.1 - 0.05
    verify_plan(plan, shared_profiles)


def test_plan_local_store_with_cluster_and_workload_files(tmp_path, capsys):
    rows = ((1000.0, 1800.0), (2000.0, 3600.0), (500.0, 900.0))
    prof = ModelProfile("demo", 3, (1000, 1000), {("cpu", 1): BlockLatencyTable("demo", "cpu", 1,
                                                                             rows)})
    write_profile(tmp_path / "engines" / "cpu" / "demo" / "profile.json", prof)
    (tmp_path / "cluster.json").write_text(json.dumps({"pools": [
        {"gpu_class": "cpu", "count": 2, "max_mps": 1}]}))
    (tmp_path / "wl.json").write_text(json.dumps({"workloads": [
        {"model": "demo", "slo_ms": 40, "weight": 1}]}))
    rc = main(["plan", "--profiles", str(tmp_path / "engines"), "--cluster",
               str(tmp_path / "cluster.json"), "--workloads", str(tmp_path / "wl.json"),
               "--solver", "highs", "-o", str(tmp_path / "p.json")])
    assert rc == 0
    assert "demo" in capsys.readouterr().out
    plan = load_plan(tmp_path / "p.json")
    assert plan.gpus_used == {"cpu": 2}


def test_infeasible_slo_is_reported_by_the_cli(tmp_path, capsys, profiles_dir):
    (tmp_path / "wl.json").write_text(json.dumps({"workloads": [
        {"model": "repvgg-b3", "slo_ms": 0.1, "weight": 1}]}))
    rc = main(["plan", "--profiles", str(profiles_dir), "--paper-cluster", "L4-T4",
               "--workloads", str(tmp_path / "wl.json"), "--solver", "highs"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "repvgg-b3" in err and "smallest feasible SLO" in err
