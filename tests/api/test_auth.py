"""Access control (api/auth.py): with a token, every route but the health probes needs
``Authorization: Bearer <token>``, over REST (FastAPI routes and the infer fast path alike)
and gRPC; a missing or wrong token gets 401 / UNAUTHENTICATED with one message."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.api.test_bad_inputs import INFER, MODEL, _tensor

TOKEN = "s3cret-token_1"
GOOD = {"Authorization": f"Bearer {TOKEN}"}
BAD_HEADERS = [
    ("no header", {}),
    ("wrong token", {"Authorization": "Bearer nope"}),
    ("token prefix", {"Authorization": f"Bearer {TOKEN[:-1]}"}),
    ("token with suffix", {"Authorization": f"Bearer {TOKEN}x"}),
    ("basic scheme", {"Authorization": f"Basic {TOKEN}"}),
    ("no scheme", {"Authorization": TOKEN}),
    ("empty", {"Authorization": ""}),
]
GUARDED = [("GET", "/v2"), ("GET", f"/v2/models/{MODEL}"), ("GET", f"/v2/models/{MODEL}/ready"),
           ("GET", f"/v2/models/{MODEL}/config"), ("GET", "/v2/models/stats"),
           ("GET", "/v2/status"), ("POST", "/v2/repository/index"), ("GET", "/metrics"),
           ("GET", "/openapi.json"), ("POST", INFER),
           ("POST", f"/v2/models/{MODEL}/versions/1/infer"),
           ("POST", f"/v2/models/{MODEL}/frames"), ("GET", "/no/such/path"),
           ("GET", INFER)]
INFER_BODY = json.dumps({"inputs": [_tensor()]}).encode()


@pytest.fixture(scope="module")
def clients(engine_store, cpu_profiles, app_for):
    """(fast path client, FastAPI-only client), both with the token."""
    from tests.api.test_fast_path import client_pair

    with client_pair(engine_store, cpu_profiles, app_for, auth_token=TOKEN) as pair:
        yield pair


def _assert_refused(r):
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json() == {"error": "missing or invalid bearer token"}


@pytest.mark.parametrize("which", [0, 1], ids=["fast_path", "fastapi"])
@pytest.mark.parametrize("case,headers", BAD_HEADERS, ids=[c[0] for c in BAD_HEADERS])
@pytest.mark.parametrize("method,path", GUARDED, ids=[f"{m} {p}" for m, p in GUARDED])
def test_missing_or_wrong_token_is_refused(clients, which, case, headers, method, path):
    _assert_refused(clients[which].request(method, path, headers=headers, content=INFER_BODY
                                           if method == "POST" else None))


@pytest.mark.parametrize("which", [0, 1], ids=["fast_path", "fastapi"])
def test_the_token_opens_every_route(clients, which):
    c = clients[which]
    r = c.post(INFER, content=INFER_BODY, headers=GOOD)
    assert r.status_code == 200, r.text
    assert np.asarray(r.json()["outputs"][0]["data"]).size == 1000
    lower = {"authorization": f"bearer {TOKEN}"}  # the scheme is case-insensitive
    assert c.post(INFER, content=INFER_BODY, headers=lower).status_code == 200
    for method, path in GUARDED:
        r = c.request(method, path, headers=GOOD)
        assert r.status_code != 401, (method, path, r.text)
    assert c.get(INFER, headers=GOOD).status_code == 405  # method checked after the token


@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready"])
def test_health_probes_stay_open(clients, path):
    for c in clients:
        r = c.get(path)
        assert r.status_code == 200, r.text


def test_refusals_are_counted(clients):
    c = clients[0]
    c.get("/v2/status")
    text = c.get("/metrics", headers=GOOD).text
    assert 'route="unauthenticated",status="401"' in text


def test_openapi_declares_the_bearer_scheme(clients):
    doc = clients[0].get("/openapi.json", headers=GOOD).json()
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {"type": "http",
                                                                  "scheme": "bearer"}
    assert doc["paths"]["/v2/status"]["get"]["security"] == [{"bearerAuth": []}]
    assert "401" in doc["paths"][INFER.replace(MODEL, "{model_name}")]["post"]["responses"]
    assert "security" not in doc["paths"]["/v2/health/live"]["get"]


def test_no_token_no_access_control(engine_store, cpu_profiles, app_for):
    from ppipe_trt.serving.local import pipeline_plan

    profiles = cpu_profiles(MODEL)
    plan = pipeline_plan(profiles, MODEL, cuts=[4], gpu_class="cpu", slo_ms=2000.0)
    app = app_for(plan, profiles, {MODEL: engine_store[1][MODEL]})
    assert app.auth is None
    doc = TestClient(app).get("/openapi.json").json()
    assert "securitySchemes" not in doc.get("components", {})


@pytest.mark.parametrize("token", ["", "has space", "tab\t", "é"])
def test_unusable_tokens_are_refused(token):
    from api.app import ApiSettings, create_app
    from ppipe_trt.errors import BadInputError

    with pytest.raises(BadInputError, match="auth token"):
        create_app(lambda: None, ApiSettings(auth_token=token))


def test_cli_flag_wins_over_the_environment(monkeypatch):
    from ppipe_trt.server.cli import AUTH_TOKEN_ENV, auth_token

    monkeypatch.setenv(AUTH_TOKEN_ENV, "from-env")
    assert auth_token(argparse.Namespace(auth_token="from-flag")) == "from-flag"
    assert auth_token(argparse.Namespace(auth_token=None)) == "from-env"
    monkeypatch.setenv(AUTH_TOKEN_ENV, "")
    assert auth_token(argparse.Namespace(auth_token=None)) is None
    monkeypatch.delenv(AUTH_TOKEN_ENV)
    assert auth_token(argparse.Namespace(auth_token=None)) is None


# ---- gRPC ----------------------------------------------------------------------------------
grpc_client = pytest.importorskip("tritonclient.grpc")
import grpc  # noqa: E402
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402


@pytest.fixture(scope="module")
def grpc_url(detector_runtime):
    from api.app import ApiSettings
    from api.grpc_server import GrpcServerThread
    from api.service import InferenceService

    service = InferenceService(lambda: detector_runtime)
    with GrpcServerThread(service, settings=ApiSettings(auth_token=TOKEN)) as srv:
        yield srv.url


def _infer_request():
    x = np.zeros((1, 3, 256, 256), np.float32)
    return service_pb2.ModelInferRequest(
        model_name="demo_detector",
        inputs=[service_pb2.ModelInferRequest.InferInputTensor(name="image", datatype="FP32",
                                                                shape=x.shape)],
        raw_input_contents=[x.tobytes()])


@pytest.mark.parametrize("metadata", [None, (("authorization", "Bearer nope"),),
                                      (("authorization", TOKEN),)],
                         ids=["none", "wrong", "no scheme"])
def test_grpc_refuses_without_the_token(grpc_url, metadata):
    with grpc.insecure_channel(grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for call, request in ((stub.ModelInfer, _infer_request()),
                              (stub.ServerMetadata, service_pb2.ServerMetadataRequest()),
                              (stub.ModelMetadata,
                               service_pb2.ModelMetadataRequest(name="demo_detector"))):
            with pytest.raises(grpc.RpcError) as err:
                call(request, metadata=metadata, timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert err.value.details() == "missing or invalid bearer token"
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ModelStreamInfer(iter([_infer_request()]), metadata=metadata, timeout=30))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # garbage bytes without a token: refused for the token, not parsed
        raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                  request_serializer=lambda b: b,
                                  response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff", metadata=metadata, timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # health stays open
        assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=30).live
        assert stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=30).ready


def test_grpc_serves_with_the_token(grpc_url):
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(_infer_request(), metadata=metadata, timeout=60)
        assert response.model_name == "demo_detector" and len(response.raw_output_contents) == 6
        answers = list(stub.ModelStreamInfer(iter([_infer_request()]), metadata=metadata,
                                             timeout=60))
        assert len(answers) == 1 and not answers[0].error_message
    client = grpc_client.InferenceServerClient(grpc_url)
    try:
        assert client.get_server_metadata(headers={"authorization": f"Bearer {TOKEN}"}).name
    finally:
        client.close()
