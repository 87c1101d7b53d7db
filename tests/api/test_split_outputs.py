"""Acceptance 1: outputs through the split pipeline equal the unsplit model's, over HTTP."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from ppipe_trt.models import BUILTIN_MODELS


def _reference(built, x: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(built.full_onnx), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {built.inputs[0].name: x})))


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


@pytest.mark.parametrize("model,batch_size", [(m, 1) for m in BUILTIN_MODELS]
                         + [("demo_resnet", 4)])
def test_split_pipeline_matches_unsplit_model(model, batch_size, engine_store, cpu_profiles,
                                              app_for):
    """Three stages (blocks 0..2, 3..6, 7..9) on three workers.  With a planned batch of 4 the
    three samples of one request run as one batch (the scheduler waits for them)."""
    from ppipe_trt.serving.local import pipeline_plan

    built = engine_store[1][model]
    profiles = cpu_profiles(model)
    plan = pipeline_plan(profiles, model, cuts=[2, 6], gpu_class="cpu",
                         batch_size=batch_size, slo_ms=1000.0 if batch_size > 1 else 20_000.0)
    assert len(plan.models[0].pipelines[0].stages) == 3
    spec = built.inputs[0]
    rng = np.random.default_rng(7)
    samples = 3 if model == "demo_resnet" else 2  # keeps the JSON of big outputs small
    x = rng.standard_normal((samples,) + tuple(spec.shape[1:])).astype(np.float32)
    ref = _reference(built, x)
    with TestClient(app_for(plan, profiles, {model: built})) as client:
        # JSON tensors, three samples in one request (batched by the scheduler)
        body = {"inputs": [{"name": spec.name, "shape": list(x.shape), "datatype": "FP32",
                            "data": x.ravel().tolist()}]}
        r = client.post(f"/v2/models/{model}/infer", json=body)
        assert r.status_code == 200, r.text
        if batch_size > 1:
            assert r.headers["X-PPipe-Batch-Size"] == "3"
        outs = {o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"])
                for o in r.json()["outputs"]}
        assert set(outs) == set(ref)
        for name, value in ref.items():
            assert outs[name].shape == value.shape
            assert _rel_err(outs[name], value) <= 1e-5, name
        # binary tensor extension, one sample, binary outputs
        header = json.dumps({"inputs": [{"name": spec.name, "shape": [1] + list(x.shape[1:]),
                                         "datatype": "FP32",
                                         "parameters": {"binary_data_size": x[:1].nbytes}}],
                             "parameters": {"binary_data_output": True}}).encode()
        r = client.post(f"/v2/models/{model}/infer", content=header + x[:1].tobytes(),
                        headers={"Inference-Header-Content-Length": str(len(header)),
                                 "Content-Type": "application/octet-stream"})
        assert r.status_code == 200, r.text
        n = int(r.headers["Inference-Header-Content-Length"])
        doc = json.loads(r.content[:n])
        offset = n
        for o in doc["outputs"]:
            size = o["parameters"]["binary_data_size"]
            got = np.frombuffer(r.content[offset:offset + size], np.float32).reshape(o["shape"])
            offset += size
            assert _rel_err(got, ref[o["name"]][:1]) <= 1e-5, o["name"]
        assert offset == len(r.content)
