"""The binary tensor extension and the v2 codec, without HTTP."""

from __future__ import annotations

import json

import numpy as np
import pytest

from api.binary import decode_bytes_tensor, encode_bytes_tensor, split_body
from api.codec import build_infer_response, classification_strings, parse_infer_request
from ppipe_trt.engines.backends.base import TensorSpec
from ppipe_trt.errors import BadInputError
from ppipe_trt.serving.runtime import ServedModel

MODEL = ServedModel("two_in", (TensorSpec("a", "float32", (-1, 2)),
                               TensorSpec("b", "int64", (-1, 3))),
                    (TensorSpec("y", "float32", (-1, 4)),), 10_000.0, 4, "test")


def test_mixed_binary_and_json_inputs_parse_without_copying():
    a = np.arange(4, dtype=np.float32).reshape(2, 2)
    header = json.dumps({"id": 9, "inputs": [
        {"name": "a", "shape": [2, 2], "datatype": "FP32",
         "parameters": {"binary_data_size": a.nbytes}},
        {"name": "b", "shape": [2, 3], "datatype": "INT64", "data": [[1, 2, 3], [4, 5, 6]]}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        "parameters": {"timeout_ms": 12.5}}).encode()
    parsed = parse_infer_request(header + a.tobytes(), str(len(header)), MODEL)
    assert parsed.batch_size == 2 and parsed.request_id == "9"
    assert np.array_equal(parsed.inputs["a"], a) and not parsed.inputs["a"].flags.writeable
    assert parsed.inputs["b"].dtype == np.int64 and parsed.inputs["b"][1, 2] == 6
    assert parsed.timeout_us == 12_500.0
    y = np.ones((2, 4), np.float32)
    body, n = build_infer_response(MODEL, parsed, {"y": y})
    doc = json.loads(body[:n])
    assert doc["id"] == "9" and doc["outputs"][0]["parameters"]["binary_data_size"] == 32
    assert np.array_equal(np.frombuffer(body[n:], np.float32).reshape(2, 4), y)


def test_inputs_must_agree_on_batch():
    doc = {"inputs": [{"name": "a", "shape": [2, 2], "datatype": "FP32", "data": [0] * 4},
                      {"name": "b", "shape": [3, 3], "datatype": "INT64", "data": [0] * 9}]}
    with pytest.raises(BadInputError, match=r"disagree on the batch dimension: \[2, 3\]"):
        parse_infer_request(json.dumps(doc).encode(), None, MODEL)


def test_bytes_tensor_round_trip_and_truncation():
    items = [b"", b"7.5:3", b"x" * 300]
    raw = encode_bytes_tensor(items)
    assert decode_bytes_tensor(raw) == items
    with pytest.raises(BadInputError, match="runs past the end"):
        decode_bytes_tensor(raw[:-1])


def test_classification_strings_are_top_k_score_index():
    scores = np.array([[0.1, 3.0, -1.0, 2.0]], np.float32)
    top = classification_strings(scores, 2)
    assert [s.decode() for s in top[0]] == ["3.000000:1", "2.000000:3"]


def test_split_body_without_header_length_is_all_json():
    header, binary = split_body(b'{"inputs": []}', None)
    assert header == b'{"inputs": []}' and len(binary) == 0
