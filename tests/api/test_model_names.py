"""A model name never becomes a path outside the store or the repository, and REST answers
undeclared methods 405 with ``Allow`` (the fast path's routes included)."""

from __future__ import annotations

import argparse

import pytest
from fastapi.testclient import TestClient

from tests.api.test_bad_inputs import MODEL

ESCAPES = ["..", ".", "", "../etc", "a/b", "/etc/passwd", "..\\x", "a\0b", "C:\\x"]


@pytest.mark.parametrize("name", ESCAPES)
def test_store_refuses_names_that_escape(tmp_path, name):
    from ppipe_trt.engines.store import model_dir
    from ppipe_trt.errors import BadInputError

    with pytest.raises(BadInputError, match="cannot name a directory"):
        model_dir(tmp_path, "cpu", name)
    with pytest.raises(BadInputError, match="GPU class"):
        model_dir(tmp_path, name, "demo_resnet")


def test_store_keeps_plain_names(tmp_path):
    from ppipe_trt.engines.store import model_dir

    assert model_dir(tmp_path, "cpu", "my-model.v2") == tmp_path / "cpu" / "my-model.v2"


@pytest.mark.parametrize("name", ["../demo_resnet", "/etc/passwd", ".."])
def test_serve_refuses_path_like_model_names(tmp_path, name):
    from ppipe_trt.errors import BadInputError
    from ppipe_trt.server.prepare import prepare

    args = argparse.Namespace(models=[name], model_repository=None, plan=None, emulate=None,
                              profiles=None, engines=tmp_path, slots=None, slo_ms=None)
    with pytest.raises(BadInputError, match="cannot name a directory"):
        prepare(args)


@pytest.fixture(scope="module")
def clients(engine_store, cpu_profiles, app_for):
    from ppipe_trt.serving.local import pipeline_plan

    profiles = cpu_profiles(MODEL)
    plan = pipeline_plan(profiles, MODEL, cuts=[4], gpu_class="cpu", slo_ms=2000.0)
    built = {MODEL: engine_store[1][MODEL]}
    with TestClient(app_for(plan, profiles, built)) as f, \
            TestClient(app_for(plan, profiles, built, fast_infer=False)) as s:
        yield f, s


@pytest.mark.parametrize("path", ["/v2/models/..%2F..%2Fetc/infer", "/v2/models/%2E%2E/infer",
                                  "/v2/models/..%2Fdemo_resnet", "/v2/models/%2Fetc/config",
                                  "/v2/models/..%5Cx/ready"])
def test_rest_path_like_model_names_are_not_found(clients, path):
    for c in clients:
        method = "POST" if path.endswith("/infer") else "GET"
        r = c.request(method, path, content=b"{}")
        assert r.status_code == 404, (path, r.text)


METHODS = [("GET", f"/v2/models/{MODEL}/infer", "POST"),
           ("PUT", f"/v2/models/{MODEL}/versions/1/infer", "POST"),
           ("DELETE", f"/v2/models/{MODEL}/infer", "POST"),
           ("POST", "/v2/health/live", "GET"), ("DELETE", f"/v2/models/{MODEL}", "GET"),
           ("GET", f"/v2/models/{MODEL}/frames", "POST"), ("PUT", "/metrics", "GET")]


@pytest.mark.parametrize("method,path,allowed", METHODS, ids=[f"{m} {p}" for m, p, _ in METHODS])
def test_undeclared_methods_are_405_with_allow(clients, method, path, allowed):
    for c in clients:
        r = c.request(method, path)
        assert r.status_code == 405, r.text
        assert allowed in [m.strip() for m in r.headers["allow"].split(",")]
        assert r.json() == {"error": "Method Not Allowed"}
