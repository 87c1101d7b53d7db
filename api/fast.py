"""The hot path of ``POST /v2/models/{m}/infer`` as a plain ASGI app in front of FastAPI.

A cluster's traffic is almost all inference requests, and FastAPI's machinery (route
matching over every route, dependency solving, request and response objects, four layers of
middleware) cost more CPU per request than the protocol itself (docs/benchmarks/
dataplane.md).  :class:`InferFastPath` answers the two infer routes itself and hands every
other request, unchanged, to the FastAPI app behind it; the FastAPI routes of the same paths
stay (OpenAPI documents them, and they answer when the fast path is turned off with
``ApiSettings.fast_infer=False``).

Both answer through the same functions (:func:`inflate`, :func:`infer_answer`) and the same
error mapping (:func:`api.errors.status_for`), so a request gets the same status, headers
and body from either; the HTTP metrics count both under the route's template.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from typing import Any

from api.binary import HEADER_LENGTH
from api.codec import ParsedInfer, build_infer_response, parse_infer_request
from api.errors import BodyTooLargeError, UnsupportedMediaError, status_for
from api.metrics import AppMetrics
from api.service import InferenceService, InferOutcome
from ppipe_trt.errors import BadInputError, PPipeError, RequestRejectedError
from ppipe_trt.serving.runtime import ServedModel

log = logging.getLogger("ppipe.api")

#: Parse bodies above this size in a worker thread, not on the event loop.
OFFLOAD_BYTES = 256 * 1024

ROUTE = "/v2/models/{model_name}/infer"
VERSIONED_ROUTE = "/v2/models/{model_name}/versions/{version}/infer"
_PREFIX, _SUFFIX = "/v2/models/", "/infer"


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """``body`` decoded per its ``Content-Encoding`` (lower case), refused once it passes
    ``limit`` bytes."""
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaError(f"Content-Encoding {encoding!r} is not supported; use "
                                    "gzip, deflate or none")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        body = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadInputError(f"body is not valid {encoding} data: {exc}") from None
    if len(body) > limit:
        raise BodyTooLargeError(f"decompressed request body is over the {limit}-byte limit")
    return body


def refuse_declared_oversize(declared: str | None, limit: int) -> None:
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLargeError(f"request body of {int(declared)} bytes is over the "
                                f"{limit}-byte limit")


async def infer_answer(service: InferenceService, model: ServedModel, body: bytes,
                       header_length: str | None) -> tuple[bytes, list[tuple[str, str]]]:
    """Parse, infer and render one request of ``model``: the response body and its headers
    (content type, the binary header's length, the timing headers)."""
    if len(body) > OFFLOAD_BYTES:
        parsed = await asyncio.to_thread(parse_infer_request, body, header_length, model)
    else:
        parsed = parse_infer_request(body, header_length, model)
    outcome = await service.infer(model, parsed)
    return render_answer(model, parsed, outcome)


def render_answer(model: ServedModel, parsed: ParsedInfer, outcome: InferOutcome
                  ) -> tuple[bytes, list[tuple[str, str]]]:
    """The response body and headers of an answered request (see :func:`infer_answer`)."""
    payload, json_length = build_infer_response(model, parsed, outcome.outputs)
    headers = [("X-PPipe-Latency-Ms", f"{outcome.worst_latency_us / 1000.0:.3f}"),
               ("X-PPipe-Batch-Size", str(outcome.worst_batch_size))]
    if json_length is None:
        headers.append(("content-type", "application/json"))
    else:
        headers.append((HEADER_LENGTH, str(json_length)))
        headers.append(("content-type", "application/octet-stream"))
    return payload, headers


def render_answer_lines(model: ServedModel, parsed: ParsedInfer, outcome: InferOutcome
                        ) -> tuple[bytes, bytes]:
    """:func:`render_answer` with the headers as the encoded lines an HTTP/1.1 response
    carries (names in lower case, as uvicorn writes them): what the HTTP protocol's infer
    path writes (:mod:`api.http_protocol`)."""
    payload, json_length = build_infer_response(model, parsed, outcome.outputs)
    lines = b"x-ppipe-latency-ms: %.3f\r\nx-ppipe-batch-size: %d\r\n" % (
        outcome.worst_latency_us / 1000.0, outcome.worst_batch_size)
    if json_length is None:
        return payload, lines + b"content-type: application/json\r\n"
    return payload, lines + (b"inference-header-content-length: %d\r\n"
                             b"content-type: application/octet-stream\r\n" % json_length)


def error_body(exc: BaseException) -> tuple[int, bytes, list[tuple[str, str]]]:
    """A domain error as (status, JSON body, extra headers): KServe v2's ``{"error": ...}``,
    with ``"reason"`` for a rejection and ``Retry-After`` on a 503 (as
    :func:`api.errors.error_response`)."""
    doc: dict[str, Any] = {"error": str(exc) or type(exc).__name__}
    if isinstance(exc, RequestRejectedError):
        doc["reason"] = exc.reason
    status = status_for(exc)
    extra = [("Retry-After", "1")] if status == 503 else []
    return status, _json(doc), extra


def _json(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _match(path: str) -> tuple[str, str | None, str] | None:
    """(model, version, route template) of an infer path, else ``None``."""
    if not (path.startswith(_PREFIX) and path.endswith(_SUFFIX)):
        return None
    parts = path[len(_PREFIX):-len(_SUFFIX)].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None, ROUTE
    if len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
        return parts[0], parts[2], VERSIONED_ROUTE
    return None


class InferFastPath:
    """Answers the infer routes at the ASGI level: the app (:class:`api.app.PPipeApp`) asks
    :meth:`match` of each request and gives those that match to :meth:`answer`.

    ``service``, ``max_body_bytes`` and ``metrics`` are the FastAPI app's own."""

    def __init__(self, service: InferenceService, max_body_bytes: int, metrics: AppMetrics):
        self.service = service
        self.limit = max_body_bytes
        self.metrics = metrics

    @staticmethod
    def match(scope) -> tuple[str, str | None, str] | None:
        """(model, version, route template) when ``scope`` is an infer request."""
        if scope["type"] != "http" or scope["method"] != "POST":
            return None
        return _match(scope["path"])

    async def answer(self, match: tuple[str, str | None, str], scope, receive, send) -> None:
        start = time.perf_counter()
        status = 500
        try:
            status = await self._infer(match[0], match[1], scope, receive, send)
        finally:
            self.metrics.count_http(match[2], status, time.perf_counter() - start)

    async def _infer(self, name: str, version: str | None, scope, receive, send) -> int:
        declared = header_length = None
        encoding = "identity"
        for key, value in scope["headers"]:
            if key == b"content-length":
                declared = value.decode("latin-1")
            elif key == b"inference-header-content-length":
                header_length = value.decode("latin-1")
            elif key == b"content-encoding":
                encoding = value.decode("latin-1").strip().lower()
        try:
            model = self.service.model(name, version)
            refuse_declared_oversize(declared, self.limit)
            body = inflate(await self._body(receive), encoding, self.limit)
            payload, headers = await infer_answer(self.service, model, body, header_length)
            status = 200
        except PPipeError as exc:
            status, payload, headers = error_body(exc)
            headers.append(("content-type", "application/json"))
        except Exception as exc:  # a bug: answer 500 with its name, log it, keep serving
            log.exception("infer %s failed", name)
            status, payload = 500, _json({"error": f"internal server error: "
                                                   f"{type(exc).__name__}: {exc}"})
            headers = [("content-type", "application/json")]
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        raw.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": payload})
        return status

    async def _body(self, receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise BadInputError(f"client disconnected after {size} bytes of the body")
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > self.limit:
                    raise BodyTooLargeError(f"request body is over the {self.limit}-byte "
                                            "limit")
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
