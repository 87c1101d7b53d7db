"""Acceptance 2: Triton's own HTTP client (JSON and binary tensors) and, when installed,
``perf_analyzer`` work against the server unchanged (a real uvicorn on 127.0.0.1)."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

MODEL = "demo_resnet"


@pytest.fixture(scope="module")
def server(engine_store, cpu_profiles, app_for, http_server):
    from ppipe_trt.serving.local import pipeline_plan

    profiles = cpu_profiles(MODEL)
    plan = pipeline_plan(profiles, MODEL, cuts=[5], gpu_class="cpu", batch_size=1,
                         slo_ms=1000.0)
    with http_server(app_for(plan, profiles, {MODEL: engine_store[1][MODEL]})) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(engine_store):
    import onnxruntime as ort

    built = engine_store[1][MODEL]
    sess = ort.InferenceSession(str(built.full_onnx), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).standard_normal((2, 3, 224, 224)).astype(np.float32)
    return x, sess.run(["logits"], {"image": x})[0]


def test_tritonclient_metadata_calls(server):
    import tritonclient.http as httpclient

    c = httpclient.InferenceServerClient(server.url)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready(MODEL)
    assert c.get_server_metadata()["name"] == "ppipe-trt"
    md = c.get_model_metadata(MODEL)
    assert md["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 224, 224]}]
    cfg = c.get_model_config(MODEL)
    # the example repository's max_batch_size, not the batch the plan runs (1 here)
    assert cfg["max_batch_size"] == 8 and cfg["input"][0]["dims"] == [3, 224, 224]
    assert c.get_model_repository_index() == [{"name": MODEL, "version": "1",
                                               "state": "READY"}]
    assert c.get_inference_statistics(MODEL)["model_stats"][0]["name"] == MODEL


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_infer_matches_reference(server, reference, binary):
    import tritonclient.http as httpclient

    x, ref = reference
    c = httpclient.InferenceServerClient(server.url)
    inp = httpclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("logits", binary_data=binary)
    result = c.infer(MODEL, [inp], outputs=[out], request_id="r1")
    got = result.as_numpy("logits")
    assert got.shape == ref.shape
    assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) <= 1e-5
    assert result.get_response()["id"] == "r1"


def test_tritonclient_classification_extension(server, reference):
    import tritonclient.http as httpclient

    x, ref = reference
    c = httpclient.InferenceServerClient(server.url)
    inp = httpclient.InferInput("image", [1, 3, 224, 224], "FP32")
    inp.set_data_from_numpy(x[:1])
    out = httpclient.InferRequestedOutput("logits", class_count=3)
    top = c.infer(MODEL, [inp], outputs=[out]).as_numpy("logits")
    assert top.shape == (1, 3)
    assert [int(s.decode().split(":")[1]) for s in top[0]] == list(np.argsort(-ref[0])[:3])


def _perf_analyzer() -> str | None:
    return os.environ.get("PERF_ANALYZER") or shutil.which("perf_analyzer")


@pytest.mark.skipif(_perf_analyzer() is None,
                    reason="perf_analyzer not installed (set PERF_ANALYZER=/path/to/it)")
def test_perf_analyzer_runs_unchanged(server):
    proc = subprocess.run(
        [_perf_analyzer(), "-m", MODEL, "-u", server.url, "-i", "http",
         "--concurrency-range", "1", "--measurement-mode", "count_windows",
         "--measurement-request-count", "30", "--stability-percentage", "50"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Throughput:" in proc.stdout
