"""scripts/bench_reliability.py end to end with tiny windows: the report's figures exist and
every request it sent got an answer.  Speed goals are the benchmark's, not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_reliability_tiny_windows(tmp_path, profiles_dir):
    out, js = tmp_path / "rel.md", tmp_path / "rel.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_reliability.py"), "--overload-s", "2",
         "--warmup-s", "1", "--recovery-s", "2", "--soak-s", "3", "--soak-warmup-s", "1",
         "--no-frames", "--profiles", str(profiles_dir), "--workdir", str(tmp_path / "work"),
         "--out", str(out), "--json", str(js)],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads(js.read_text())
    assert doc["info"]["emulated"] is True
    assert [o["factor"] for o in doc["overload"]] == [2.0, 5.0]
    for o in doc["overload"]:
        for key in ("accepted_p99_ms", "rejection_p99_ms", "rejections_by_reason",
                    "rss_growth", "recovery_s", "recovery_bins", "server_attainment"):
            assert key in o, key
        assert o["unanswered"] == 0
        assert o["accepted"] + o["rejected"] + sum(o["other_status"].values()) == o["sent"]
        assert o["rejected"] > 0  # 5 x and 2 x the planned rate cannot all be accepted
        assert "None" not in o["rejections_by_reason"]  # every rejection says why
    soak = doc["soak"]
    assert soak["unanswered"] == 0 and soak["sent"] == soak["answered"] > 0
    assert soak["status_5xx_not_503_504"] == 0
    for kind in ("binary", "json", "bad_json", "bad_shape", "unknown_model"):
        k = soak["per_kind"].get(kind)
        if k is None:  # a bad kind is 10 % of a 3 s stream: it may not come up
            assert kind.startswith(("bad", "unknown")), kind
            continue
        assert k["sent"] == k["answered"] and k["unexpected"] == 0, (kind, k)
    assert soak["servers"]["emulated"]["rss_kib"]["end"] > 0
    assert soak["servers"]["emulated"]["fds"]["end"] > 0
    for when in ("idle_before", "idle_after"):   # /v2/status process counts at idle
        counts = soak["servers"]["emulated"][when]
        assert counts["threads"] >= 1 and counts["asyncio_tasks"] >= 1, counts
    text = out.read_text()
    assert "EMULATED" in text and "## Overload and recovery" in text and "## Soak" in text
