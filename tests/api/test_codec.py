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


def _binary_request(a: np.ndarray, b: np.ndarray, extra: dict | None = None) -> tuple[bytes, str]:
    header = json.dumps({"inputs": [
        {"name": "a", "shape": list(a.shape), "datatype": "FP32",
         "parameters": {"binary_data_size": a.nbytes}},
        {"name": "b", "shape": list(b.shape), "datatype": "INT64",
         "parameters": {"binary_data_size": b.nbytes}}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}], **(extra or {})}).encode()
    return header + a.tobytes() + b.tobytes(), str(len(header))


def test_a_header_seen_before_gives_what_a_fresh_parse_gives():
    """The second request with the same JSON header is answered from the layout kept for it:
    the same ParsedInfer as a first parse, over its own bytes; a different binary size is
    checked afresh (and refused), and a new model object of the same name starts over."""
    import dataclasses

    from api import codec

    codec._LAYOUTS.clear()
    a, b = np.ones((1, 2), np.float32), np.arange(3, dtype=np.int64).reshape(1, 3)
    body, n = _binary_request(a, b, {"parameters": {"timeout_ms": 7}})
    first = parse_infer_request(body, n, MODEL)
    assert len(codec._LAYOUTS[MODEL.name][1]) == 1
    body2 = body[:int(n)] + (a * 5).tobytes() + (b + 1).tobytes()
    second = parse_infer_request(body2, n, MODEL)
    for got in (first, second):
        assert (got.batch_size, got.request_id, got.timeout_us) == (1, None, 7000.0)
        assert got.outputs == first.outputs and got.parameters == {"timeout_ms": 7}
        assert [(k, v.dtype, v.shape) for k, v in got.inputs.items()] == \
            [("a", np.dtype("<f4"), (1, 2)), ("b", np.dtype("<i8"), (1, 3))]
    assert np.array_equal(second.inputs["a"], a * 5) and np.array_equal(second.inputs["b"], b + 1)
    assert not second.inputs["a"].flags.writeable
    second.parameters["x"] = 1  # a caller's change does not reach the next request
    assert parse_infer_request(body2, n, MODEL).parameters == {"timeout_ms": 7}
    with pytest.raises(BadInputError, match="binary sizes do not add up"):
        parse_infer_request(body2 + b"\0", n, MODEL)
    with pytest.raises(BadInputError, match="binary sizes do not add up"):
        parse_infer_request(body2[:-8], n, MODEL)
    other = dataclasses.replace(MODEL, inputs=(TensorSpec("a", "float32", (-1, 2)),
                                               TensorSpec("b", "int32", (-1, 3))))
    with pytest.raises(BadInputError, match="datatype INT64 but model 'two_in' expects INT32"):
        parse_infer_request(body2, n, other)
    # JSON data is parsed every time (its values are in the header)
    doc = {"inputs": [{"name": "a", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]},
                      {"name": "b", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]}]}
    parse_infer_request(json.dumps(doc).encode(), None, MODEL)
    assert len(codec._LAYOUTS[MODEL.name][1]) == 0


def test_kept_response_headers_equal_fresh_ones():
    """A binary response's JSON header is built once per (model, outputs' names, datatypes,
    shapes) and kept; with and without an id, the bytes equal a fresh build's."""
    from api import codec

    codec._RESPONSE_HEADERS.clear()
    a, b = np.ones((2, 2), np.float32), np.zeros((2, 3), np.int64)
    for extra in ({}, {"id": "frame-\u00e9\"7"}, {"id": 12}, {}):
        body, n = _binary_request(a, b, extra)
        parsed = parse_infer_request(body, n, MODEL)
        y = np.full((2, 4), 3.0, np.float32)
        assert build_infer_response(MODEL, parsed, {"y": y}) == \
            codec._build_response(MODEL, parsed, {"y": y}, None)
        big = y.astype(">f4")  # a big-endian output is sent little-endian
        got, length = build_infer_response(MODEL, parsed, {"y": big})
        assert np.array_equal(np.frombuffer(got[length:], "<f4").reshape(2, 4), y)
    assert len(codec._RESPONSE_HEADERS) == 1


def test_the_protocol_renders_the_headers_render_answer_gives():
    """api.http_protocol writes render_answer_lines' encoded lines; they are render_answer's
    headers as HTTP/1.1 lines with lower-case names, JSON and binary answers alike."""
    from api.fast import render_answer, render_answer_lines
    from api.service import InferOutcome

    a, b = np.ones((1, 2), np.float32), np.zeros((1, 3), np.int64)
    y = np.full((1, 4), 2.5, np.float32)
    for extra in ({}, {"parameters": {"binary_data_output": False}}):
        body, n = _binary_request(a, b, extra)
        parsed = parse_infer_request(body, n, MODEL)
        if extra:  # every output asked as JSON
            parsed.outputs = [type(o)(o.name, False) for o in parsed.outputs]
        for latency, size in ((35_123.4567, 1), (0.0, 4), (1e9 / 3, 64)):
            outcome = InferOutcome({"y": y}, [], latency, size)
            payload, headers = render_answer(MODEL, parsed, outcome)
            payload2, lines = render_answer_lines(MODEL, parsed, outcome)
            assert payload2 == payload
            assert lines == "".join(f"{k.lower()}: {v}\r\n" for k, v in headers).encode()


def test_a_new_id_in_every_header_still_uses_the_kept_layout():
    """perf_analyzer writes {"id":"<n>",...} with a new n in every request: the layout is
    kept without the id, and each request gets its own id; an id the full parse would read
    otherwise (escapes, invalid UTF-8, given twice) is not taken from the prefix."""
    from api import codec

    codec._LAYOUTS.clear()
    a, b = np.ones((1, 2), np.float32), np.zeros((1, 3), np.int64)
    body, n = _binary_request(a, b)
    plain, data = body[:int(n)], body[int(n):]
    rest = plain[1:]  # '"inputs":...}': the header after its opening brace
    for i in range(5):
        header = b'{"id":"%d",' % i + rest
        got = parse_infer_request(header + data, str(len(header)), MODEL)
        assert got.request_id == str(i) and got.batch_size == 1
    assert len(codec._LAYOUTS[MODEL.name][1]) == 1
    assert parse_infer_request(body, n, MODEL).request_id is None  # its own layout
    for prefix, want in ((b'{"id":"x\\"y",', 'x"y'), (b'{"id":"\xc3\xa9",', "\u00e9"),
                         (b'{ "id" : "7" ,', "7")):
        header = prefix + rest
        assert parse_infer_request(header + data, str(len(header)), MODEL).request_id == want
    for bad in (b'{"id":"\xff",', b'{\x0c"id":"1",'):  # invalid UTF-8, not JSON whitespace
        header = bad + rest
        with pytest.raises(BadInputError, match="malformed JSON"):
            parse_infer_request(header + data, str(len(header)), MODEL)
    twice = b'{"id":"1",' + rest[:-1] + b',"id":"2"}'
    for _ in range(2):
        assert parse_infer_request(twice + data, str(len(twice)), MODEL).request_id == "2"
