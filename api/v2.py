"""Open Inference Protocol (KServe v2) REST routes, Triton's extensions, frames, status.

Routes (``{v}`` is always ``1``; the ``/versions/{v}`` forms are accepted for Triton clients):

* ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``
* ``GET /v2/models/{m}``, ``/v2/models/{m}/ready``, ``/v2/models/{m}/config`` (Triton),
  ``/v2/models/{m}/stats`` and ``/v2/models/stats`` (Triton statistics)
* ``POST /v2/models/{m}/infer`` (JSON or binary tensors), ``POST /v2/repository/index``
* ``POST /v2/models/{m}/frames`` (JPEG/PNG body or multipart), ``GET /v2/status``

A thin adapter: each route parses its request (body, headers, query), calls the
:class:`~api.service.InferenceService` of the app, and renders the answer as JSON (or
binary tensors).  Errors become status codes in :mod:`api.errors`, nowhere here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from api.binary import HEADER_LENGTH
from api.errors import BodyTooLargeError, UnsupportedMediaError, error_responses
from api.fast import inflate, infer_answer, refuse_declared_oversize
from api.frames import frame_answer
from api.service import InferenceService, InferOutcome
from ppipe_trt.errors import BadInputError

#: The routes that need the bearer token when the server has one (api/auth.py); the
#: health probes are in ``open_router``.
router = APIRouter()
open_router = APIRouter()


def _service(request: Request) -> InferenceService:
    return request.app.state.service


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused once it passes ``limit`` bytes (after decompression)."""
    refuse_declared_oversize(request.headers.get("content-length"), limit)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLargeError(f"request body is over the {limit}-byte limit")
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadInputError(f"client disconnected after {size} bytes of the body") from None
    return inflate(b"".join(chunks), request.headers.get("content-encoding",
                                                          "identity").strip().lower(), limit)


def _ready_response(doc: dict[str, Any], ready: bool) -> JSONResponse:
    return JSONResponse(doc, status_code=200 if ready else 503)


def _timing_headers(outcome: InferOutcome) -> dict[str, str]:
    return {"X-PPipe-Latency-Ms": f"{outcome.worst_latency_us / 1000.0:.3f}",
            "X-PPipe-Batch-Size": str(outcome.worst_batch_size)}


# ---- OpenAPI declarations --------------------------------------------------------------------
class ReadyBody(BaseModel):
    ready: bool


class ModelReadyBody(BaseModel):
    name: str
    ready: bool


_NOT_READY = {503: {"description": "Not ready (or the server is not ready)",
                    "content": {"application/json": {"schema": {"anyOf": [
                        {"$ref": "#/components/schemas/ModelReadyBody"},
                        {"$ref": "#/components/schemas/ErrorBody"}]}}}}}
_TIMING_HEADERS = {
    "X-PPipe-Latency-Ms": {"description": "the slowest sample's latency (ms)",
                           "schema": {"type": "string"}},
    "X-PPipe-Batch-Size": {"description": "the batch the slowest sample ran in",
                           "schema": {"type": "string"}},
}
_TENSOR = {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
    "name": {"type": "string"},
    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
    "datatype": {"type": "string"},
    "parameters": {"type": "object"},
    "data": {"type": "array"}}}
_INFER_REQUEST = {"type": "object", "required": ["inputs"], "properties": {
    "id": {"type": "string"},
    "parameters": {"type": "object"},
    "inputs": {"type": "array", "minItems": 1, "items": _TENSOR},
    "outputs": {"type": "array", "items": {"type": "object", "required": ["name"],
                                           "properties": {"name": {"type": "string"},
                                                          "parameters": {"type": "object"}}}}}}
_INFER_RESPONSE = {"type": "object", "required": ["model_name", "outputs"], "properties": {
    "model_name": {"type": "string"}, "model_version": {"type": "string"},
    "id": {"type": "string"}, "parameters": {"type": "object"},
    "outputs": {"type": "array", "items": _TENSOR}}}
_BINARY = {"type": "string", "format": "binary"}
#: Binary tensors (Triton's extension): a JSON header of this many bytes, then the tensors.
_HEADER_LENGTH_PARAM = {
    "name": HEADER_LENGTH, "in": "header", "required": False,
    "description": "binary tensor extension: the body is a JSON header of this many bytes "
                   "followed by the tensors' bytes",
    "schema": {"type": "integer", "minimum": 0}}
_ENCODING_PARAM = {"name": "Content-Encoding", "in": "header", "required": False,
                   "schema": {"type": "string", "enum": ["gzip", "deflate", "identity"]}}
_INFER_OPENAPI = {
    "parameters": [_HEADER_LENGTH_PARAM, _ENCODING_PARAM],
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": _INFER_REQUEST},
        "application/octet-stream": {"schema": _BINARY}}},
}
_INFER_RESPONSES = {
    200: {"description": "The outputs: JSON, or with binary outputs a JSON header of "
                         f"{HEADER_LENGTH} bytes followed by the tensors' bytes",
          "content": {"application/json": {"schema": _INFER_RESPONSE},
                      "application/octet-stream": {"schema": _BINARY}},
          "headers": {HEADER_LENGTH: {"description": "binary outputs only: the JSON "
                                                     "header's length in bytes",
                                      "schema": {"type": "integer"}},
                      **_TIMING_HEADERS}},
    **error_responses(400, 404, 413, 415, 503, 504)}
_FRAMES_OPENAPI = {
    "parameters": [_ENCODING_PARAM],
    "requestBody": {"required": True, "content": {
        "image/jpeg": {"schema": _BINARY},
        "image/png": {"schema": _BINARY},
        "application/octet-stream": {"schema": _BINARY},
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"],
                                           "properties": {"image": _BINARY}}}}},
}
_FRAMES_RESPONSES = {
    200: {"description": "The outputs and the model's postprocessing (top_k, mask)",
          "content": {"application/json": {"schema": {
              "type": "object", "required": ["model_name", "latency_ms", "batch_size"],
              "properties": {"model_name": {"type": "string"},
                             "latency_ms": {"type": "number"},
                             "batch_size": {"type": "integer"},
                             "outputs": {"type": "object"},
                             "top_k": {"type": "array"}, "mask": {"type": "object"}}}}},
          "headers": _TIMING_HEADERS},
    **error_responses(400, 404, 413, 415, 503, 504)}


def model_routes(suffix: str, method: str = "GET", **route_kwargs):
    """Register ``endpoint(request, model_name, version)`` at ``/v2/models/{model_name}
    <suffix>`` (``version`` ``None``) and at ``.../versions/{version}<suffix>`` (Triton's
    form): two operations, so that neither documents the other's parameters."""

    def register(endpoint):
        async def latest(request: Request, model_name: str):
            return await endpoint(request, model_name, None)

        async def versioned(request: Request, model_name: str, version: str):
            return await endpoint(request, model_name, version)

        for fn, path, name in (
                (latest, f"/v2/models/{{model_name}}{suffix}", endpoint.__name__),
                (versioned, f"/v2/models/{{model_name}}/versions/{{version}}{suffix}",
                 f"{endpoint.__name__}_version")):
            fn.__name__, fn.__doc__ = name, endpoint.__doc__
            router.add_api_route(path, fn, methods=[method], name=name, **route_kwargs)
        return endpoint

    return register


# ---- server --------------------------------------------------------------------------------
@router.get("/v2")
async def server_metadata(request: Request) -> dict[str, Any]:
    meta = _service(request).server_metadata()
    return {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)}


@open_router.get("/v2/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@open_router.get("/v2/health/ready", response_model=ReadyBody,
                 responses={503: {"model": ReadyBody, "description": "Not ready"}})
async def ready(request: Request) -> JSONResponse:
    ok = _service(request).ready
    return _ready_response({"ready": ok}, ok)


@router.post("/v2/repository/index", responses=error_responses(503))
async def repository_index(request: Request) -> list[dict[str, str]]:
    return [dataclasses.asdict(e) for e in _service(request).repository_index()]


@router.get("/v2/status", responses=error_responses(503))
async def status(request: Request) -> dict[str, Any]:
    doc = _service(request).status()
    # this process, for leak checks (a soak compares them at idle before and after)
    names: dict[str, int] = {}
    for t in threading.enumerate():   # by name, numbers dropped: "AnyIO worker thread": 3
        key = t.name.rstrip("0123456789 -_").split(" (")[0] or "thread"
        names[key] = names.get(key, 0) + 1
    doc["process"] = {"threads": threading.active_count(), "threads_by_name": names,
                      "asyncio_tasks": len(asyncio.all_tasks())}
    return doc


class PlanSwapAnswer(BaseModel):
    """What ``POST /v2/plan`` answers: the swap's report (``switch_us``: the switch instant
    on the server's monotonic clock, microseconds; ``prepare_s``: building the new plan's
    schedulers and starting its added workers; ``switch_ms``: from the push to the switch)."""

    generation: int
    reason: str
    switch_us: float
    prepare_s: float
    switch_ms: float
    requests_moved: int
    batches_in_flight_at_switch: int
    workers_kept: list[int]
    workers_added: list[int]
    workers_retired: list[int]


@router.post("/v2/plan", response_model=PlanSwapAnswer,
             responses=error_responses(400, 409, 413, 415, 422, 503),
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"type": "object", "description":
                            "a plan document (as `ppipe plan` writes it), "
                            "{\"plan\": {...}, \"reason\": \"...\"}, or "
                            "{\"weights\": {\"model\": weight}, \"reason\": \"...\"} "
                            "to re-plan the cluster for those weights"}}}}})
async def push_plan(request: Request) -> dict[str, Any]:
    """Swap the plan while serving (admin): no request is lost; see docs/serving.md."""
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if kind != "application/json":
        raise UnsupportedMediaError(f"a plan push is application/json, got {kind!r}")
    body = await read_body(request, request.app.state.settings.max_body_bytes)
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise BadInputError(f"the plan push is not valid JSON: {exc}") from None
    return await _service(request).push_plan(doc)


@router.get("/v2/models/stats", responses=error_responses(503))
async def all_stats(request: Request) -> dict[str, Any]:
    return {"model_stats": _service(request).statistics()}


# ---- models --------------------------------------------------------------------------------
@model_routes("", responses=error_responses(404, 503))
async def model_metadata(request: Request, model_name: str, version: str | None):
    meta = _service(request).model_metadata(model_name, version)
    return {"name": meta.name, "versions": list(meta.versions), "platform": meta.platform,
            **{kind: [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                      for t in tensors]
               for kind, tensors in (("inputs", meta.inputs), ("outputs", meta.outputs))},
            "parameters": meta.parameters}


@model_routes("/ready", response_model=ModelReadyBody,
              responses={**error_responses(404), **_NOT_READY})
async def model_ready(request: Request, model_name: str, version: str | None):
    ok = _service(request).model_ready(model_name, version)
    return _ready_response({"name": model_name, "ready": ok}, ok)


@model_routes("/config", responses=error_responses(404, 503))
async def model_config(request: Request, model_name: str, version: str | None):
    return _service(request).model_config(model_name, version)


@model_routes("/stats", responses=error_responses(404, 503))
async def model_stats(request: Request, model_name: str, version: str | None):
    return {"model_stats": _service(request).statistics(model_name, version)}


@model_routes("/infer", method="POST", response_class=Response, responses=_INFER_RESPONSES,
              openapi_extra=_INFER_OPENAPI)
async def infer(request: Request, model_name: str, version: str | None) -> Response:
    """Answered by :class:`api.fast.InferFastPath` unless ``ApiSettings.fast_infer`` is off;
    the same functions either way."""
    service = _service(request)
    model = service.model(model_name, version)
    body = await read_body(request, request.app.state.settings.max_body_bytes)
    payload, headers = await infer_answer(service, model, body,
                                          request.headers.get(HEADER_LENGTH))
    return Response(payload, headers=dict(headers))


# ---- frames --------------------------------------------------------------------------------
@router.post("/v2/models/{model_name}/frames", response_class=Response,
             responses=_FRAMES_RESPONSES, openapi_extra=_FRAMES_OPENAPI)
async def frames(request: Request, model_name: str, top: int | None = None,
                 timeout_ms: float | None = None, mask: str | None = None,
                 raw: bool | None = None) -> Response:
    """One frame in; the outputs and the model's postprocessing out (``top_k`` for a
    classifier, ``mask`` for a segmenter).  ``raw``: include the raw output tensors (default:
    yes, except for segmenters); ``mask``: "png" or "array" (default: the config's)."""
    service = _service(request)
    limit = request.app.state.settings.max_body_bytes
    model = service.frames_model(model_name)
    if timeout_ms is not None and not timeout_ms > 0:
        raise BadInputError(f"timeout_ms must be > 0, got {timeout_ms}")
    if top is not None and not 1 <= top <= 1000:
        raise BadInputError(f"top must be in 1..1000, got {top}")
    if mask not in (None, "png", "array"):
        raise BadInputError(f"mask must be 'png' or 'array', got {mask!r}")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            inflate(b"", encoding, limit)   # an unknown coding: the same 415 as elsewhere
            raise UnsupportedMediaError(f"a multipart body cannot be sent with Content-"
                                        f"Encoding {encoding!r}; send the image as the body "
                                        "(image/jpeg or image/png) to compress it")
        data = await _multipart_image(request, limit)
    elif content_type in ("image/jpeg", "image/jpg", "image/png", "application/octet-stream", ""):
        data = await read_body(request, limit)
    else:
        raise UnsupportedMediaError(f"content type {content_type!r} is not accepted; send "
                                    "image/jpeg, image/png or multipart/form-data")
    outcome = await service.infer_frame(model, data,
                                        timeout_ms * 1000.0 if timeout_ms else None)
    args = (outcome.results[0].outputs, model.postprocess, model.outputs[0].name, top, mask,
            raw)
    if model.postprocess.kind == "segmentation":  # encodes a PNG: off the event loop
        post = await run_in_threadpool(frame_answer, *args)
    else:
        post = frame_answer(*args)
    doc = {"model_name": model.name, "latency_ms": outcome.worst_latency_ms,
           "batch_size": outcome.worst_batch_size, **post}
    return JSONResponse(doc, headers=_timing_headers(outcome))


async def _multipart_image(request: Request, limit: int) -> bytes:
    refuse_declared_oversize(request.headers.get("content-length"), limit)
    try:
        form = await request.form(max_files=1, max_fields=8, max_part_size=limit)
    except Exception as exc:  # starlette raises its own MultiPartException / HTTPException
        raise BadInputError(f"malformed multipart body: {exc}") from None
    for value in form.values():
        if hasattr(value, "read"):
            data = await value.read()
            await form.close()
            if len(data) > limit:
                raise BodyTooLargeError(f"image part is over the {limit}-byte limit")
            return data
    await form.close()
    raise BadInputError("multipart body has no file part; send the image as a file field")
