"""The comparison's medians and reports (ppipe_trt/bench/vs_triton.py aggregate, report.py)
from hand-built measurements, the banner parsing of ppipe_peer.py, and the script's
argument handling."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from ppipe_trt.bench.capacity import CapacityProbe, CapacityResult
from ppipe_trt.bench.openloop import PointSummary
from ppipe_trt.bench.ppipe_peer import PpipeServer
from ppipe_trt.bench.report import (RunInfo, console_table, markdown_table, write_json,
                                    write_markdown, write_png)
from ppipe_trt.bench.vs_triton import PPIPE, TRITON, ModelResult, PointRecord, aggregate

ROOT = Path(__file__).resolve().parents[2]


def _point(server: str, repeat: int, factor: float, goodput: float, p99: float | None,
           rejected: int = 0) -> PointRecord:
    sent = 100
    summary = PointSummary(
        offered_rps=100.0 * factor, duration_s=1.0, sent=sent, answered=sent - rejected,
        within_slo_count=int(goodput), goodput_rps=goodput, within_slo=goodput / sent,
        rejections={"UNAVAILABLE": rejected} if rejected else {}, p50_ms=5.0, p99_ms=p99,
        client_cpu_pct=10.0)
    return PointRecord("m", server, repeat, factor, summary, 0.5, 50.0,
                       0.5e6 / max(1, sent - rejected), 0.0, 0.2, 1.0)


def _result() -> ModelResult:
    result = ModelResult("m", 50.0, "slo_ms of config.pbtxt", 2, 100.0, CapacityResult(
        100.0, 110.0, 0.99, (CapacityProbe(50, 1.0, True), CapacityProbe(100, 0.995, True),
                             CapacityProbe(110, 0.9, False))),
        triton_version="2.51.0", ppipe_capacity_line="plan ppipe, normalized throughput 800 req/s")
    result.startup_s = {TRITON: 2.0, PPIPE: 3.0}
    result.idle_cpu_pct = {TRITON: 0.0, PPIPE: 1.0}
    result.serial_ms = {TRITON: 5.0, PPIPE: 6.0}
    for repeat, (t, p) in enumerate([(90, 80), (96, 70), (93, 75)]):
        result.points.append(_point(TRITON, repeat, 1.0, t, 40.0 + repeat))
        result.points.append(_point(PPIPE, repeat, 1.0, p, None if repeat == 0 else 30.0,
                                    rejected=10 * repeat))
    result.points.append(_point(TRITON, 0, 0.5, 50, 20.0))
    result.points.append(_point(PPIPE, 0, 0.5, 50, 21.0))
    return result


def test_aggregate_takes_medians_over_repeats():
    records = aggregate(_result())
    assert [(r["load_factor"], r["server"]) for r in records] == [
        (0.5, PPIPE), (0.5, TRITON), (1.0, PPIPE), (1.0, TRITON)]
    triton, ppipe = records[3], records[2]
    assert triton["goodput_rps"] == 93 and triton["p99_ms"] == 41.0
    assert ppipe["goodput_rps"] == 75
    assert ppipe["p99_ms"] == 30.0  # the repeat without answers has no p99 and is left out
    assert ppipe["rejected"] == 10 and ppipe["rejections"] == {"UNAVAILABLE": 10}
    assert triton["repeats"] == 3 and len(triton["samples"]) == 3
    for key in ("model", "server", "offered_rps", "goodput_rps", "within_slo", "p99_ms",
                "cpu_us_per_request"):
        assert key in triton
    assert triton["offered_rps"] == 100.0 and triton["within_slo"] == pytest.approx(0.93)


def test_tables_json_png_and_markdown(tmp_path):
    result = _result()
    records = aggregate(result)
    table = markdown_table(records)
    lines = table.splitlines()
    assert lines[0].startswith("| offered req/s | x cap | server | goodput req/s | vs Triton")
    assert len(lines) == 2 + 4
    # Triton's row comes first at each load; ppipe's carries its ratio to Triton's goodput
    assert "| Triton | 93.0 | - |" in lines[4] and "| ppipe | 75.0 | 0.81 |" in lines[5]
    assert "10 (UNAVAILABLE 10)" in lines[5]
    assert "ppipe" in console_table(records)
    write_json(tmp_path / "r.json", records)
    assert json.loads((tmp_path / "r.json").read_text())[0]["model"] == "m"
    write_png(tmp_path / "r.png", [result], records)
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    info = RunInfo("python scripts/bench_vs_triton.py --seconds 3", "2026-12-08 01:00 UTC",
                   "a host", "abc1234", note="Smoke run")
    write_markdown(tmp_path / "docs" / "r.md", info, [result], records, tmp_path / "r.png")
    text = (tmp_path / "docs" / "r.md").read_text()
    assert "**Smoke run**" in text and "commit: abc1234" in text
    assert "Triton 99 % capacity: **100.0 req/s**; smallest failing 110.0" in text
    assert "ppipe printed capacity: `plan ppipe, normalized throughput 800 req/s`" in text
    assert "![goodput vs offered load](../r.png)" in text
    assert table in text


def test_ppipe_banner_parsing(tmp_path):
    server = PpipeServer(tmp_path, ["demo_resnet"], 2, tmp_path)
    server.log_path.write_text(
        "engines: building or reusing demo_resnet\n"
        "ppipe serve: local cpu x2; plan ppipe, normalized throughput 803.7 req/s\n"
        "  demo_resnet (SLO 50.0 ms) pipeline 0: batch 4: blocks 0..9 on 2x cpu\n")
    assert server.capacity_line() == ("ppipe serve: local cpu x2; plan ppipe, normalized "
                                      "throughput 803.7 req/s")
    assert server.slo_ms("demo_resnet") == 50.0 and server.slo_ms("other") is None
    command = server.command()
    assert command[command.index("--slots") + 1] == "2"
    assert command[command.index("--model") + 1] == "demo_resnet"


def test_script_takes_ppipe_args_that_look_like_options():
    spec = importlib.util.spec_from_file_location("bench_vs_triton",
                                                  ROOT / "scripts" / "bench_vs_triton.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = script._join_ppipe_args(["--ppipe-arg", "--policy", "--ppipe-arg", "triton",
                                    "--loads", "0.5,1", "--seconds", "3"])
    args = script.build_parser().parse_args(argv)
    assert args.ppipe_args == ["--policy", "triton"]
    assert args.loads == (0.5, 1.0) and args.seconds == 3.0 and args.workers == 2
    with pytest.raises(SystemExit):
        script.build_parser().parse_args(["--loads", "0,1"])
