"""Open Inference Protocol (KServe v2) REST routes, Triton's extensions, frames, status.

Routes (``{v}`` is always ``1``; the ``/versions/{v}`` forms are accepted for Triton clients):

* ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``
* ``GET /v2/models/{m}``, ``/v2/models/{m}/ready``, ``/v2/models/{m}/config`` (Triton),
  ``/v2/models/{m}/stats`` and ``/v2/models/stats`` (Triton statistics)
* ``POST /v2/models/{m}/infer`` (JSON or binary tensors), ``POST /v2/repository/index``
* ``POST /v2/models/{m}/frames`` (JPEG/PNG body or multipart), ``GET /v2/status``
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from api.binary import HEADER_LENGTH, v2_datatype
from api.codec import ParsedInfer, RequestedOutput, build_infer_response, parse_infer_request
from api.errors import (AnswerTimeoutError, BodyTooLargeError, UnsupportedMediaError)
from api.frames import classification, decode_frame, segmentation_mask
from ppipe_trt.errors import BadInputError, ModelNotFoundError
from ppipe_trt.serving.runtime import InferenceResult, ServedModel, ServingRuntime

SERVER_NAME = "ppipe-trt"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "classification", "model_repository", "statistics",
              "frames"]
#: Parse bodies above this size in a worker thread, not on the event loop.
_OFFLOAD_BYTES = 256 * 1024

router = APIRouter()


def _runtime(request: Request) -> ServingRuntime:
    return request.app.state.runtime


def _model(request: Request, name: str, version: str | None = None) -> ServedModel:
    model = _runtime(request).model(name)
    if version not in (None, "", "1"):
        raise ModelNotFoundError(f"model {name!r} has no version {version!r}; versions: ['1']")
    return model


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused once it passes ``limit`` bytes (after decompression)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLargeError(f"request body of {int(declared)} bytes is over the "
                                f"{limit}-byte limit")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLargeError(f"request body is over the {limit}-byte limit")
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadInputError(f"client disconnected after {size} bytes of the body") from None
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding in ("gzip", "deflate"):
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        try:
            body = inflater.decompress(body, limit + 1)
        except zlib.error as exc:
            raise BadInputError(f"body is not valid {encoding} data: {exc}") from None
        if len(body) > limit:
            raise BodyTooLargeError(f"decompressed request body is over the {limit}-byte limit")
    elif encoding != "identity":
        raise UnsupportedMediaError(f"Content-Encoding {encoding!r} is not supported; use "
                                    "gzip, deflate or none")
    return body


async def await_results(runtime: ServingRuntime, model: ServedModel, futures: list,
                        timeout_us: float | None, grace_s: float) -> list[InferenceResult]:
    """Wait for every sample's answer; the first error wins.  Never waits past the deadline
    plus ``grace_s`` (then 504)."""
    budget_s = (timeout_us if timeout_us is not None else model.slo_us) / 1e6 + grace_s
    waits = [asyncio.wrap_future(f) for f in futures]
    try:
        return list(await asyncio.wait_for(asyncio.gather(*waits), budget_s))
    except asyncio.TimeoutError:
        raise AnswerTimeoutError(f"no answer from model {model.name!r} within "
                                 f"{budget_s * 1000:.0f} ms (deadline + grace)") from None


def _tensor_meta(model: ServedModel) -> dict[str, list[dict[str, Any]]]:
    return {kind: [{"name": s.name, "datatype": v2_datatype(s.dtype), "shape": list(s.shape)}
                   for s in specs]
            for kind, specs in (("inputs", model.inputs), ("outputs", model.outputs))}


# ---- server --------------------------------------------------------------------------------
@router.get("/v2")
async def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}


@router.get("/v2/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready")
async def ready(request: Request) -> JSONResponse:
    ok = _runtime(request).ready
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.post("/v2/repository/index")
async def repository_index(request: Request) -> list[dict[str, str]]:
    rt = _runtime(request)
    state = "READY" if rt.ready else "UNAVAILABLE"
    return [{"name": m, "version": "1", "state": state} for m in sorted(rt.models)]


@router.get("/v2/status")
async def status(request: Request) -> dict[str, Any]:
    return _runtime(request).status()


@router.get("/v2/models/stats")
async def all_stats(request: Request) -> dict[str, Any]:
    rt = _runtime(request)
    return {"model_stats": [statistics_of(rt, m) for m in sorted(rt.models)]}


# ---- models --------------------------------------------------------------------------------
@router.get("/v2/models/{model_name}")
@router.get("/v2/models/{model_name}/versions/{version}")
async def model_metadata(request: Request, model_name: str, version: str | None = None):
    model = _model(request, model_name, version)
    return {"name": model.name, "versions": ["1"], "platform": SERVER_NAME,
            **_tensor_meta(model),
            "parameters": {"slo_ms": model.slo_us / 1000.0, "mode": model.mode,
                           "emulated": model.emulated, "timing_only": model.timing_only,
                           "frames": model.image is not None,
                           "postprocess": model.postprocess.kind}}


@router.get("/v2/models/{model_name}/ready")
@router.get("/v2/models/{model_name}/versions/{version}/ready")
async def model_ready(request: Request, model_name: str, version: str | None = None):
    _model(request, model_name, version)
    ok = _runtime(request).ready
    return JSONResponse({"name": model_name, "ready": ok}, status_code=200 if ok else 503)


@router.get("/v2/models/{model_name}/config")
@router.get("/v2/models/{model_name}/versions/{version}/config")
async def model_config(request: Request, model_name: str, version: str | None = None):
    model = _model(request, model_name, version)

    def dims(spec) -> list[int]:
        return [int(d) for d in spec.shape[1:]]

    return {
        "name": model.name, "platform": SERVER_NAME, "backend": SERVER_NAME,
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": model.max_batch,
        "input": [{"name": s.name, "data_type": "TYPE_" + v2_datatype(s.dtype),
                   "format": "FORMAT_NONE", "dims": dims(s)} for s in model.inputs],
        "output": [{"name": s.name, "data_type": "TYPE_" + v2_datatype(s.dtype),
                    "dims": dims(s)} for s in model.outputs],
        "dynamic_batching": {"max_queue_delay_microseconds": 0},
        "parameters": {"slo_ms": {"string_value": f"{model.slo_us / 1000.0:g}"},
                       "emulated": {"string_value": str(model.emulated).lower()},
                       "timing_only": {"string_value": str(model.timing_only).lower()},
                       "mode": {"string_value": model.mode}},
    }


def statistics_of(rt: ServingRuntime, name: str) -> dict[str, Any]:
    """Triton's statistics document of model ``name`` (REST and gRPC)."""
    c = rt.stats.snapshot()[name]
    ns = int(c.latency_s.total * 1e9)
    return {
        "name": name, "version": "1", "last_inference": 0,
        "inference_count": c.completions, "execution_count": sum(c.batch_sizes.values()),
        "inference_stats": {
            "success": {"count": c.completions, "ns": ns},
            "fail": {"count": c.failures + sum(c.drops.values()), "ns": 0},
            "queue": {"count": c.completions, "ns": 0},
            "compute_input": {"count": c.completions, "ns": 0},
            "compute_infer": {"count": c.completions, "ns": ns},
            "compute_output": {"count": c.completions, "ns": 0},
            "cache_hit": {"count": 0, "ns": 0}, "cache_miss": {"count": 0, "ns": 0},
        },
        "batch_stats": [
            {"batch_size": size, "compute_input": {"count": n, "ns": 0},
             "compute_infer": {"count": n, "ns": 0}, "compute_output": {"count": n, "ns": 0}}
            for size, n in sorted(c.batch_sizes.items())],
    }


@router.get("/v2/models/{model_name}/stats")
@router.get("/v2/models/{model_name}/versions/{version}/stats")
async def model_stats(request: Request, model_name: str, version: str | None = None):
    _model(request, model_name, version)
    return {"model_stats": [statistics_of(_runtime(request), model_name)]}


@router.post("/v2/models/{model_name}/infer")
@router.post("/v2/models/{model_name}/versions/{version}/infer")
async def infer(request: Request, model_name: str, version: str | None = None) -> Response:
    settings = request.app.state.settings
    rt = _runtime(request)
    model = _model(request, model_name, version)
    body = await read_body(request, settings.max_body_bytes)
    header_length = request.headers.get(HEADER_LENGTH)
    if len(body) > _OFFLOAD_BYTES:
        parsed = await run_in_threadpool(parse_infer_request, body, header_length, model)
    else:
        parsed = parse_infer_request(body, header_length, model)
    results = await _run(rt, model, parsed, settings.answer_grace_s)
    outputs = {o.name: np.concatenate([r.outputs[o.name] for r in results])
               if len(results) > 1 else results[0].outputs[o.name] for o in model.outputs}
    payload, json_length = build_infer_response(model, parsed, outputs)
    headers = _timing_headers(results)
    if json_length is None:
        return Response(payload, media_type="application/json", headers=headers)
    headers[HEADER_LENGTH] = str(json_length)
    return Response(payload, media_type="application/octet-stream", headers=headers)


async def _run(rt: ServingRuntime, model: ServedModel, parsed: ParsedInfer,
               grace_s: float) -> list[InferenceResult]:
    futures = [rt.submit(model.name, {k: v[i:i + 1] for k, v in parsed.inputs.items()},
                         parsed.timeout_us) for i in range(parsed.batch_size)]
    return await await_results(rt, model, futures, parsed.timeout_us, grace_s)


def _timing_headers(results: list[InferenceResult]) -> dict[str, str]:
    worst = max(results, key=lambda r: r.latency_us)
    return {"X-PPipe-Latency-Ms": f"{worst.latency_us / 1000.0:.3f}",
            "X-PPipe-Batch-Size": str(worst.batch_size)}


# ---- frames --------------------------------------------------------------------------------
@router.post("/v2/models/{model_name}/frames")
async def frames(request: Request, model_name: str, top: int | None = None,
                 timeout_ms: float | None = None, mask: str | None = None,
                 raw: bool | None = None) -> Response:
    """One frame in; the outputs and the model's postprocessing out (``top_k`` for a
    classifier, ``mask`` for a segmenter).  ``raw``: include the raw output tensors (default:
    yes, except for segmenters); ``mask``: "png" or "array" (default: the config's)."""
    settings = request.app.state.settings
    rt = _runtime(request)
    model = _model(request, model_name)
    if model.image is None:
        raise BadInputError(
            f"model {model_name!r} has no frames preprocessing; declare its image input with "
            "format: FORMAT_NCHW (or FORMAT_NHWC) or add preprocessing parameters (mean, std, "
            f"resize) to its config, or send tensors to /v2/models/{model_name}/infer")
    if timeout_ms is not None and not timeout_ms > 0:
        raise BadInputError(f"timeout_ms must be > 0, got {timeout_ms}")
    if top is not None and not 1 <= top <= 1000:
        raise BadInputError(f"top must be in 1..1000, got {top}")
    if mask not in (None, "png", "array"):
        raise BadInputError(f"mask must be 'png' or 'array', got {mask!r}")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        data = await _multipart_image(request, settings.max_body_bytes)
    elif content_type in ("image/jpeg", "image/jpg", "image/png", "application/octet-stream", ""):
        data = await read_body(request, settings.max_body_bytes)
    else:
        raise UnsupportedMediaError(f"content type {content_type!r} is not accepted; send "
                                    "image/jpeg, image/png or multipart/form-data")
    tensor = await run_in_threadpool(decode_frame, data, model.image)
    parsed = ParsedInfer(None, 1, {model.image.input_name: tensor},
                         [RequestedOutput(o.name, False) for o in model.outputs],
                         timeout_us=timeout_ms * 1000.0 if timeout_ms else None)
    (result,) = await _run(rt, model, parsed, settings.answer_grace_s)
    post = model.postprocess
    doc: dict[str, Any] = {"model_name": model.name,
                           "latency_ms": round(result.latency_us / 1000.0, 3),
                           "batch_size": result.batch_size}
    if raw if raw is not None else post.kind != "segmentation":
        doc["outputs"] = {name: {"shape": list(a.shape), "datatype": v2_datatype(a.dtype),
                                 "data": a.ravel().tolist()}
                          for name, a in result.outputs.items()}
    if post.kind == "classification":
        doc["top_k"] = classification(result.outputs[post.output or model.outputs[0].name],
                                      post, top or post.top_k)
    elif post.kind == "segmentation":
        doc["mask"] = await run_in_threadpool(
            segmentation_mask, result.outputs[post.output or model.outputs[0].name], post, mask)
    return JSONResponse(doc, headers=_timing_headers([result]))


async def _multipart_image(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLargeError(f"request body of {int(declared)} bytes is over the "
                                f"{limit}-byte limit")
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
