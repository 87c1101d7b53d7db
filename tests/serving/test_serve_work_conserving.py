"""``ppipe serve`` answers a lone frame at idle without PPipe's wait (work-conserving by
default); ``--no-work-conserving`` keeps the wait.  Real processes on free ports."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
SLO_MS = 50.0   # demo_resnet's


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_latency_ms(root, extra) -> float:
    """Mean accepted -> answered time (ms) of 5 frames sent one at a time, 50 ms apart."""
    from PIL import Image

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ppipe_trt.cli", "serve", "--engines", str(root), "--port",
         str(port), "--grpc-port", "0", *extra], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.3)
        buf = io.BytesIO()
        Image.new("RGB", (224, 224), (90, 90, 200)).save(buf, format="JPEG")
        for _ in range(5):
            r = httpx.post(f"{url}/v2/models/demo_resnet/frames", content=buf.getvalue(),
                           headers={"Content-Type": "image/jpeg"}, timeout=30)
            assert r.status_code == 200, r.text
            time.sleep(0.05)
        stats = httpx.get(f"{url}/v2/models/demo_resnet/stats").json()
        ok = stats["model_stats"][0]["inference_stats"]["success"]
        assert ok["count"] == 5
        return ok["ns"] / ok["count"] / 1e6
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)


@pytest.mark.parametrize("extra,waits", [([], False), (["--no-work-conserving"], True)])
def test_a_lone_frame_waits_only_under_ppipe_policy(cpu_builds, extra, waits):
    cpu_builds["demo_resnet"]
    ms = _server_latency_ms(cpu_builds.root, extra)
    # PPipe holds a lone request until its batch would only just meet the deadline (the
    # SLO less the server's margin and the batch's time); work-conserving sends it at once
    if waits:
        assert ms > 0.4 * SLO_MS
    else:
        assert ms < 0.4 * SLO_MS
