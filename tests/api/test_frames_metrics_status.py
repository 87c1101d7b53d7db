"""Frames (JPEG/PNG, raw body or multipart), Prometheus metrics and the status endpoint."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient

MODEL = "demo_resnet"


@pytest.fixture(scope="module")
def client(engine_store, cpu_profiles, app_for):
    from ppipe_trt.serving.local import pipeline_plan

    profiles = cpu_profiles(MODEL)
    plan = pipeline_plan(profiles, MODEL, cuts=[6], gpu_class="cpu", slo_ms=2000.0)
    with TestClient(app_for(plan, profiles, {MODEL: engine_store[1][MODEL]})) as c:
        yield c


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _expected_logits(built, pixels: np.ndarray) -> np.ndarray:
    """The model's declared preprocessing done by hand (224x224 PNG: no resize)."""
    from ppipe_trt.models import model_info

    info = model_info(MODEL)
    x = pixels.astype(np.float32) / 255.0
    x = (x - np.asarray(info.mean, np.float32)) / np.asarray(info.std, np.float32)
    x = np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)
    with built.open_backend(0, built.num_blocks - 1) as full:
        return full.infer({info.input_name: x})["logits"]


def test_png_frame_is_preprocessed_as_declared_and_top_k_returned(client, engine_store):
    pixels = np.random.default_rng(5).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    ref = _expected_logits(engine_store[1][MODEL], pixels)
    r = client.post(f"/v2/models/{MODEL}/frames?top=3", content=_png(pixels),
                    headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    doc = r.json()
    got = np.asarray(doc["outputs"]["logits"]["data"], np.float32)
    assert np.max(np.abs(got - ref.ravel())) <= 1e-4 * np.max(np.abs(ref))
    assert [t["index"] for t in doc["top_k"]] == list(np.argsort(-ref[0])[:3])
    assert abs(sum(t["probability"] for t in doc["top_k"])) <= 1.0


def test_multipart_jpeg_frame_of_another_size(client):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (640, 480), (10, 200, 30)).save(buf, format="JPEG")
    r = client.post(f"/v2/models/{MODEL}/frames",
                    files={"file": ("cam0.jpg", buf.getvalue(), "image/jpeg")})
    assert r.status_code == 200, r.text
    assert r.json()["outputs"]["logits"]["shape"] == [1, 1000]
    assert len(r.json()["top_k"]) == 5


def test_metrics_expose_requests_drops_latency_batches_and_workers(client):
    x = np.zeros((1, 3, 224, 224), np.float32).ravel().tolist()
    body = {"inputs": [{"name": "image", "shape": [1, 3, 224, 224], "datatype": "FP32",
                        "data": x}]}
    assert client.post(f"/v2/models/{MODEL}/infer", json=body).status_code == 200
    body["parameters"] = {"timeout_ms": 0.001}
    r = client.post(f"/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == 503 and r.json()["reason"] == "deadline_unreachable"
    text = client.get("/metrics").text
    for needle in ('ppipe_requests_total{model="demo_resnet"}',
                   'ppipe_completions_total{model="demo_resnet"}',
                   'ppipe_drops_total{model="demo_resnet",reason="deadline_unreachable"} 1.0',
                   'ppipe_request_latency_seconds_bucket{emulated="false",le="0.05",'
                   'model="demo_resnet"}',
                   'ppipe_batch_size_bucket{le="1.0",model="demo_resnet"}',
                   'ppipe_worker_busy_fraction{', 'ppipe_worker_queue_length{',
                   'ppipe_worker_start_lag_seconds_total{', 'ppipe_worker_batches_total{',
                   'ppipe_http_requests_total{route="/v2/models/{model_name}/infer",status="503"}'):
        assert needle in text, needle


def test_status_shows_the_plan_in_force(client):
    doc = client.get("/v2/status").json()
    assert doc["ready"] is True and doc["emulated"] is False
    stages = doc["plan"]["models"][0]["pipelines"][0]["stages"]
    assert [(s["first_block"], s["last_block"]) for s in stages] == [(0, 6), (7, 9)]
    assert [w["blocks"] for w in doc["workers"]] == [[0, 6], [7, 9]]
    assert doc["models"][MODEL]["slo_ms"] == 2000.0


def test_http_counters_are_prometheus_counters_and_histograms():
    """The front end's plain-Python HTTP counters scrape as prometheus_client's Counter and
    Histogram would: ``_total`` per route and status, cumulative ``le`` buckets, count, sum."""
    from prometheus_client.parser import text_string_to_metric_families

    from api.metrics import HTTP_BUCKETS_S, AppMetrics

    metrics = AppMetrics(lambda: None)
    for status, seconds in ((200, 0.0005), (200, 0.001), (200, 0.03), (503, 9.0)):
        metrics.count_http("/v2/models/{model_name}/infer", status, seconds)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    counts = {s.labels["status"]: s.value for s in families["ppipe_http_requests"].samples}
    assert counts == {"200": 3.0, "503": 1.0}
    samples = families["ppipe_http_request_duration_seconds"].samples
    buckets = {s.labels["le"]: s.value for s in samples if s.name.endswith("_bucket")}
    assert list(buckets) == [repr(b) for b in HTTP_BUCKETS_S] + ["+Inf"]
    assert (buckets["0.001"], buckets["0.0025"], buckets["0.05"], buckets["5.0"],
            buckets["+Inf"]) == (2.0, 2.0, 3.0, 3.0, 4.0)
    total = {s.name: s.value for s in samples if not s.name.endswith("_bucket")}
    assert total["ppipe_http_request_duration_seconds_count"] == 4.0
    assert abs(total["ppipe_http_request_duration_seconds_sum"] - 9.0315) < 1e-9
