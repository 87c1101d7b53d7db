"""gRPC robustness: garbage and truncated messages, oversized messages, wrong dtypes and
shapes, unknown models each get their status code, and the server keeps serving."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")
import grpc  # noqa: E402
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402

from api import grpc_server  # noqa: E402
from api.app import ApiSettings  # noqa: E402
from api.grpc_server import GrpcServerThread, server_options  # noqa: E402
from api.service import InferenceService  # noqa: E402

MODEL = "demo_detector"
LIMIT = 4_000_000
METHOD = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module", params=["registered", "interceptor"])
def channel(request, detector_runtime):
    """Tolerant decoding as the server sets it up (deserializers wrapped once, at
    registration), and the per-RPC interceptor it falls back to when the generated code does
    not expose its handlers."""
    service = InferenceService(lambda: detector_runtime)
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "interceptor":
            mp.setattr(grpc_server, "tolerant_handlers", lambda servicer: None)
        with GrpcServerThread(service, settings=ApiSettings(max_body_bytes=LIMIT)) as srv:
            with grpc.insecure_channel(srv.url, options=[
                    ("grpc.max_send_message_length", -1)]) as ch:
                yield ch


def test_every_rpc_decodes_tolerantly_without_an_interceptor(detector_runtime):
    servicer = grpc_server.InferenceServicer(InferenceService(lambda: detector_runtime))
    found = grpc_server.tolerant_handlers(servicer)
    assert found is not None, "tritonclient's generated code no longer exposes its handlers"
    service, handlers = found
    assert service == "inference.GRPCInferenceService"
    rpcs = [m for m in dir(service_pb2_grpc.GRPCInferenceServiceServicer)
            if not m.startswith("_")]
    assert sorted(handlers) == sorted(rpcs)
    for name, handler in handlers.items():
        bad = handler.request_deserializer(b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff")
        assert isinstance(bad, grpc_server.MalformedRequest), name
    good = handlers["ModelInfer"].request_deserializer(GOOD)
    assert good.model_name == MODEL


def _request(x=None, name="image", datatype="FP32", shape=None, model=MODEL, raw=None):
    x = np.zeros((1, 3, 256, 256), np.float32) if x is None else x
    return service_pb2.ModelInferRequest(
        model_name=model,
        inputs=[service_pb2.ModelInferRequest.InferInputTensor(
            name=name, datatype=datatype, shape=x.shape if shape is None else shape)],
        raw_input_contents=[x.tobytes() if raw is None else raw])


def _assert_serves(channel):
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    response = stub.ModelInfer(_request(), timeout=60)
    assert response.model_name == MODEL and len(response.raw_output_contents) == 6


def _code(call, request) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=60)
    return err.value.code()


GOOD = _request().SerializeToString()
GARBAGE = [
    ("random bytes", bytes(range(256)) * 4),
    ("invalid varint", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"),
    ("truncated message", GOOD[: len(GOOD) // 2]),
    ("truncated header", GOOD[:7]),
    ("wrong wire type", b"\x0d\x00\x00"),
]


@pytest.mark.parametrize("case,payload", GARBAGE, ids=[g[0] for g in GARBAGE])
def test_malformed_bytes_are_refused(channel, case, payload):
    raw = channel.unary_unary(METHOD, request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as err:
        raw(payload, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # grpcio alone: UNKNOWN
    assert "malformed request message" in err.value.details()
    _assert_serves(channel)


def test_oversized_message_is_resource_exhausted(channel):
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    x = np.zeros((6, 3, 256, 256), np.float32)  # 4.7 MB > LIMIT
    assert _code(stub.ModelInfer, _request(x)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    _assert_serves(channel)


def test_receive_limit_is_the_body_limit():
    assert ("grpc.max_receive_message_length", 1234) in server_options(
        ApiSettings(max_body_bytes=1234))


BAD = [
    ("wrong dtype", _request(np.zeros((1, 3, 256, 256), np.float64), datatype="FP64"),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("unknown dtype", _request(datatype="FLOAT"), grpc.StatusCode.INVALID_ARGUMENT),
    ("wrong shape", _request(np.zeros((1, 3, 100, 100), np.float32)),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("shape and bytes disagree", _request(shape=[2, 3, 256, 256]),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("short raw contents", _request(raw=b"\x00" * 10), grpc.StatusCode.INVALID_ARGUMENT),
    ("negative dim", _request(shape=[-1, 3, 256, 256]), grpc.StatusCode.INVALID_ARGUMENT),
    ("unknown input", _request(name="img"), grpc.StatusCode.INVALID_ARGUMENT),
    ("unknown model", _request(model="nope"), grpc.StatusCode.NOT_FOUND),
    ("path as model", _request(model="../../etc/passwd"), grpc.StatusCode.NOT_FOUND),
    ("empty model", _request(model=""), grpc.StatusCode.NOT_FOUND),
    ("unknown version", service_pb2.ModelInferRequest(model_name=MODEL, model_version="7"),
     grpc.StatusCode.NOT_FOUND),
    ("no inputs", service_pb2.ModelInferRequest(model_name=MODEL),
     grpc.StatusCode.INVALID_ARGUMENT),
]


@pytest.mark.parametrize("case,request_,code", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_their_status(channel, case, request_, code):
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    assert _code(stub.ModelInfer, request_) == code
    _assert_serves(channel)


def test_unknown_model_in_every_model_rpc(channel):
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    for call, request in (
            (stub.ModelMetadata, service_pb2.ModelMetadataRequest(name="../x")),
            (stub.ModelConfig, service_pb2.ModelConfigRequest(name="/etc")),
            (stub.ModelReady, service_pb2.ModelReadyRequest(name="..")),
            (stub.ModelStatistics, service_pb2.ModelStatisticsRequest(name="a/b"))):
        assert _code(call, request) == grpc.StatusCode.NOT_FOUND
