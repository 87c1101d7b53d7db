"""The gRPC front end's request and response codec without a server: requests declared as
an earlier one was are answered from what was checked then, and responses start from a
kept copy; both give exactly what a fresh parse and a fresh build give."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from api import grpc_server
from api.grpc_server import build_model_infer_response, parse_model_infer
from api.service import InferOutcome
from ppipe_trt.engines.backends.base import TensorSpec
from ppipe_trt.errors import BadInputError
from ppipe_trt.serving.runtime import ServedModel

MODEL = ServedModel("two_in", (TensorSpec("a", "float32", (-1, 2)),
                               TensorSpec("b", "int64", (-1, 3))),
                    (TensorSpec("y", "float32", (-1, 4)), TensorSpec("z", "float32", (-1, 1))),
                    10_000.0, 4, "test")


def _request(a: np.ndarray, b: np.ndarray, request_id: str = "", outputs=("y",),
             classification: int = 0) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=MODEL.name, id=request_id)
    for name, array, datatype in (("a", a, "FP32"), ("b", b, "INT64")):
        t = req.inputs.add()
        t.name, t.datatype = name, datatype
        t.shape.extend(array.shape)
        req.raw_input_contents.append(array.tobytes())
    for name in outputs:
        o = req.outputs.add()
        o.name = name
        if classification:
            o.parameters["classification"].int64_param = classification
    return req


def _same(got, want) -> None:
    assert (got.request_id, got.batch_size, got.outputs, got.timeout_us, got.parameters) == \
        (want.request_id, want.batch_size, want.outputs, want.timeout_us, want.parameters)
    assert list(got.inputs) == list(want.inputs)
    for k in want.inputs:
        assert got.inputs[k].dtype == want.inputs[k].dtype
        assert np.array_equal(got.inputs[k], want.inputs[k])
        assert not got.inputs[k].flags.writeable


def test_requests_declared_as_before_parse_as_a_fresh_parse():
    grpc_server._LAYOUTS.clear()
    a, b = np.ones((2, 2), np.float32), np.arange(6, dtype=np.int64).reshape(2, 3)
    for i in range(3):
        req = _request(a * i, b + i, request_id=f"r{i}" if i else "")
        _same(parse_model_infer(req, MODEL), grpc_server._parse_model_infer(req, MODEL))
    assert len(grpc_server._LAYOUTS[MODEL.name][1]) == 1
    req = _request(a, b, outputs=("z", "y"), classification=2)
    _same(parse_model_infer(req, MODEL), grpc_server._parse_model_infer(req, MODEL))
    assert len(grpc_server._LAYOUTS[MODEL.name][1]) == 2
    bad = _request(a, b)  # the same declarations, 8 bytes short: checked afresh
    bad.raw_input_contents[1] = bad.raw_input_contents[1][:-8]
    with pytest.raises(BadInputError, match="raw_input_contents has 40 bytes"):
        parse_model_infer(bad, MODEL)
    for timeout in (5000, 5000, 7000):  # request parameters are part of the layout
        timed = _request(a, b)
        timed.parameters["timeout"].int64_param = timeout
        timed.parameters["triton_enable_empty_final_response"].bool_param = True
        got = parse_model_infer(timed, MODEL)
        _same(got, grpc_server._parse_model_infer(timed, MODEL))
        assert got.timeout_us == float(timeout)
        got.parameters["x"] = 1  # not kept for the next request
    assert len(grpc_server._LAYOUTS[MODEL.name][1]) == 4


def test_responses_from_a_kept_copy_equal_fresh_ones():
    grpc_server._RESPONSES.clear()
    a, b = np.ones((1, 2), np.float32), np.zeros((1, 3), np.int64)
    for request_id, latency, size in (("", 35_000.0, 1), ("frame-9", 41_234.5678, 3),
                                      ("", 1.0, 2)):
        req = _request(a, b, request_id=request_id, outputs=("y", "z"))
        parsed = parse_model_infer(req, MODEL)
        outcome = InferOutcome({"y": np.full((1, 4), 1.5, np.float32),
                                "z": np.zeros((1, 1), np.float32)}, [], latency, size)
        got = build_model_infer_response(MODEL, parsed, outcome)
        want = grpc_server._build_model_infer_response(MODEL, parsed, outcome)
        assert got == want and got.id == request_id
    assert len(grpc_server._RESPONSES) == 1
