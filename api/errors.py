"""Domain errors -> HTTP status codes, in one place (the gRPC codes derive from these).

Bodies follow the KServe v2 error shape ``{"error": "<message>"}``; rejections add
``"reason"`` (the scheduler's drop reason, e.g. ``deadline_unreachable``).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.service import AnswerTimeoutError
from ppipe_trt.errors import (BadInputError, InfeasiblePlanError, ModelNotFoundError,
                              PlanSwapError, PPipeError, RequestRejectedError)

__all__ = ["AnswerTimeoutError", "BodyTooLargeError", "UnsupportedMediaError", "status_for",
           "error_response", "install_error_handlers", "ErrorBody", "error_responses"]


class BodyTooLargeError(BadInputError):
    """The request body is over the configured limit."""


class UnsupportedMediaError(BadInputError):
    """The body's content type (or encoding) is not one the endpoint takes."""


#: Drop reasons answered 503 (retry later) vs 504 (the deadline itself was the problem).
_REJECT_STATUS = {"deadline_unreachable": 503, "no_workers": 503, "worker_failed": 503,
                  "queue_full": 503, "shutdown": 503}


class ErrorBody(BaseModel):
    """What every error answer holds (KServe v2): ``error``, the message; ``reason``, a
    rejection's drop reason (503/504 from the scheduler only)."""

    error: str
    reason: str | None = None


#: When each status is answered, as the OpenAPI document says it.
_WHEN = {
    400: "Bad request: malformed body, parameters or tensors (the message names what)",
    401: "Missing or invalid bearer token (only when the server runs with an auth token)",
    404: "No such model or version",
    413: "Request body over the server's limit (after decompression)",
    409: "The plan cannot be swapped in now (other models or SLOs, a policy that cannot "
         "hand its queue over, another swap in between); the plan in force stays",
    415: "Unsupported content type or content encoding",
    422: "No plan fits the cluster for these weights (the planner's message says why)",
    503: "Not served now (server not ready, or the scheduler dropped the request: see "
         "`reason`); retry after `Retry-After` seconds",
    504: "No answer within the request's deadline",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a route that can answer ``statuses`` with :class:`ErrorBody`
    (for FastAPI's ``responses=``)."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        doc: dict[str, Any] = {"model": ErrorBody, "description": _WHEN[status]}
        if status == 503:
            doc["headers"] = {"Retry-After": {"description": "seconds to wait",
                                              "schema": {"type": "integer"}}}
        if status == 401:
            doc["headers"] = {"WWW-Authenticate": {"description": "`Bearer`",
                                                   "schema": {"type": "string"}}}
        out[status] = doc
    return out


def status_for(exc: BaseException) -> int:
    """The HTTP status of a domain error (most specific class first)."""
    if isinstance(exc, ModelNotFoundError):
        return 404
    if isinstance(exc, BodyTooLargeError):
        return 413
    if isinstance(exc, UnsupportedMediaError):
        return 415
    if isinstance(exc, BadInputError):
        return 400
    if isinstance(exc, RequestRejectedError):
        return _REJECT_STATUS.get(exc.reason, 503)
    if isinstance(exc, AnswerTimeoutError):
        return 504
    if isinstance(exc, PlanSwapError):
        return 409
    if isinstance(exc, InfeasiblePlanError):
        return 422
    return 500


def error_response(exc: BaseException) -> JSONResponse:
    body = {"error": str(exc) or type(exc).__name__}
    if isinstance(exc, RequestRejectedError):
        body["reason"] = exc.reason
    headers = {"Retry-After": "1"} if status_for(exc) == 503 else None
    return JSONResponse(body, status_code=status_for(exc), headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PPipeError)
    async def _domain(_request: Request, exc: PPipeError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = ["{}: {}".format(".".join(str(p) for p in e.get("loc", ())), e.get("msg"))
                 for e in exc.errors()]
        return JSONResponse({"error": "invalid request: " + "; ".join(parts)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Keeps Starlette's headers: a 405 carries ``Allow`` (RFC 9110 section 15.5.6).
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code,
                            headers=exc.headers)
