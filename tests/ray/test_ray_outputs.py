"""Acceptance 1 with ``--cluster ray``: outputs of the split pipeline over HTTP, stage workers
as Ray actors, equal the unsplit model's (rel. error <= 1e-5) for every built-in model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from ppipe_trt.models import BUILTIN_MODELS

pytestmark = pytest.mark.ray


def _reference(built, x: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(built.full_onnx), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {built.inputs[0].name: x})))


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


@pytest.mark.parametrize("model", BUILTIN_MODELS)
def test_split_pipeline_on_ray_matches_unsplit_model(model, ray_local, cpu_engines):
    from api.app import create_app
    from ppipe_trt.profiles import load_profiles
    from ppipe_trt.serving.local import pipeline_plan
    from ppipe_trt.serving.ray_backend import build_ray_runtime

    root, builds = cpu_engines
    built = builds[model]
    profiles = load_profiles(root, [model])
    plan = pipeline_plan(profiles, model, cuts=[2, 6], gpu_class="cpu", batch_size=1,
                         slo_ms=20_000.0)
    spec = built.inputs[0]
    x = np.random.default_rng(7).standard_normal((2,) + tuple(spec.shape[1:])).astype(np.float32)
    ref = _reference(built, x)
    app = create_app(lambda: build_ray_runtime(plan, profiles, {model: built}))
    with TestClient(app) as client:
        rt = app.state.runtime
        assert [w.info.stage for w in rt.workers] == [0, 1, 2]
        assert all("ray actor" in w.mode for w in rt.workers)
        assert len({w.pid for w in rt.workers}) == 3  # three actor processes
        body = {"inputs": [{"name": spec.name, "shape": list(x.shape), "datatype": "FP32",
                            "data": x.ravel().tolist()}]}
        r = client.post(f"/v2/models/{model}/infer", json=body)
        assert r.status_code == 200, r.text
        outs = {o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"])
                for o in r.json()["outputs"]}
        assert set(outs) == set(ref)
        for name, value in ref.items():
            assert outs[name].shape == value.shape
            assert _rel_err(outs[name], value) <= 1e-5, name
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
        status = client.get("/v2/status").json()
        assert status["transport"] == "ray actors"
        assert status["ray_hop_us"] > 0 and status["hop_overhead_us"] == status["ray_hop_us"]
        assert all(w["alive"] for w in status["workers"])
