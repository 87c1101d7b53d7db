"""``ppipe serve --frontends 2``: two processes answer HTTP and gRPC on the same ports over
one runtime (api/remote.py), with the same answers, the same access control, and no process
left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.serving.test_serve_cli import _free_port

REPO = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token"
MODEL = "googlenet-v3-pytorch"


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def two_frontends(tmp_path_factory, shared_profiles, profiles_dir):
    from ppipe_trt.cluster import load_paper_setting
    from ppipe_trt.plan import save_plan
    from ppipe_trt.serving.local import emulated_plan

    plan = emulated_plan(shared_profiles, load_paper_setting(profiles_dir).cluster("L4-T4"),
                         [MODEL])
    path = tmp_path_factory.mktemp("frontends") / "plan.json"
    save_plan(plan, path)
    port, grpc_port = _free_port(), _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ppipe_trt.cli", "serve", "--plan", str(path), "--profiles",
         str(profiles_dir), "--emulate", "--port", str(port), "--grpc-port", str(grpc_port),
         "--frontends", "2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={**os.environ, "PYTHONPATH": str(REPO), "PPIPE_AUTH_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:  # both processes up: each answers some of the fresh connections
            assert proc.poll() is None, proc.stdout.read()
            kinds = set()
            for _ in range(12):
                try:
                    r = httpx.get(f"{url}/v2/status", timeout=2,
                                  headers={"Authorization": f"Bearer {TOKEN}"})
                    if r.status_code == 200 and r.json().get("ready"):
                        kinds.add(r.json().get("frontend", "runtime"))
                except httpx.TransportError:
                    pass
            if kinds == {"runtime", "remote"}:
                break
            assert time.monotonic() < deadline, f"front ends not both ready: {kinds}"
            time.sleep(0.3)
        yield proc, url, grpc_port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_both_processes_answer_inference_over_http_and_grpc(two_frontends):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    _, url, grpc_port = two_frontends
    auth = {"Authorization": f"Bearer {TOKEN}"}
    grpc_auth = {"authorization": f"Bearer {TOKEN}"}  # gRPC metadata keys are lower case
    for _ in range(20):  # fresh connections: the kernel spreads them over both processes
        client = httpclient.InferenceServerClient(url.removeprefix("http://"))
        x = httpclient.InferInput("INPUT__0", [1, 1], "FP32")
        x.set_data_from_numpy(np.zeros((1, 1), np.float32))
        result = client.infer(MODEL, [x], headers=dict(auth))  # it adds to the dict
        assert result.as_numpy("OUTPUT__0").shape[0] == 1
        client.close()
    for _ in range(6):
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        x = grpcclient.InferInput("INPUT__0", [1, 1], "FP32")
        x.set_data_from_numpy(np.zeros((1, 1), np.float32))
        result = client.infer(MODEL, [x], headers=grpc_auth)
        assert result.get_response().model_name == MODEL
        stats = client.get_inference_statistics(MODEL, headers=grpc_auth)
        assert stats.model_stats[0].name == MODEL
        client.close()
    # errors keep their status and message through the link
    r = httpx.post(f"{url}/v2/models/{MODEL}/infer", headers=auth, timeout=5,
                   json={"inputs": [{"name": "INPUT__0", "shape": [1, 1], "datatype": "FP32",
                                     "data": [0.0]}], "parameters": {"timeout_ms": 0.001}})
    assert r.status_code == 503 and r.json()["reason"] == "deadline_unreachable", r.text
    metrics = [httpx.get(f"{url}/metrics", headers=auth, timeout=5).text for _ in range(6)]
    for text in metrics:  # every process shows the runtime's own counters
        assert f'ppipe_requests_total{{model="{MODEL}"}}' in text


def test_every_process_requires_the_token(two_frontends):
    _, url, _ = two_frontends
    codes = {httpx.post(f"{url}/v2/models/{MODEL}/infer", json={}, timeout=5).status_code
             for _ in range(12)}
    assert codes == {401}
    assert {httpx.get(f"{url}/v2/health/ready", timeout=5).status_code
            for _ in range(6)} == {200}


def test_the_front_end_processes_end_with_the_server(two_frontends):
    proc, _, _ = two_frontends
    children = _children(proc.pid)
    assert children, "no front-end process"
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    deadline = time.monotonic() + 15
    while any(_alive(c) for c in children):
        assert time.monotonic() < deadline, f"front-end processes left: {children}"
        time.sleep(0.2)


def test_real_engines_answer_the_same_through_either_process(cpu_builds):
    """The built-in demo model on ONNX Runtime (the runtime keeps its own thread): tensors
    cross the link both ways, and both processes give the same answer for the same input."""
    import tritonclient.http as httpclient

    cpu_builds["demo_resnet"]  # engines built: the command reuses them
    port, grpc_port = _free_port(), _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ppipe_trt.cli", "serve", "--engines", str(cpu_builds.root),
         "--model", "demo_resnet", "--port", str(port), "--grpc-port", str(grpc_port),
         "--frontends", "2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, kinds = time.monotonic() + 120, set()
        while kinds != {"runtime", "remote"}:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, f"front ends not both ready: {kinds}"
            try:
                r = httpx.get(f"{url}/v2/status", timeout=2)
                if r.status_code == 200 and r.json().get("ready"):
                    kinds.add(r.json().get("frontend", "runtime"))
            except httpx.TransportError:
                time.sleep(0.3)
        x0 = np.random.default_rng(3).standard_normal((1, 3, 224, 224)).astype(np.float32)
        outputs = []
        for _ in range(8):  # fresh connections: both processes answer some
            client = httpclient.InferenceServerClient(url.removeprefix("http://"))
            x = httpclient.InferInput("image", [1, 3, 224, 224], "FP32")
            x.set_data_from_numpy(x0, binary_data=True)
            result = client.infer("demo_resnet", [x])
            outputs.append(result.as_numpy(result.get_response()["outputs"][0]["name"]))
            client.close()
        assert all(o.shape == (1, 1000) and np.array_equal(o, outputs[0]) for o in outputs)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
