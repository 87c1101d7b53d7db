"""The infer fast path (api/fast.py) answers exactly as FastAPI's infer route: the same
status, body and headers for good and bad requests, and the same HTTP metrics."""

from __future__ import annotations

import gzip
import json
import re

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.api.test_bad_inputs import BAD_INPUTS, INFER, LIMIT, MODEL, _binary, _tensor

GOOD = [
    ("JSON tensors", {"content": json.dumps({"inputs": [_tensor()], "id": "r1"}).encode(),
                      "headers": {"Content-Type": "application/json"}}),
    ("binary tensors", _binary([602112], np.zeros(602112 // 4, np.float32).tobytes())),
    ("gzip body", {"content": gzip.compress(json.dumps({"inputs": [_tensor()]}).encode()),
                   "headers": {"Content-Type": "application/json",
                               "Content-Encoding": "gzip"}}),
    ("versioned route", {"content": json.dumps({"inputs": [_tensor()]}).encode(),
                         "headers": {}, "path": f"/v2/models/{MODEL}/versions/1/infer"}),
    ("unknown version", {"content": b"{}", "headers": {},
                         "path": f"/v2/models/{MODEL}/versions/7/infer"}),
    ("unknown model", {"content": b"{}", "headers": {}, "path": "/v2/models/nope/infer"}),
    ("unsupported encoding", {"content": b"{}", "headers": {"Content-Encoding": "br"}}),
]
CASES = GOOD + [(c[0], c[3]) for c in BAD_INPUTS if c[1] == "POST" and c[2] == INFER]
COMPARED_HEADERS = ("content-type", "inference-header-content-length", "retry-after",
                    "x-ppipe-batch-size")


def client_pair(engine_store, cpu_profiles, app_for, **settings):
    """(client of the app with the fast path, client of the FastAPI-only app) serving
    ``demo_resnet`` on two stages, both with ``settings``; a context manager."""
    from contextlib import contextmanager

    from ppipe_trt.serving.local import pipeline_plan

    @contextmanager
    def pair():
        profiles = cpu_profiles(MODEL)
        plan = pipeline_plan(profiles, MODEL, cuts=[4], gpu_class="cpu", slo_ms=2000.0)
        built = {MODEL: engine_store[1][MODEL]}
        fast = app_for(plan, profiles, built, **settings)
        slow = app_for(plan, profiles, built, **settings, fast_infer=False)
        assert fast.fast_infer is not None and slow.fast_infer is None
        with TestClient(fast) as f, TestClient(slow) as s:
            yield f, s

    return pair()


@pytest.fixture(scope="module")
def clients(engine_store, cpu_profiles, app_for):
    with client_pair(engine_store, cpu_profiles, app_for, max_body_bytes=LIMIT) as pair:
        yield pair


@pytest.mark.parametrize("case,kwargs", CASES, ids=[c[0] for c in CASES])
def test_fast_path_answers_as_the_fastapi_route(clients, case, kwargs):
    kwargs = dict(kwargs)
    path = kwargs.pop("path", INFER)
    answers = [c.post(path, **kwargs) for c in clients]
    fast, slow = answers
    assert fast.status_code == slow.status_code, (fast.text, slow.text)
    for name in COMPARED_HEADERS:
        assert fast.headers.get(name) == slow.headers.get(name), name
    if fast.status_code == 200:
        assert "x-ppipe-latency-ms" in fast.headers
        n = fast.headers.get("inference-header-content-length")
        if n is None:
            assert fast.json() == slow.json()
        else:  # binary outputs: same JSON header, same tensor bytes
            n = int(n)
            assert json.loads(fast.content[:n]) == json.loads(slow.content[:n])
            assert fast.content[n:] == slow.content[n:]
    else:  # the same error; a drop's detail names clock times, which differ
        a, b = fast.json(), slow.json()
        assert a.get("reason") == b.get("reason")
        assert re.sub(r"\d+ us", "T us", a["error"]) == re.sub(r"\d+ us", "T us", b["error"])


def test_fast_path_counts_http_metrics_under_the_route_template(clients):
    fast, _ = clients
    before = fast.get("/metrics").text
    assert fast.post(INFER, json={"inputs": [_tensor()]}).status_code == 200
    assert fast.post(INFER, content=b"{").status_code == 400
    after = fast.get("/metrics").text

    def count(text: str, status: str) -> float:
        key = (f'ppipe_http_requests_total{{route="/v2/models/{{model_name}}/infer",'
               f'status="{status}"}}')
        lines = [ln for ln in text.splitlines() if ln.startswith(key)]
        return float(lines[0].split()[-1]) if lines else 0.0

    assert count(after, "200") == count(before, "200") + 1
    assert count(after, "400") == count(before, "400") + 1


def test_other_methods_and_paths_still_go_to_fastapi(clients):
    fast, _ = clients
    assert fast.get(INFER).status_code == 405  # only POST is an infer request
    assert fast.post("/v2/models/infer").status_code in (404, 405)
    assert fast.get(f"/v2/models/{MODEL}").json()["name"] == MODEL
