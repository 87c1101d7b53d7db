"""Acceptance 3: bad inputs get a 4xx (or a 503 for an unreachable deadline) with a message
naming what was wrong, and the server keeps serving."""

from __future__ import annotations

import gzip
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

MODEL = "demo_resnet"
SAMPLE = np.zeros((1, 3, 224, 224), np.float32)
LIMIT = 2_000_000  # bytes; one 224x224 fp32 sample is 602,112


def _json(doc) -> dict:
    return {"content": json.dumps(doc).encode(), "headers": {"Content-Type": "application/json"}}


def _tensor(**over) -> dict:
    t = {"name": "image", "shape": [1, 3, 224, 224], "datatype": "FP32",
         "data": [0.0] * SAMPLE.size}
    t.update(over)
    return t


def _binary(sizes_declared: list[int], payload: bytes, header_len: str | None = None,
            shape=(1, 3, 224, 224)) -> dict:
    inputs = [{"name": "image", "shape": list(shape), "datatype": "FP32",
               "parameters": {"binary_data_size": n}} for n in sizes_declared]
    header = json.dumps({"inputs": inputs}).encode()
    return {"content": header + payload,
            "headers": {"Inference-Header-Content-Length": header_len or str(len(header)),
                        "Content-Type": "application/octet-stream"}}


def _image(fmt: str, truncate: int | None = None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, format=fmt)
    data = buf.getvalue()
    return data[:truncate] if truncate else data


INFER = f"/v2/models/{MODEL}/infer"
FRAMES = f"/v2/models/{MODEL}/frames"

# (case, method, path, request kwargs, status, text the error message must contain)
BAD_INPUTS = [
    ("malformed JSON", "POST", INFER, {"content": b'{"inputs": [', "headers": {}},
     400, "malformed JSON"),
    ("JSON not an object", "POST", INFER, _json([1, 2]), 400, "must be a JSON object"),
    ("no inputs", "POST", INFER, _json({"inputs": []}), 400, "non-empty 'inputs'"),
    ("unknown tensor name", "POST", INFER, _json({"inputs": [_tensor(name="img")]}), 400,
     "unknown input 'img' for model 'demo_resnet'; expected inputs: ['image']"),
    ("input given twice", "POST", INFER, _json({"inputs": [_tensor(), _tensor()]}), 400,
     "input 'image' is given twice"),
    ("wrong datatype", "POST", INFER, _json({"inputs": [_tensor(datatype="FP64")]}), 400,
     "datatype FP64 but model 'demo_resnet' expects FP32"),
    ("unknown datatype", "POST", INFER, _json({"inputs": [_tensor(datatype="FLOAT")]}), 400,
     "unknown datatype 'FLOAT'"),
    ("wrong shape", "POST", INFER, _json({"inputs": [_tensor(shape=[1, 3, 100, 100])]}), 400,
     "shape [1, 3, 100, 100] does not match the model's ['N', 3, 224, 224]"),
    ("shape not integers", "POST", INFER, _json({"inputs": [_tensor(shape=[1, "3", 224, 224])]}),
     400, "'shape' must be a list of non-negative integers"),
    ("element count off", "POST", INFER, _json({"inputs": [_tensor(data=[0.0] * 10)]}), 400,
     "'data' has 10 elements but shape [1, 3, 224, 224] needs 150528"),
    ("non-numeric data", "POST", INFER, _json({"inputs": [_tensor(data=["a"] * SAMPLE.size)]}),
     400, "is not a (nested) list of FP32 numbers"),
    ("neither data nor binary", "POST", INFER,
     _json({"inputs": [{"name": "image", "shape": [1, 3, 224, 224], "datatype": "FP32"}]}),
     400, "has neither 'data' nor parameters.binary_data_size"),
    ("missing input", "POST", INFER, _json({"inputs": "image"}), 400, "non-empty 'inputs'"),
    ("unknown output", "POST", INFER,
     _json({"inputs": [_tensor()], "outputs": [{"name": "probs"}]}), 400,
     "unknown output 'probs' for model 'demo_resnet'; outputs: ['logits']"),
    ("bad timeout parameter", "POST", INFER,
     _json({"inputs": [_tensor()], "parameters": {"timeout_ms": -5}}), 400,
     "parameters.timeout_ms must be a positive number"),
    ("too many samples", "POST", INFER,
     _json({"inputs": [_tensor(shape=[65, 3, 1, 1], data=[0.0] * 195)]}), 400,
     "does not match"),
    ("binary sizes exceed body", "POST", INFER, _binary([SAMPLE.nbytes], SAMPLE.tobytes()[:100]),
     400, "binary sizes do not add up"),
    ("binary trailing bytes", "POST", INFER, _binary([SAMPLE.nbytes], SAMPLE.tobytes() + b"xx"),
     400, "binary sizes do not add up: inputs declare 602112 bytes but 602114 bytes follow"),
    ("binary size vs shape", "POST", INFER, _binary([100], b"\0" * 100), 400,
     "binary_data_size is 100 bytes but shape [1, 3, 224, 224] of FP32 needs 602112 bytes"),
    ("header length past body", "POST", INFER, _binary([0], b"", header_len="99999"), 400,
     "Inference-Header-Content-Length is 99999 but the body has"),
    ("header length not a number", "POST", INFER, _binary([0], b"", header_len="ten"), 400,
     "Inference-Header-Content-Length must be an integer, got 'ten'"),
    ("unknown model", "POST", "/v2/models/nope/infer", _json({"inputs": [_tensor()]}), 404,
     "unknown model 'nope'; served models: ['demo_resnet']"),
    ("unknown model metadata", "GET", "/v2/models/nope", {}, 404, "unknown model 'nope'"),
    ("unknown version", "GET", f"/v2/models/{MODEL}/versions/7", {}, 404,
     "model 'demo_resnet' has no version '7'"),
    ("body over limit", "POST", INFER, {"content": b"x" * (LIMIT + 1), "headers": {}}, 413,
     "over the 2000000-byte limit"),
    ("unsupported content encoding", "POST", INFER,
     {"content": b"{}", "headers": {"Content-Encoding": "br"}}, 415,
     "Content-Encoding 'br' is not supported"),
    ("corrupt gzip", "POST", INFER,
     {"content": b"not gzip", "headers": {"Content-Encoding": "gzip"}}, 400,
     "body is not valid gzip data"),
    ("gzip bomb over limit", "POST", INFER,
     {"content": gzip.compress(b" " * (LIMIT + 10)), "headers": {"Content-Encoding": "gzip"}},
     413, "decompressed request body is over"),
    ("corrupt image", "POST", FRAMES,
     {"content": b"\xff\xd8\xff\xe0 definitely not a jpeg",
      "headers": {"Content-Type": "image/jpeg"}},
     400, "corrupt image"),
    ("not an image at all", "POST", FRAMES,
     {"content": b"GIF? no: random bytes " * 8, "headers": {"Content-Type": "image/png"}},
     400, "corrupt or unsupported image: not a JPEG or PNG the decoder can identify"),
    ("truncated JPEG", "POST", FRAMES,
     {"content": _image("JPEG", truncate=200), "headers": {"Content-Type": "image/jpeg"}},
     400, "corrupt image"),
    ("GIF instead of JPEG/PNG", "POST", FRAMES,
     {"content": _image("GIF"), "headers": {"Content-Type": "image/jpeg"}}, 400,
     "image format GIF is not accepted; send JPEG or PNG"),
    ("empty image", "POST", FRAMES, {"content": b"", "headers": {"Content-Type": "image/png"}},
     400, "empty image body"),
    ("frames: wrong content type", "POST", FRAMES,
     {"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415,
     "content type 'text/plain' is not accepted"),
    ("frames: multipart without file", "POST", FRAMES,
     {"files": None}, 400, "multipart body has no file part"),
    ("frames: multipart with an unknown Content-Encoding", "POST", FRAMES,
     {"files": {"image": ("f.jpg", _image("JPEG"), "image/jpeg")},
      "headers": {"Content-Encoding": "6-Dz"}}, 415, "Content-Encoding '6-dz' is not"),
    ("frames: compressed multipart", "POST", FRAMES,
     {"files": {"image": ("f.jpg", _image("JPEG"), "image/jpeg")},
      "headers": {"Content-Encoding": "gzip"}}, 415, "multipart body cannot be sent"),
    ("frames: bad top", "POST", FRAMES + "?top=0",
     {"content": _image("PNG"), "headers": {"Content-Type": "image/png"}}, 400,
     "top must be in 1..1000"),
    ("deadline unreachable", "POST", INFER,
     _json({"inputs": [_tensor()], "parameters": {"timeout_ms": 0.01}}), 503,
     "request dropped (deadline_unreachable)"),
]


@pytest.fixture(scope="module")
def client(engine_store, cpu_profiles, app_for):
    from ppipe_trt.serving.local import pipeline_plan

    profiles = cpu_profiles(MODEL)
    plan = pipeline_plan(profiles, MODEL, cuts=[4], gpu_class="cpu", slo_ms=2000.0)
    app = app_for(plan, profiles, {MODEL: engine_store[1][MODEL]}, max_body_bytes=LIMIT)
    with TestClient(app) as c:
        yield c


@pytest.mark.parametrize("case,method,path,kwargs,status,message", BAD_INPUTS,
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_answered_with_status_and_message(client, case, method, path, kwargs,
                                                       status, message):
    if kwargs.get("files", 0) is None:  # multipart form without a file part
        r = client.post(path, headers={"Content-Type": "multipart/form-data; boundary=xyz"},
                        content=b"--xyz\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\n"
                                b"no file\r\n--xyz--\r\n")
    else:
        r = client.request(method, path, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert message in body["error"], body
    if status == 503:
        assert body["reason"] == "deadline_unreachable"
    # the server keeps serving
    assert client.get("/v2/health/ready").status_code == 200


def test_server_still_serves_after_bad_inputs(client):
    r = client.post(INFER, json={"inputs": [_tensor()]})
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["shape"] == [1, 1000]
    metrics = client.get("/metrics").text
    assert 'ppipe_drops_total{model="demo_resnet",reason="deadline_unreachable"}' in metrics
