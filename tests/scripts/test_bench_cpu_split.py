"""scripts/bench_cpu_split.py: perf's report parsed into CPU per request by library, rows
live vs floor; and end to end with tiny windows where this machine lets perf sample."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_cpu_split as split  # noqa: E402

DSO_REPORT = """\
# To display the perf.data header info, please use --header/--header-only options.
#
# Total Lost Samples: 0
#
# Samples: 8K  of event 'cpu-clock'
# Event count (approx.): 4453000000
#
# Overhead  Shared Object
# ........  ....................
#
    43.27%  libpython3.11.so.1.0
    29.71%  [kernel.kallsyms]
    14.24%  cygrpc.cpython-311-x86_64-linux-gnu.so
     4.49%  libc.so.6
     2.90%  loop.cpython-311-x86_64-linux-gnu.so
     2.52%  _message.abi3.so
     2.87%  /tmp/x/other.so
"""

SYM_REPORT = """\
# Event count (approx.): 4453000000
#
    13.95%  [.] _PyEval_EvalFrameDefault
    11.52%  [k] finish_task_switch.isra.0
     0.31%  [.] _PyEvalFramePushAndInit
"""


def test_parses_perf_reports():
    assert split.parse_event_count(DSO_REPORT) == 4453000000
    shares = split.parse_dso_report(DSO_REPORT)
    assert shares == pytest.approx({
        "python interpreter (libpython)": 0.4327, "kernel": 0.2971, "cygrpc": 0.1424,
        "libc": 0.0449, "uvloop": 0.029, "protobuf (upb)": 0.0252, "other": 0.0287})
    assert split.parse_symbol_share(SYM_REPORT, split.EVAL_SYMBOL) == pytest.approx(0.1395)
    with pytest.raises(SystemExit, match="Event count"):
        split.parse_event_count("# nothing sampled\n")


def test_rows_give_live_floor_and_difference_per_library():
    live = {"target": "live", "protocol": "grpc", "load_factor": 0.3, "answered": 100,
            "cpu_us_per_request": 700.0,
            "by_library_us": {"kernel": 210.0, "python interpreter (libpython)": 310.0},
            "bytecode_loop_us": 100.0}
    floor = {"target": "floor", "protocol": "grpc", "load_factor": 0.3, "answered": 100,
             "cpu_us_per_request": 460.0,
             "by_library_us": {"kernel": 212.0, "python interpreter (libpython)": 110.0,
                               "cygrpc": 90.0},
             "bytecode_loop_us": 20.0}
    rows = split.rows_of([live, floor])
    by = {r["library"]: r for r in rows}
    assert by["all"]["difference_us"] == pytest.approx(240.0)
    assert by["python interpreter (libpython)"]["difference_us"] == pytest.approx(200.0)
    assert by["kernel"]["difference_us"] == pytest.approx(-2.0)
    assert by["cygrpc"]["live_us_per_request"] == 0.0   # absent live: nothing sampled there
    loop = next(r for r in rows if r["library"].startswith("of which the bytecode loop"))
    assert loop["difference_us"] == pytest.approx(80.0)
    # the total first, then the libraries by how much more the live server spends in them
    assert [r["library"] for r in rows][:2] == ["all", "python interpreter (libpython)"]
    md = split.markdown([], rows, 1.0, min_us=2.0)
    assert "| grpc | 0.3 | **all** | 700.0 | 460.0 | +240.0 |" in md


def _perf_can_sample(tmp_path: Path) -> bool:
    perf = shutil.which("perf")
    if perf is None:
        return False
    proc = subprocess.run([perf, "record", "-e", "cpu-clock", "-o", str(tmp_path / "p.data"),
                           "--", sys.executable, "-c", "sum(range(10**6))"],
                          capture_output=True, timeout=60)
    return proc.returncode == 0


def test_bench_cpu_split_end_to_end(tmp_path, profiles_dir):
    if not _perf_can_sample(tmp_path):
        pytest.skip("Linux perf is not installed or may not sample here")
    out, js = tmp_path / "split.md", tmp_path / "split.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_cpu_split.py"), "--protocols", "http",
         "--load-factors", "0.3", "--window-s", "2", "--warmup-s", "1", "--drain-s", "1",
         "--profiles", str(profiles_dir), "--workdir", str(tmp_path / "w"), "--out", str(out),
         "--json", str(js)],
        cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    got = json.loads(js.read_text())
    targets = {p["target"]: p for p in got["points"]}
    assert set(targets) == {"live", "floor"}
    for p in targets.values():
        assert p["answered"] > 100                      # ~780 req/s x 0.3 over 2 s
        assert p["cpu_us_per_request"] > 0
        assert sum(p["by_library_us"].values()) == pytest.approx(p["cpu_us_per_request"],
                                                                 rel=0.05)
    assert "**all**" in out.read_text()


def test_repeats_give_medians_and_the_windows_range():
    def point(target, cpu, python, kernel, loop):
        return {"target": target, "protocol": "http", "load_factor": 0.7, "answered": 1000,
                "cpu_us_per_request": cpu,
                "by_library_us": {"python interpreter (libpython)": python, "kernel": kernel},
                "bytecode_loop_us": loop}

    points = [point("live", 300.0, 200.0, 40.0, 80.0), point("floor", 120.0, 60.0, 50.0, 20.0),
              point("live", 330.0, 230.0, 45.0, 90.0), point("floor", 100.0, 50.0, 35.0, 15.0),
              point("live", 310.0, 210.0, 50.0, 85.0), point("floor", 110.0, 55.0, 40.0, 18.0)]
    # a library seen in one window only counts 0 in the others
    points[0]["by_library_us"]["uvloop"] = 9.0
    rows = split.rows_of(points)
    by = {r["library"]: r for r in rows}
    assert by["all"]["live_us_per_request"] == 310.0 and by["all"]["floor_us_per_request"] == 110.0
    assert by["all"]["live_samples"] == [300.0, 330.0, 310.0]
    assert by["python interpreter (libpython)"]["difference_us"] == pytest.approx(210.0 - 55.0)
    assert by["kernel"]["difference_us"] == pytest.approx(45.0 - 40.0)
    assert by["uvloop"]["live_us_per_request"] == 0.0
    md = split.markdown([], rows, 1.0, min_us=2.0, repeats=3)
    assert "| http | 0.7 | **all** | 310.0 (300-330) | 110.0 (100-120) | +200.0 |" in md
    assert "every cell the median of 3 windows" in md
