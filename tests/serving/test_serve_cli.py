"""``ppipe serve``: the no-argument demo (a real process on a free port) and --emulate."""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(args: list[str], timeout_s: float = 90.0) -> tuple[subprocess.Popen, str]:
    """``ppipe serve *args`` (which must name ``--port``) as a real process, once ready: the
    process (stdout piped, text) and its base URL.  The caller stops it."""
    port = args[args.index("--port") + 1]
    proc = subprocess.Popen([sys.executable, "-m", "ppipe_trt.cli", "serve", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() >= deadline:
            proc.kill()
            raise AssertionError("server did not become ready")
        time.sleep(0.3)


def test_serve_without_arguments_serves_the_demo_model(cpu_builds):
    from PIL import Image

    cpu_builds["demo_resnet"]  # engines already built: the command reuses them
    port, grpc_port = _free_port(), _free_port()
    proc, url = start_serve(["--engines", str(cpu_builds.root), "--port", str(port),
                             "--grpc-port", str(grpc_port)])
    banner: list[str] = []  # start-up lines read while it runs
    try:
        buf = io.BytesIO()
        Image.new("RGB", (320, 240), (90, 90, 200)).save(buf, format="JPEG")
        r = httpx.post(f"{url}/v2/models/demo_resnet/frames", content=buf.getvalue(),
                       headers={"Content-Type": "image/jpeg"}, timeout=30)
        assert r.status_code == 200, r.text
        assert len(r.json()["top_k"]) == 5
        status = httpx.get(f"{url}/v2/status").json()
        assert status["plan"]["cluster"]["pools"][0]["gpu_class"] == "cpu"
        assert status["models"]["demo_resnet"]["timing_only"] is False
        from ppipe_trt.scheduler.native import native_status

        compiled = native_status()["scheduler"] == "compiled"   # what this install runs
        assert status["scheduler"]["policy"] == "reservation"
        assert status["scheduler"]["implementation"] == ("compiled" if compiled else "python")
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert client.is_server_ready()
        x = grpcclient.InferInput("image", [1, 3, 224, 224], "FP32")
        x.set_data_from_numpy(np.zeros((1, 3, 224, 224), np.float32))
        assert client.infer("demo_resnet", [x]).as_numpy("logits").shape == (1, 1000)
        # the start-up banner's Python example works as printed (read from the live output)
        line = ""
        while "print(c.infer" not in line:
            line = proc.stdout.readline()
            assert line, "no Python example in the start-up lines"
            banner.append(line)
        command = line.strip()
        assert command.startswith('python -c "') and command.endswith('"')
        ran = subprocess.run([sys.executable, "-c", command[len('python -c "'):-1]],
                             capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0, ran.stderr
        assert "'model_name': 'demo_resnet'" in ran.stdout and "'logits'" in ran.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        out = "".join(banner) + out
    assert proc.returncode == 0, out
    assert f"serving on http://127.0.0.1:{port}" in out
    assert "/v2/models/demo_resnet/frames" in out  # the example request
    assert f"gRPC (KServe v2 / Triton) on 127.0.0.1:{grpc_port}" in out
    assert "demo_resnet: real engines (onnxruntime cpu" in out
    assert ("scheduler: reservation (compiled)" if compiled
            else "scheduler: reservation (Python reference: ") in out
    assert "timing-only workers" not in out    # real engines: none is timing-only


def test_emulate_plans_the_cluster_file_for_a_profiled_model(tmp_path, profiles_dir):
    from ppipe_trt.server.cli import describe
    from ppipe_trt.server.prepare import prepare

    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("name: testbed\npools:\n"
                       "  - {gpu_class: L4, count: 4, gpus_per_server: 4, max_mps: 4}\n"
                       "  - {gpu_class: T4, count: 12, gpus_per_server: 2, max_mps: 4}\n")
    args = argparse.Namespace(plan=None, models=["colorization-v2"], profiles=profiles_dir,
                              emulate=cluster, engines=tmp_path / "engines", slots=1,
                              slo_ms=None)
    plan, profiles, built, what = prepare(args)
    assert built == {} and "emulated cluster testbed" in what
    assert {s.gpu_class for p in plan.models[0].pipelines for s in p.stages} <= {"L4", "T4"}
    text = describe(plan, what, "http://127.0.0.1:8000")
    assert "colorization-v2" in text and "http://127.0.0.1:8000/v2/models/colorization-v2" in text
    # no model with frames preprocessing: no JPEG example (it would only get 400)
    assert "/frames" not in text and "triton_to_np_dtype" in text


def test_emulate_refuses_an_unknown_model(tmp_path, profiles_dir):
    from ppipe_trt.errors import BadInputError
    from ppipe_trt.server.prepare import prepare

    args = argparse.Namespace(plan=None, models=["no-such-net"], profiles=profiles_dir,
                              emulate=None, engines=tmp_path, slots=1, slo_ms=None)
    with pytest.raises(BadInputError, match="no-such-net"):
        prepare(args)


def test_deadline_margin_out_of_range_is_refused_before_any_work(capsys):
    from ppipe_trt.cli import main

    assert main(["serve", "--deadline-margin", "1.5"]) == 1
    err = capsys.readouterr().err
    assert "--deadline-margin 1.5; expected a fraction of the SLO in [0, 1)" in err
    assert "engines:" not in err
