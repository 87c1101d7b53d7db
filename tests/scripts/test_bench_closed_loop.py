"""scripts/bench_closed_loop.py end to end with a tiny window: it serves a model repository
from this checkout and from a commit, drives it with perf_analyzer and reports every figure
with its ratio to the commit's."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PERF_ANALYZER = os.environ.get("PERF_ANALYZER") or shutil.which("perf_analyzer")


@pytest.mark.skipif(PERF_ANALYZER is None, reason="perf_analyzer not installed (set "
                    "PERF_ANALYZER=/path/to/it, e.g. from scripts/fetch_perf_analyzer.sh)")
@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs this repository's git history")
def test_closed_loop_benchmark_runs(zoo_repository, zoo_builds, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(zoo_repository / "shufflenet", repo / "shufflenet")
    zoo_builds["shufflenet"]  # built once into the session's store
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_closed_loop
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    out, js = tmp_path / "cl.md", tmp_path / "cl.json"
    assert bench_closed_loop.main([
        "--model-repository", str(repo), "--model", "shufflenet", "--engines",
        str(zoo_builds.store), "--baseline", "HEAD", "--concurrency", "1", "2",
        "--interval-ms", "600", "--stability-percentage", "200", "--perf-analyzer", PERF_ANALYZER,
        "--out", str(out), "--json", str(js)]) == 0
    rows = json.loads(js.read_text())
    assert len(rows) == 4
    assert {r["tree"] for r in rows} == {"this checkout"} | {r["tree"] for r in rows
                                                             if r["tree"].startswith("baseline")}
    for r in rows:
        assert r["throughput"] > 0 and 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
    text = out.read_text()
    assert "| 1 | this checkout |" in text and "| 2 | baseline " in text
