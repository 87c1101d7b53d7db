"""The KServe v2 / Triton gRPC front end (api/grpc_server.py) against a real runtime on a
small real model (ONNX Runtime on CPU), driven by Triton's own gRPC client, the generated
stub for what that client cannot send, and perf_analyzer when it is installed."""

from __future__ import annotations

import os
import queue
import shutil
import subprocess

import numpy as np
import pytest

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")  # brings grpcio
import grpc  # noqa: E402
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from api.app import ApiSettings  # noqa: E402
from api.grpc_server import GrpcServerThread  # noqa: E402
from api.service import InferenceService  # noqa: E402

MODEL = "demo_detector"  # one image input, six outputs
MAX_BATCH = 4
SAMPLE_BYTES = 3 * 256 * 256 * 4  # 786,432
LIMIT = 4_000_000  # a batch of MAX_BATCH fits, six samples do not


@pytest.fixture(scope="module")
def runtime(detector_runtime):
    return detector_runtime


@pytest.fixture(scope="module")
def service(runtime):
    return InferenceService(lambda: runtime)


@pytest.fixture(scope="module")
def server(service):
    with GrpcServerThread(service, settings=ApiSettings(max_body_bytes=LIMIT)) as srv:
        yield srv


@pytest.fixture()
def client(server):
    c = tritonclient_grpc.InferenceServerClient(server.url)
    yield c
    c.close()


@pytest.fixture()
def stub(server):
    with grpc.insecure_channel(server.url, options=[
            ("grpc.max_send_message_length", -1)]) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def reference(detector_reference):
    return detector_reference


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12))


def _input(x: np.ndarray, name: str = "image", datatype: str = "FP32"):
    inp = tritonclient_grpc.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return inp


def _assert_serves(client, reference) -> None:
    """A good full-batch request is answered with the reference outputs."""
    x, ref = reference
    result = client.infer(MODEL, [_input(x)])
    for name, value in ref.items():
        assert _rel_err(result.as_numpy(name), value) <= 1e-5, name


def _rpc_error(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return info.value


# ---- metadata ---------------------------------------------------------------------------------
def test_server_and_model_metadata(client, runtime):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL)
    md = client.get_server_metadata(as_json=True)
    assert md["name"] == "ppipe-trt" and "statistics" in md["extensions"]
    meta = client.get_model_metadata(MODEL, as_json=True)
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32",
                               "shape": ["-1", "3", "256", "256"]}]
    assert [o["name"] for o in meta["outputs"]] == [o.name for o in runtime.models[MODEL].outputs]
    assert meta["outputs"][0] == {"name": "cls_p5", "datatype": "FP32",
                                  "shape": ["-1", "20", "8", "8"]}
    cfg = client.get_model_config(MODEL).config
    # the repository configuration's max_batch_size (as Triton reports it), not the batch
    # this test's plan runs (MAX_BATCH), which changes from one plan to the next
    from ppipe_trt.repository import EXAMPLE_REPOSITORY, load_model_entry

    configured = load_model_entry(EXAMPLE_REPOSITORY / MODEL).max_batch
    assert configured != MAX_BATCH
    assert cfg.name == MODEL and cfg.max_batch_size == configured
    assert cfg.input[0].name == "image" and list(cfg.input[0].dims) == [3, 256, 256]
    assert cfg.input[0].data_type == tritonclient_grpc.model_config_pb2.TYPE_FP32
    assert [o.name for o in cfg.output] == [o.name for o in runtime.models[MODEL].outputs]
    assert list(cfg.output[1].dims) == [4, 8, 8]
    assert cfg.parameters["slo_ms"].string_value == "500"
    index = client.get_model_repository_index(as_json=True)
    assert index["models"] == [{"name": MODEL, "version": "1", "state": "READY"}]


def test_statistics_match_rest(client, service, reference):
    _assert_serves(client, reference)
    stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"]
    assert len(stats) == 1 and stats[0]["name"] == MODEL
    # What REST renders; nothing else runs meanwhile: the same figures.
    (rest,) = service.statistics(MODEL)
    assert int(stats[0]["last_inference"]) == rest["last_inference"] > 0
    assert int(stats[0]["inference_count"]) == rest["inference_count"] >= MAX_BATCH
    assert int(stats[0]["execution_count"]) == rest["execution_count"] >= 1
    assert int(stats[0]["inference_stats"]["success"]["ns"]) \
        == rest["inference_stats"]["success"]["ns"]
    sizes = {int(b["batch_size"]): int(b["compute_infer"]["count"])
             for b in stats[0]["batch_stats"]}
    assert sizes == {b["batch_size"]: b["compute_infer"]["count"] for b in rest["batch_stats"]}
    all_models = client.get_inference_statistics(as_json=True)["model_stats"]
    assert [s["name"] for s in all_models] == [MODEL]


# ---- inference -------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, MAX_BATCH])
def test_infer_matches_unsplit_model(client, reference, batch):
    x, ref = reference
    result = client.infer(MODEL, [_input(x[:batch])], request_id=f"r{batch}")
    for name, value in ref.items():
        got = result.as_numpy(name)
        assert got.shape == value[:batch].shape, name
        assert _rel_err(got, value[:batch]) <= 1e-5, name
    response = result.get_response()
    assert response.id == f"r{batch}" and response.model_version == "1"
    assert response.parameters["ppipe_batch_size"].int64_param == batch


def test_requested_output_subset(client, reference):
    x, ref = reference
    wanted = ["box_p3", "cls_p5"]
    result = client.infer(MODEL, [_input(x)],
                          outputs=[tritonclient_grpc.InferRequestedOutput(n) for n in wanted])
    assert [o.name for o in result.get_response().outputs] == wanted
    assert len(result.get_response().raw_output_contents) == 2
    for name in wanted:
        assert _rel_err(result.as_numpy(name), ref[name]) <= 1e-5, name
    assert result.as_numpy("cls_p3") is None


def test_classification_output(client, reference):
    x, ref = reference
    out = tritonclient_grpc.InferRequestedOutput("cls_p5", class_count=3)
    top = client.infer(MODEL, [_input(x)], outputs=[out]).as_numpy("cls_p5")
    assert top.shape == (MAX_BATCH, 3)
    flat = ref["cls_p5"].reshape(MAX_BATCH, -1)
    for row, scores in zip(top, flat):
        assert [int(s.decode().split(":")[1]) for s in row] == list(np.argsort(-scores)[:3])


def test_typed_contents_input(stub, reference):
    """The typed ``contents`` fields are accepted too; outputs still come back raw."""
    x, ref = reference
    request = service_pb2.ModelInferRequest(model_name=MODEL, id="typed")
    tensor = request.inputs.add(name="image", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    response = stub.ModelInfer(request, timeout=30)
    assert response.id == "typed" and len(response.raw_output_contents) == len(ref)
    for out, raw in zip(response.outputs, response.raw_output_contents):
        got = np.frombuffer(raw, np.float32).reshape(list(out.shape))
        assert _rel_err(got, ref[out.name]) <= 1e-5, out.name


def test_stream_infer(client, reference):
    """ModelStreamInfer answers every request, a bad one with its message, in any order."""
    x, ref = reference
    answers: queue.Queue = queue.Queue()
    client.start_stream(lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer(MODEL, [_input(x)], request_id="good-1")
        client.async_stream_infer(MODEL, [_input(x[:, :, :128])], request_id="bad")
        client.async_stream_infer(MODEL, [_input(x)], request_id="good-2")
        got = [answers.get(timeout=30) for _ in range(3)]
    finally:
        client.stop_stream()
    errors = [e for _, e in got if e is not None]
    assert len(errors) == 1 and "input 'image': shape [4, 3, 128, 256]" in errors[0].message()
    results = {r.get_response().id: r for r, e in got if e is None}
    assert set(results) == {"good-1", "good-2"}
    for r in results.values():
        assert _rel_err(r.as_numpy("box_p4"), ref["box_p4"]) <= 1e-5


# ---- errors ----------------------------------------------------------------------------------
def test_error_codes_follow_rest_statuses():
    """The one mapping: each domain error gets the code of its REST status and REST's text;
    anything unexpected is INTERNAL and still says what happened."""
    from api.errors import AnswerTimeoutError, BodyTooLargeError, UnsupportedMediaError
    from api.grpc_server import grpc_status
    from api.service import ServerNotReadyError
    from ppipe_trt.errors import BadInputError, ModelNotFoundError, RequestRejectedError
    from ppipe_trt.serving.runtime import StageFailedError

    code = grpc.StatusCode
    cases = [(ModelNotFoundError("unknown model 'x'"), code.NOT_FOUND),
             (BodyTooLargeError("too big"), code.RESOURCE_EXHAUSTED),
             (UnsupportedMediaError("no"), code.INVALID_ARGUMENT),
             (BadInputError("bad 'image'"), code.INVALID_ARGUMENT),
             (RequestRejectedError("queue_full", "server overloaded"), code.UNAVAILABLE),
             (ServerNotReadyError(), code.UNAVAILABLE),
             (AnswerTimeoutError("no answer within 2500 ms"), code.DEADLINE_EXCEEDED),
             (StageFailedError("stage 1 failed"), code.INTERNAL)]
    for exc, expected in cases:
        assert grpc_status(exc) == (expected, str(exc)), type(exc).__name__
    assert grpc_status(KeyError("x")) == (code.INTERNAL, "internal error: KeyError: 'x'")


def test_unknown_model_and_version_not_found(client, reference):
    e = _rpc_error(client.infer, "nope", [_input(reference[0][:1])])
    assert e.status() == "StatusCode.NOT_FOUND"
    assert e.message() == f"unknown model 'nope'; served models: ['{MODEL}']"
    e = _rpc_error(client.get_model_metadata, MODEL, model_version="2")
    assert e.status() == "StatusCode.NOT_FOUND"
    assert e.message() == f"model '{MODEL}' has no version '2'; versions: ['1']"
    e = _rpc_error(client.get_model_config, "nope")
    assert e.status() == "StatusCode.NOT_FOUND" and "'nope'" in e.message()
    _assert_serves(client, reference)


@pytest.mark.parametrize("case", ["dtype", "shape", "missing", "unknown_input",
                                  "unknown_output", "timeout"])
def test_bad_input_invalid_argument(client, reference, case):
    x = reference[0][:1]  # two inputs of a full batch would pass the message size limit
    outputs = None
    params = {}
    if case == "dtype":
        inputs = [_input(x.astype(np.float64), datatype="FP64")]
        expect = f"input 'image': datatype FP64 but model '{MODEL}' expects FP32"
    elif case == "shape":
        inputs = [_input(x[:, :, :224, :224])]
        expect = ("input 'image': shape [1, 3, 224, 224] does not match the model's "
                  "['N', 3, 256, 256] (N = batch >= 1)")
    elif case == "missing":
        inputs = []
        expect = f"missing inputs ['image'] for model '{MODEL}'"
    elif case == "unknown_input":
        inputs = [_input(x), _input(x, name="mask")]
        expect = f"unknown input 'mask' for model '{MODEL}'; expected inputs: ['image']"
    elif case == "unknown_output":
        inputs = [_input(x)]
        outputs = [tritonclient_grpc.InferRequestedOutput("logits")]
        expect = f"unknown output 'logits' for model '{MODEL}'; outputs: ["
    else:
        inputs = [_input(x)]
        params = {"timeout_ms": -5}
        expect = "parameters.timeout_ms must be a positive number, got -5"
    e = _rpc_error(client.infer, MODEL, inputs, outputs=outputs, parameters=params or None)
    assert e.status() == "StatusCode.INVALID_ARGUMENT"
    assert e.message().startswith(expect), e.message()
    _assert_serves(client, reference)


@pytest.mark.parametrize("case", ["raw_size", "raw_and_contents", "raw_count", "no_data",
                                  "typed_count"])
def test_malformed_tensor_data_invalid_argument(stub, client, reference, case):
    """What Triton's client cannot send, through the generated stub."""
    x = reference[0][:1]
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="image", datatype="FP32", shape=list(x.shape))
    if case == "raw_size":
        request.raw_input_contents.append(x.tobytes()[:-4])
        expect = (f"input 'image': raw_input_contents has {SAMPLE_BYTES - 4} bytes but shape "
                  f"[1, 3, 256, 256] of FP32 needs {SAMPLE_BYTES} bytes")
    elif case == "raw_and_contents":
        request.raw_input_contents.append(x.tobytes())
        tensor.contents.fp32_contents.append(1.0)
        expect = "input 'image': has both raw_input_contents and contents; give one"
    elif case == "raw_count":
        request.raw_input_contents.extend([x.tobytes(), b""])
        expect = "request has 2 raw_input_contents for 1 inputs"
    elif case == "no_data":
        expect = "input 'image': has neither raw_input_contents nor contents"
    else:
        tensor.contents.fp32_contents.extend([0.0] * 10)
        expect = ("input 'image': contents.fp32_contents has 10 elements but shape "
                  "[1, 3, 256, 256] needs 196608")
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(expect), info.value.details()
    _assert_serves(client, reference)


def test_oversized_message_resource_exhausted(client, reference):
    x = np.zeros((6, 3, 256, 256), np.float32)  # 4.7 MB > LIMIT
    e = _rpc_error(client.infer, MODEL, [_input(x)])
    assert e.status() == "StatusCode.RESOURCE_EXHAUSTED", e.message()
    assert str(LIMIT) in e.message()
    _assert_serves(client, reference)


def test_unreachable_deadline_unavailable_with_reason(stub, client, reference):
    x = reference[0][:1]
    request = service_pb2.ModelInferRequest(model_name=MODEL, raw_input_contents=[x.tobytes()])
    request.inputs.add(name="image", datatype="FP32", shape=list(x.shape))
    request.parameters["timeout"].int64_param = 1  # microseconds, as Triton's client sends
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert info.value.details().startswith("request dropped (deadline_unreachable): cannot "
                                           "finish within the deadline")
    assert ("ppipe-reject-reason", "deadline_unreachable") in info.value.trailing_metadata()
    _assert_serves(client, reference)


def test_unimplemented_rpcs_say_so(client, reference):
    for call in (lambda: client.load_model(MODEL), lambda: client.unload_model(MODEL),
                 client.get_system_shared_memory_status, client.get_trace_settings,
                 client.get_log_settings):
        e = _rpc_error(call)
        assert e.status() == "StatusCode.UNIMPLEMENTED"
        assert "is not supported by ppipe-trt" in e.message()
    _assert_serves(client, reference)


def test_no_runtime_yet_is_unavailable():
    """Before the runtime runs: live, not ready, and requests answered UNAVAILABLE."""
    with GrpcServerThread(InferenceService(lambda: None)) as srv:
        c = tritonclient_grpc.InferenceServerClient(srv.url)
        assert c.is_server_live() and not c.is_server_ready()
        e = _rpc_error(c.infer, MODEL, [_input(np.zeros((1, 3, 256, 256), np.float32))])
        assert e.status() == "StatusCode.UNAVAILABLE"
        assert e.message().startswith("server is not ready")
        c.close()


def test_port_in_use_is_an_error(server):
    from ppipe_trt.errors import PPipeError

    with pytest.raises(PPipeError, match="cannot listen for gRPC on 127.0.0.1"):
        with GrpcServerThread(InferenceService(lambda: None), port=server.port):
            pass


# ---- perf_analyzer -----------------------------------------------------------------------------
def _perf_analyzer() -> str | None:
    return os.environ.get("PERF_ANALYZER") or shutil.which("perf_analyzer")


@pytest.mark.skipif(_perf_analyzer() is None,
                    reason="perf_analyzer not installed (set PERF_ANALYZER=/path/to/it, e.g. "
                           "from scripts/fetch_perf_analyzer.sh)")
@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "streaming"])
def test_perf_analyzer_grpc(server, streaming):
    """Full batches (the plan's batch) so that no request waits for company."""
    proc = subprocess.run(
        [_perf_analyzer(), "-i", "grpc", "-u", server.url, "-m", MODEL, "-b", str(MAX_BATCH),
         "--concurrency-range", "1", "--measurement-mode", "count_windows",
         "--measurement-request-count", "20", "--stability-percentage", "50"]
        + (["--streaming"] if streaming else []),
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Throughput:" in proc.stdout
