"""``ppipe serve`` answers a lone frame at idle without PPipe's wait (work-conserving by
default); ``--no-work-conserving`` keeps the wait.  Real processes on free ports."""

from __future__ import annotations

import io
import signal
import time

import httpx
import pytest

from tests.serving.test_serve_cli import _free_port, start_serve

SLO_MS = 50.0   # demo_resnet's


def _server_latency_ms(root, extra) -> float:
    """Mean accepted -> answered time (ms) of 5 frames sent one at a time, 50 ms apart."""
    from PIL import Image

    proc, url = start_serve(["--engines", str(root), "--port", str(_free_port()),
                             "--grpc-port", "0", *extra])
    try:
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
