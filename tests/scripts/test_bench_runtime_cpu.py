"""scripts/bench_runtime_cpu.py end to end with tiny windows: it plans, serves the plan
emulated on an event loop, and reports a row per load factor and tree with every request
answered.  Speed goals are the benchmark's, not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_runtime_cpu_tiny_windows(tmp_path, profiles_dir):
    out, js = tmp_path / "rt.md", tmp_path / "rt.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_runtime_cpu.py"), "--load-factors",
         "0.3", "--repeats", "1", "--window-s", "1", "--warmup-s", "0.5", "--drain-s", "1",
         "--profiles", str(profiles_dir), "--out", str(out), "--json", str(js),
         "--native", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(js.read_text())
    assert len(rows) == 2
    row, ref = rows
    from ppipe_trt.scheduler.native import native_status

    # each row says what ran in it: this install's compiled parts, and the Python references
    assert row["scheduler"] == (native_status()["scheduler"] + " / "
                                + native_status("timed")["scheduler"])
    assert ref["tree"] == f"{ROOT} (PPIPE_NATIVE=0)" and ref["scheduler"] == "python / python"
    assert ref["answered"][0] > 100 and ref["dropped_fraction"] < 0.05
    assert row["load_factor"] == 0.3 and row["tree"] == str(ROOT)
    assert row["answered"][0] > 100            # ~780 req/s planned x 0.3 over 1 s
    assert row["null_cpu_us_per_request"] > 0
    # the runtime does more than answering a bare future
    assert row["cpu_us_per_request"] > row["null_cpu_us_per_request"]
    assert row["ratio_to_first_tree"] == 1.0
    assert row["dropped_fraction"] < 0.05
    assert "EMULATED" in out.read_text() and "runtime net" in out.read_text()


def test_bench_runtime_cpu_refuses_bad_arguments(profiles_dir):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_runtime_cpu.py"), "--load-factors", "0",
         "--profiles", str(profiles_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "--load-factors" in proc.stderr
