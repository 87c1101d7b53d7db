"""``POST /v2/plan`` (and ``ppipe replan``): swap the plan of a running server with real
ONNX Runtime engines while requests flow -- every request answered 200 with the same
outputs, the status shows the generations; bad pushes are refused with the right status and
the plan in force keeps serving."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.api.test_bad_inputs import MODEL

INFER = f"/v2/models/{MODEL}/infer"


def _plans(profiles):
    from ppipe_trt.cluster import ClusterSpec, GpuPool
    from ppipe_trt.serving.local import pipeline_plan

    cluster = ClusterSpec((GpuPool("cpu", 4, gpus_per_server=4, max_mps=1,
                                   link_bandwidth_gbps=100.0),), "manual-cpu")
    out = []
    for cuts, workers in (([4], 1), ([4], 2), ([2], 1)):
        p = pipeline_plan(profiles, MODEL, cuts=cuts, gpu_class="cpu",
                          workers_per_stage=workers, slo_ms=2000.0)
        out.append(dataclasses.replace(p, cluster=cluster))
    return out


@pytest.fixture(scope="module")
def served(engine_store, cpu_profiles, app_for):
    from ppipe_trt.plan import plan_to_dict

    profiles = cpu_profiles(MODEL)
    plans = _plans(profiles)
    app = app_for(plans[0], profiles, {MODEL: engine_store[1][MODEL]}, auth_token="s3cret")
    with TestClient(app, headers={"authorization": "Bearer s3cret"}) as client:
        yield client, [plan_to_dict(p) for p in plans]


def _infer(client, x):
    body = {"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}
    r = client.post(INFER, json=body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def test_swaps_under_traffic_keep_every_answer(served):
    client, plans = served
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    reference = _infer(client, x)
    answers, errors, stop = [], [], threading.Event()

    def traffic():
        while not stop.is_set():
            try:
                answers.append(_infer(client, x))
            except AssertionError as exc:  # noqa: PERF203
                errors.append(str(exc))
    t = threading.Thread(target=traffic)
    t.start()
    try:
        grow = client.post("/v2/plan", json={"plan": plans[1], "reason": "two per stage"})
        assert grow.status_code == 200, grow.text
        g = grow.json()
        assert g["generation"] == 1 and len(g["workers_kept"]) == 2
        assert len(g["workers_added"]) == 2 and g["workers_retired"] == []
        recut = client.post("/v2/plan", json=plans[2])   # a bare plan document works too
        assert recut.status_code == 200, recut.text
        r = recut.json()
        assert r["generation"] == 2 and r["workers_kept"] == [] and len(r["workers_retired"]) == 4
        # the swaps can be quicker than a few requests on a loaded machine: let the traffic
        # go on under the last plan until it has a few answers (not a race on the count)
        until = time.monotonic() + 60.0
        while len(answers) + len(errors) < 3 and time.monotonic() < until:
            time.sleep(0.05)
    finally:
        stop.set()
        t.join()
    assert not errors and len(answers) >= 3
    for a in answers:
        np.testing.assert_allclose(a, reference, rtol=1e-4, atol=1e-4)
    status = client.get("/v2/status").json()
    assert status["plan_generation"]["generation"] == 2
    assert status["plan"]["params"]["cuts"] == [2]
    assert [g["generation"] for g in status["plan_history"]] == [0, 1, 2]
    assert [w["blocks"][0] for w in status["workers"]] == [0, 3]
    metrics = client.get("/metrics").text
    assert "ppipe_plan_generation 2.0" in metrics
    assert "ppipe_plan_swaps_total 2.0" in metrics


@pytest.mark.parametrize("body, status, message", [
    (b"not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"weights": {MODEL: -1}}).encode(), 400, "must be a number > 0"),
    (json.dumps({"weights": {"nope": 1}}).encode(), 400, "not served"),
    (json.dumps({"plan": {"models": []}}).encode(), 400, "pushed plan"),
])
def test_bad_pushes_are_refused_and_serving_goes_on(served, body, status, message):
    client, _ = served
    before = client.get("/v2/status").json()["plan_generation"]["generation"]
    r = client.post("/v2/plan", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status and message in r.json()["error"], r.text
    assert client.get("/v2/status").json()["plan_generation"]["generation"] == before
    assert client.post(INFER, json={"inputs": [{
        "name": "image", "shape": [1, 3, 224, 224], "datatype": "FP32",
        "data": [0.0] * (3 * 224 * 224)}]}).status_code == 200


def test_a_push_needs_the_token_and_json(served):
    client, plans = served
    r = client.post("/v2/plan", json=plans[0], headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = client.post("/v2/plan", content=b"x", headers={"content-type": "text/plain"})
    assert r.status_code == 415


def test_a_plan_for_another_cluster_or_model_is_a_conflict(served, cpu_profiles):
    from ppipe_trt.plan import plan_to_dict
    from ppipe_trt.serving.local import pipeline_plan

    client, _ = served
    other = pipeline_plan(cpu_profiles(MODEL), MODEL, cuts=[4], gpu_class="cpu",
                          workers_per_stage=3, slo_ms=2000.0)   # a 6-GPU cluster
    r = client.post("/v2/plan", json=plan_to_dict(other))
    assert r.status_code == 400 and "keeps the cluster" in r.json()["error"]
    slower = dataclasses.replace(other, models=(dataclasses.replace(other.models[0],
                                                                    slo_ms=900.0),))
    r = client.post("/v2/plan", json=plan_to_dict(slower))
    assert r.status_code == 409 and "SLO" in r.json()["error"]
