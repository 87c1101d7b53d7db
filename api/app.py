"""The FastAPI application: the runtime is built and started in the lifespan, not at import.

``create_app(runtime_factory)`` takes a callable that builds a (not yet started)
:class:`~ppipe_trt.serving.runtime.ServingRuntime`; the lifespan calls it in a worker
thread (loading engines can take seconds), starts it, and stops it on shutdown so that every
outstanding request is answered.  The REST routes and the gRPC front end (when
``ApiSettings.grpc_port`` is set) answer from one :class:`~api.service.InferenceService`
over that runtime.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Callable

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from api.errors import install_error_handlers
from api.metrics import AppMetrics
from api.service import DEFAULT_ANSWER_GRACE_S, SERVER_VERSION, InferenceService
from api.v2 import router
from ppipe_trt.serving.runtime import ServingRuntime


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """``max_body_bytes``: requests above are answered 413 (gRPC: RESOURCE_EXHAUSTED).
    ``answer_grace_s``: how long past a request's deadline the front end still waits for its
    answer before a 504.  ``grpc_port``: also serve gRPC on ``grpc_host:grpc_port`` over the
    same runtime (started and stopped with the app)."""

    max_body_bytes: int = 32 * 1024 * 1024
    answer_grace_s: float = DEFAULT_ANSWER_GRACE_S
    grpc_host: str = "127.0.0.1"
    grpc_port: int | None = None  # the KServe v2 / Triton gRPC service beside HTTP; None: off


class _HttpMetrics:
    """Pure ASGI middleware counting requests by route template and status."""

    def __init__(self, app, metrics: AppMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.http_requests.labels(path, str(status["code"])).inc()
            self.metrics.http_seconds.labels(path).observe(time.perf_counter() - start)


def create_app(runtime_factory: Callable[[], ServingRuntime],
               settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        grpc_front = None
        if settings.grpc_port is not None:
            from api.grpc_server import GrpcFrontEnd

            grpc_front = GrpcFrontEnd()  # answers UNAVAILABLE until the runtime runs
            app.state.grpc_port = await grpc_front.start(app.state.service,
                                                         settings.grpc_host,
                                                         settings.grpc_port, settings)
        try:
            runtime = await run_in_threadpool(runtime_factory)
            runtime.start()
            app.state.runtime = runtime
            try:
                yield
            finally:
                await run_in_threadpool(runtime.stop)
        finally:
            if grpc_front is not None:
                await grpc_front.stop()

    app = FastAPI(title="ppipe-trt", version=SERVER_VERSION, lifespan=lifespan,
                  description="Pipelined CNN serving (KServe v2 / Triton-compatible REST)")
    app.state.settings = settings
    app.state.runtime = None
    # What the REST routes and the gRPC front end answer from.
    app.state.service = InferenceService(lambda: app.state.runtime, settings.answer_grace_s)
    metrics = AppMetrics(lambda: app.state.runtime)
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(router)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    app.add_middleware(_HttpMetrics, metrics=metrics)
    return app
