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

import dataclasses
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from api.binary import HEADER_LENGTH
from api.errors import BodyTooLargeError, UnsupportedMediaError
from api.fast import inflate, infer_answer, refuse_declared_oversize
from api.frames import frame_answer
from api.service import InferenceService, InferOutcome
from ppipe_trt.errors import BadInputError

router = APIRouter()


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


# ---- server --------------------------------------------------------------------------------
@router.get("/v2")
async def server_metadata(request: Request) -> dict[str, Any]:
    meta = _service(request).server_metadata()
    return {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)}


@router.get("/v2/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready")
async def ready(request: Request) -> JSONResponse:
    ok = _service(request).ready
    return _ready_response({"ready": ok}, ok)


@router.post("/v2/repository/index")
async def repository_index(request: Request) -> list[dict[str, str]]:
    return [dataclasses.asdict(e) for e in _service(request).repository_index()]


@router.get("/v2/status")
async def status(request: Request) -> dict[str, Any]:
    return _service(request).status()


@router.get("/v2/models/stats")
async def all_stats(request: Request) -> dict[str, Any]:
    return {"model_stats": _service(request).statistics()}


# ---- models --------------------------------------------------------------------------------
@router.get("/v2/models/{model_name}")
@router.get("/v2/models/{model_name}/versions/{version}")
async def model_metadata(request: Request, model_name: str, version: str | None = None):
    meta = _service(request).model_metadata(model_name, version)
    return {"name": meta.name, "versions": list(meta.versions), "platform": meta.platform,
            **{kind: [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                      for t in tensors]
               for kind, tensors in (("inputs", meta.inputs), ("outputs", meta.outputs))},
            "parameters": meta.parameters}


@router.get("/v2/models/{model_name}/ready")
@router.get("/v2/models/{model_name}/versions/{version}/ready")
async def model_ready(request: Request, model_name: str, version: str | None = None):
    ok = _service(request).model_ready(model_name, version)
    return _ready_response({"name": model_name, "ready": ok}, ok)


@router.get("/v2/models/{model_name}/config")
@router.get("/v2/models/{model_name}/versions/{version}/config")
async def model_config(request: Request, model_name: str, version: str | None = None):
    return _service(request).model_config(model_name, version)


@router.get("/v2/models/{model_name}/stats")
@router.get("/v2/models/{model_name}/versions/{version}/stats")
async def model_stats(request: Request, model_name: str, version: str | None = None):
    return {"model_stats": _service(request).statistics(model_name, version)}


@router.post("/v2/models/{model_name}/infer")
@router.post("/v2/models/{model_name}/versions/{version}/infer")
async def infer(request: Request, model_name: str, version: str | None = None) -> Response:
    """Answered by :class:`api.fast.InferFastPath` unless ``ApiSettings.fast_infer`` is off;
    the same functions either way."""
    service = _service(request)
    model = service.model(model_name, version)
    body = await read_body(request, request.app.state.settings.max_body_bytes)
    payload, headers = await infer_answer(service, model, body,
                                          request.headers.get(HEADER_LENGTH))
    return Response(payload, headers=dict(headers))


# ---- frames --------------------------------------------------------------------------------
@router.post("/v2/models/{model_name}/frames")
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
