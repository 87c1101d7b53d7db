"""The FastAPI application: the runtime is built and started in the lifespan, not at import.

``create_app(runtime_factory)`` takes a callable that builds a (not yet started)
:class:`~ppipe_trt.serving.runtime.ServingRuntime`; the lifespan calls it in a worker
thread (loading engines can take seconds), starts it, and stops it on shutdown so that every
outstanding request is answered.  The REST routes and the gRPC front end (when
``ApiSettings.grpc_port`` is set) answer from one :class:`~api.service.InferenceService`
over that runtime.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Callable

from fastapi import Depends, FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from fastapi.security import HTTPBearer

from api.auth import BearerAuth
from api.errors import error_responses, install_error_handlers
from api.fast import InferFastPath
from api.metrics import AppMetrics
from api.service import DEFAULT_ANSWER_GRACE_S, SERVER_VERSION, InferenceService
from api.v2 import open_router, router
from ppipe_trt.serving.runtime import ServingRuntime


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """``max_body_bytes``: requests above are answered 413 (gRPC: RESOURCE_EXHAUSTED).
    ``answer_grace_s``: how long past a request's deadline the front end still waits for its
    answer before a 504.  ``grpc_port``: also serve gRPC on ``grpc_host:grpc_port`` over the
    same runtime (started and stopped with the app).  ``runtime_on_event_loop``: run the
    runtime's decision loop on the app's event loop rather than on a thread of its own;
    ``None`` (default): when every worker is thread-less (timing-only emulation), whose
    timers then cost no thread hop.  Workers with threads of their own (real engines) keep the
    loop on its thread: its wake-ups are exact to the microsecond, an event loop's to the
    millisecond, and a long parse on the event loop would delay them.  A runtime that needs its
    own thread (the Ray runtime) keeps it either way.
    ``fast_infer``: answer the infer routes with :class:`api.fast.InferFastPath` in front of
    FastAPI (default; same answers, a fraction of the CPU).  ``link_socket``: also answer
    front-end processes (:mod:`api.remote`) on this Unix socket; ``reuse_port``: let them
    share the gRPC port.
    ``adapt``: an :class:`~ppipe_trt.adapt.AdaptOptions` to run the adaptive re-planning loop
    (:class:`~ppipe_trt.serving.adaptive.AdaptiveController`) beside the runtime; ``None``:
    the plan changes only when pushed (``POST /v2/plan``).
    ``auth_token``: require ``Authorization: Bearer <auth_token>`` on every route but the
    health probes, REST and gRPC alike (:mod:`api.auth`); ``None``: no access control."""

    max_body_bytes: int = 32 * 1024 * 1024
    answer_grace_s: float = DEFAULT_ANSWER_GRACE_S
    grpc_host: str = "127.0.0.1"
    grpc_port: int | None = None  # the KServe v2 / Triton gRPC service beside HTTP; None: off
    runtime_on_event_loop: bool | None = None  # None: when every worker is thread-less
    fast_infer: bool = True  # False: FastAPI's routes answer infer requests too (api/fast.py)
    link_socket: str | None = None  # serve front-end processes on this Unix socket
    reuse_port: bool = False  # share the gRPC port with front-end processes (SO_REUSEPORT)
    auth_token: str | None = None  # bearer token required on all but the health probes
    adapt: Any = None  # AdaptOptions: run the adaptive re-planning loop (serve --adapt)


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
            self.metrics.count_http(getattr(route, "path", "unmatched"), status["code"],
                                    time.perf_counter() - start)


class PPipeApp(FastAPI):
    """The FastAPI app with the infer fast path in front (:mod:`api.fast`): an infer request
    is answered by :attr:`fast_infer` when set, every other request by FastAPI.  With
    :attr:`auth` set, a request without the bearer token is answered 401 before either
    (:mod:`api.auth`)."""

    fast_infer: InferFastPath | None = None
    auth: BearerAuth | None = None

    async def __call__(self, scope, receive, send) -> None:
        auth = self.auth
        if auth is not None and scope["type"] == "http" and not auth.allows_scope(scope):
            self.state.metrics.count_http("unauthenticated", 401, 0.0)
            return await auth.refuse(send)
        fast = self.fast_infer
        if fast is not None:
            match = fast.match(scope)
            if match is not None:
                return await fast.answer(match, scope, receive, send)
        if scope["type"] == "http" and scope["method"] == "GET" \
                and scope["path"] in ("/metrics", "/v2/status") \
                and hasattr(self.state.runtime, "fetch_metrics"):
            return await self._from_runtime_process(scope["path"], send)
        await super().__call__(scope, receive, send)

    async def _from_runtime_process(self, path: str, send) -> None:
        """A front-end process (:mod:`api.remote`) answers ``/metrics`` and ``/v2/status``
        with the runtime process's own, fetched now."""
        rt = self.state.runtime
        if path == "/metrics":
            body, kind = await rt.fetch_metrics(), b"text/plain; version=0.0.4"
        else:
            body, kind = json.dumps(await rt.fetch_status()).encode(), b"application/json"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", kind),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def openapi(self) -> dict:
        """FastAPI's document, less the 422 it adds to every route with parameters: request
        validation is answered 400 here (KServe v2; :func:`api.errors.install_error_handlers`),
        and each route declares its 400 itself where it can occur."""
        if self.openapi_schema is None:
            doc = super().openapi()
            for item in doc.get("paths", {}).values():
                for operation in item.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = doc.get("components", {}).get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
        return self.openapi_schema


def _state_reader(state, name: str):
    """``lambda: getattr(state, name)`` for the hot path: where starlette's ``State`` keeps its
    attributes in a dict (``_state``, as every starlette release has), a C-level read of it
    (the infer routes read the runtime twice per request)."""
    store = getattr(state, "_state", None)
    if type(store) is dict:
        return functools.partial(store.get, name)
    return lambda: getattr(state, name, None)


def create_app(runtime_factory: Callable[[], ServingRuntime],
               settings: ApiSettings | None = None) -> FastAPI:
    """The app (``settings.fast_infer``: with the infer fast path in front, see
    :class:`PPipeApp`)."""
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
            # A runtime of thread-less workers (timing-only emulation) runs its loop on this
            # event loop (see ppipe_trt.serving.loop): a request goes from the front end to
            # its answer without changing threads.
            on_loop = settings.runtime_on_event_loop
            if on_loop is None:
                on_loop = runtime.threadless
            runtime.start(asyncio.get_running_loop() if on_loop else None)
            if isinstance(runtime, ServingRuntime):  # (a front-end process's is remote)
                runtime.watch_front_end(asyncio.get_running_loop())
            app.state.runtime = runtime
            link = None
            if settings.link_socket:
                from api.remote import RuntimeLinkServer

                link = RuntimeLinkServer(lambda: app.state.runtime, metrics.render,
                                         settings.link_socket)
                await link.start()
            adaptive = None
            if settings.adapt is not None and isinstance(runtime, ServingRuntime):
                # (a front-end process's runtime is the runtime process's: it adapts there)
                from ppipe_trt.serving.adaptive import AdaptiveController

                adaptive = AdaptiveController(runtime, settings.adapt).start()
                runtime.adaptive = adaptive
            try:
                yield
            finally:
                if adaptive is not None:
                    await run_in_threadpool(adaptive.stop)
                if link is not None:
                    await link.stop()
                await run_in_threadpool(runtime.stop)
        finally:
            if grpc_front is not None:
                await grpc_front.stop()

    app = PPipeApp(title="ppipe-trt", version=SERVER_VERSION, lifespan=lifespan,
                  description="Pipelined CNN serving (KServe v2 / Triton-compatible REST)")
    app.state.settings = settings
    app.state.runtime = None
    # What the REST routes and the gRPC front end answer from.
    app.state.service = InferenceService(_state_reader(app.state, "runtime"),
                                         settings.answer_grace_s)
    metrics = AppMetrics(lambda: app.state.runtime)
    app.state.metrics = metrics
    install_error_handlers(app)
    guarded: dict = {}
    if settings.auth_token is not None:
        app.auth = BearerAuth(settings.auth_token)
        # The check itself is PPipeApp.__call__'s (it covers the fast path and unknown paths
        # too); this declares it in the OpenAPI document, FastAPI's way.
        guarded = {"dependencies": [Depends(HTTPBearer(auto_error=False,
                                                       scheme_name="bearerAuth"))],
                   "responses": error_responses(401)}
    app.include_router(open_router)
    app.include_router(router, **guarded)

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"},
                        **guarded.get("responses", {})},
             dependencies=guarded.get("dependencies"))
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    app.add_middleware(_HttpMetrics, metrics=metrics)
    if settings.fast_infer:
        app.fast_infer = InferFastPath(app.state.service, settings.max_body_bytes, metrics)
    return app
