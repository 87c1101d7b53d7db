"""The infer routes answered inside uvicorn's protocol (api/http_protocol.py), over real
sockets: the same answers as FastAPI's own route (status, headers, bodies, metrics) for every
good and bad request of test_fast_path.py, and HTTP/1.1 kept whole (100-continue, pipelining,
chunked bodies, limits mid-body, connection close, HTTP/1.0, access control, a client that
leaves, a bug answered 500), the server still serving after each."""

from __future__ import annotations

import json
import re
import socket
import time

import httpx
import numpy as np
import pytest

from tests.api.conftest import UvicornThread
from tests.api.test_bad_inputs import INFER, LIMIT, MODEL, _binary, _tensor
from tests.api.test_fast_path import CASES, COMPARED_HEADERS

TOKEN = "s3cret-token-for-tests"


def _plan(engine_store, cpu_profiles):
    from ppipe_trt.serving.local import pipeline_plan

    profiles = cpu_profiles(MODEL)
    plan = pipeline_plan(profiles, MODEL, cuts=[4], gpu_class="cpu", slo_ms=2000.0)
    return plan, profiles, {MODEL: engine_store[1][MODEL]}


@pytest.fixture(scope="module", params=["inline", "offload"])
def servers(request, engine_store, cpu_profiles, app_for):
    """(server answering infer in the protocol, server of the FastAPI-only app over ASGI).

    ``inline``: every body parsed on the event loop and answered from the future's callback
    (what the small requests of a cluster's traffic take); ``offload``: bodies above
    ``api.fast.OFFLOAD_BYTES`` (this model's 602 KB images) parsed in a thread, in a task."""
    plan, profiles, built = _plan(engine_store, cpu_profiles)
    fast = app_for(plan, profiles, built, max_body_bytes=LIMIT)
    slow = app_for(plan, profiles, built, max_body_bytes=LIMIT, fast_infer=False)
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "inline":
            mp.setattr("api.http_protocol.OFFLOAD_BYTES", 1 << 40)
        with UvicornThread(fast) as f, UvicornThread(slow, asgi=True) as s:
            from api.http_protocol import InferHttpProtocol

            assert issubclass(f.server.config.http_protocol_class, InferHttpProtocol)
            assert not issubclass(s.server.config.http_protocol_class, InferHttpProtocol)
            yield f, s


def _body(doc: dict) -> bytes:
    return json.dumps(doc).encode()


GOOD_BODY = _body({"inputs": [_tensor()], "id": "r1"})


def _exchange(port: int, data: bytes, responses: int = 1, timeout: float = 30.0) -> bytes:
    """Send raw ``data`` on one connection; read until ``responses`` complete responses (by
    their content-length) arrived or the server closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return _read(s, responses)


def _read(s: socket.socket, responses: int) -> bytes:
    got = b""
    while _complete(got) < responses:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        got += chunk
    return got


def _complete(data: bytes) -> int:
    """How many whole final responses ``data`` holds (a 100 Continue is not one)."""
    n = 0
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            return n
        if head.startswith(b"HTTP/1.1 100"):
            data = rest
            continue
        m = re.search(rb"(?im)^content-length: *(\d+)", head)
        size = int(m.group(1)) if m else 0
        if len(rest) < size:
            return n
        n += 1
        data = rest[size:]


def _statuses(data: bytes) -> list[int]:
    return [int(s) for s in re.findall(rb"HTTP/1\.[01] (\d{3}) ", data)]


def _post(path: str, body: bytes, extra: str = "", version: str = "1.1") -> bytes:
    return (f"POST {path} HTTP/{version}\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


@pytest.mark.parametrize("case,kwargs", CASES, ids=[c[0] for c in CASES])
def test_protocol_answers_as_the_fastapi_route(servers, case, kwargs):
    kwargs = dict(kwargs)
    path = kwargs.pop("path", INFER)
    answers = [httpx.post(f"http://{srv.url}{path}", timeout=30, **kwargs) for srv in servers]
    fast, slow = answers
    assert fast.status_code == slow.status_code, (fast.text, slow.text)
    for name in COMPARED_HEADERS + ("server", "www-authenticate"):
        assert fast.headers.get(name) == slow.headers.get(name), name
    assert "date" in fast.headers
    if fast.status_code == 200:
        assert "x-ppipe-latency-ms" in fast.headers
        n = fast.headers.get("inference-header-content-length")
        if n is None:
            assert fast.json() == slow.json()
        else:
            n = int(n)
            assert json.loads(fast.content[:n]) == json.loads(slow.content[:n])
            assert fast.content[n:] == slow.content[n:]
    else:
        a, b = fast.json(), slow.json()
        assert a.get("reason") == b.get("reason")
        assert re.sub(r"\d+ us", "T us", a["error"]) == re.sub(r"\d+ us", "T us", b["error"])


def test_outputs_equal_onnxruntime_on_the_model(servers, engine_store):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(engine_store[1][MODEL].full_onnx),
                                providers=["CPUExecutionProvider"])
    # the same JSON header each time (the second is answered from the layout kept for it):
    # each answer is its own request's
    for seed in (3, 4):
        x = np.random.default_rng(seed).standard_normal((1, 3, 224, 224)).astype(np.float32)
        answer = httpx.post(f"http://{servers[0].url}{INFER}", timeout=30,
                            **_binary([x.nbytes], x.tobytes()))
        assert answer.status_code == 200, answer.text
        got = answer.json()
        ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        out = np.asarray(got["outputs"][0]["data"], np.float32).reshape(ref.shape)
        assert np.max(np.abs(out - ref)) < 1e-4


def test_counts_http_metrics_under_the_route_template(servers):
    url = f"http://{servers[0].url}"

    def count(status: str) -> float:
        key = (f'ppipe_http_requests_total{{route="/v2/models/{{model_name}}/infer",'
               f'status="{status}"}}')
        text = httpx.get(f"{url}/metrics").text
        lines = [ln for ln in text.splitlines() if ln.startswith(key)]
        return float(lines[0].split()[-1]) if lines else 0.0

    before = count("200"), count("400")
    assert httpx.post(url + INFER, content=GOOD_BODY, timeout=30).status_code == 200
    assert httpx.post(url + INFER, content=b"{", timeout=30).status_code == 400
    assert (count("200"), count("400")) == (before[0] + 1, before[1] + 1)


def test_expect_100_continue(servers):
    port = servers[0].port
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        head, body = _post(INFER, GOOD_BODY, "Expect: 100-continue\r\n").split(b"\r\n\r\n", 1)
        s.sendall(head + b"\r\n\r\n")
        assert s.recv(1024).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(body)
        assert _statuses(_read(s, 1)) == [200]
    # an unknown model is refused at once, without asking for the body
    got = _exchange(port, _post("/v2/models/nope/infer", b"{}", "Expect: 100-continue\r\n"))
    assert b"100 Continue" not in got and _statuses(got) == [404]


def test_pipelined_requests_are_answered_in_order(servers):
    bad = _post(INFER, b"{")
    meta = f"GET /v2/models/{MODEL} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    got = _exchange(servers[0].port, _post(INFER, GOOD_BODY) + bad + meta
                    + _post(INFER, GOOD_BODY), responses=4)
    assert _statuses(got) == [200, 400, 200, 200]
    assert got.count(b'"model_name":"demo_resnet"') == 2 and b'"platform"' in got


def test_chunked_request_body(servers):
    chunks = [GOOD_BODY[i:i + 70000] for i in range(0, len(GOOD_BODY), 70000)]
    data = (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    for c in chunks:
        data += b"%x\r\n" % len(c) + c + b"\r\n"
    data += b"0\r\n\r\n"
    assert _statuses(_exchange(servers[0].port, data)) == [200]


def test_body_over_the_limit_mid_stream_then_the_connection_goes_on(servers):
    big = b"x" * (LIMIT + 10)
    data = (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            ).encode() + b"%x\r\n" % len(big) + big + b"\r\n0\r\n\r\n" + _post(INFER, GOOD_BODY)
    got = _exchange(servers[0].port, data, responses=2)
    assert _statuses(got) == [413, 200]
    assert b"over the 2000000-byte limit" in got
    # declared too large: refused before the body
    got = _exchange(servers[0].port, (f"POST {INFER} HTTP/1.1\r\nHost: x\r\n"
                                      f"Content-Length: {LIMIT + 1}\r\n\r\n").encode())
    assert _statuses(got) == [413]


def test_connection_close_and_http_1_0(servers):
    for data in (_post(INFER, GOOD_BODY, "Connection: close\r\n"),
                 _post(INFER, GOOD_BODY, version="1.0")):
        with socket.create_connection(("127.0.0.1", servers[0].port), timeout=30) as s:
            s.sendall(data)
            got = b""
            while chunk := s.recv(1 << 20):  # the server closes after the answer
                got += chunk
        assert _statuses(got) == [200] and b"connection: close\r\n" in got.lower()


def test_client_leaving_mid_inference_loses_nothing_else(servers):
    port = servers[0].port
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(_post(INFER, GOOD_BODY))
    time.sleep(0.5)
    assert httpx.post(f"http://{servers[0].url}{INFER}", content=GOOD_BODY,
                      timeout=30).status_code == 200


def test_a_bug_is_answered_500_and_the_server_keeps_serving(servers, monkeypatch):
    import api.http_protocol as proto

    def broken(*_):
        raise RuntimeError("render exploded")

    monkeypatch.setattr(proto, "render_answer_lines", broken)
    monkeypatch.setattr("api.fast.render_answer", broken)  # (the offloaded path's)
    got = httpx.post(f"http://{servers[0].url}{INFER}", content=GOOD_BODY, timeout=30)
    assert got.status_code == 500
    assert got.json()["error"] == "internal server error: RuntimeError: render exploded"
    monkeypatch.undo()
    assert httpx.post(f"http://{servers[0].url}{INFER}", content=GOOD_BODY,
                      timeout=30).status_code == 200


def test_access_control_in_the_protocol(engine_store, cpu_profiles, app_for):
    plan, profiles, built = _plan(engine_store, cpu_profiles)
    app = app_for(plan, profiles, built, auth_token=TOKEN)
    with UvicornThread(app) as srv:
        url = f"http://{srv.url}{INFER}"
        refused = httpx.post(url, content=GOOD_BODY, timeout=30)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"
        assert refused.json() == {"error": "missing or invalid bearer token"}
        wrong = httpx.post(url, content=GOOD_BODY, timeout=30,
                           headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = httpx.post(url, content=GOOD_BODY, timeout=30,
                        headers={"Authorization": f"bearer {TOKEN}"})
        assert ok.status_code == 200
        metrics = httpx.get(f"http://{srv.url}/metrics",
                            headers={"Authorization": f"Bearer {TOKEN}"}).text
        assert re.search(r'ppipe_http_requests_total\{route="unauthenticated",status="401"\} '
                         r'2\.0', metrics)


def test_without_the_fast_path_uvicorn_keeps_its_own_protocol(engine_store, cpu_profiles,
                                                              app_for):
    from api.http_protocol import http_protocol_for

    plan, profiles, built = _plan(engine_store, cpu_profiles)
    assert http_protocol_for(app_for(plan, profiles, built, fast_infer=False)) == "auto"
