"""The infer routes answered inside uvicorn's HTTP protocol, without an ASGI cycle.

Under uvicorn, an ASGI request has a CPU cost of its own: a scope dict, an
:class:`asyncio.Event`, a request-response cycle object, a task running the app, the
``receive``/``send`` messages and their checks.  Measured on this project's 2-core machine
(``scripts/bench_dataplane.py``'s echo floor, perf_analyzer over HTTP at 1,830 req/s): an
ASGI echo costs ~145-157 us of server CPU per request, the same echo answered from the
protocol's parser callbacks ~92-101 us, and ~117-122 us when its answer comes 35 ms later as
an inference's does (an ASGI echo answering 35 ms later: ~179-194 us).  On ``ppipe serve``
(an emulated 100-GPU plan) it cut the server's CPU per request by 6-10 %
(``docs/benchmarks/dataplane.md``).

:class:`InferHttpProtocol` is uvicorn's own httptools protocol (parsing, keep-alive, flow
control, pipelining and every other route stay uvicorn's) with one change: a ``POST`` to an
infer route (:func:`api.fast._match`) of an app with the fast path on is answered by the
protocol itself, from its parser callbacks -- checks at the end of the headers, the body
gathered as it comes, the request submitted when the message is complete and the response
written from the runtime's future callback (:meth:`api.service.InferenceService.infer_soon`):
no task, no coroutine.  It answers exactly what :class:`api.fast.InferFastPath` answers (the
same functions build the bodies, map the errors and count the metrics; the headers are
written as uvicorn writes them).  Anything it does not take (another route or method, a
request pipelined behind one still being answered, an upgrade, uvicorn's
``limit_concurrency``, a body above :data:`api.fast.OFFLOAD_BYTES`, which is parsed in a
thread) goes the ASGI way, where the fast path of :mod:`api.fast` answers it.

It relies on uvicorn's ``HttpToolsProtocol`` attributes (tested with uvicorn 0.29-0.54);
:func:`http_protocol_for` checks them at start-up and, if they are missing, serves with
uvicorn's own protocol (every route answered the ASGI way) and logs why.
"""

from __future__ import annotations

import http
import logging
import time
import urllib.parse
from typing import Any

from api.codec import parse_infer_request
from api.errors import BodyTooLargeError
from api.fast import (OFFLOAD_BYTES, _json, _match, error_body, infer_answer, inflate,
                      refuse_declared_oversize, render_answer_lines)
from ppipe_trt.errors import PPipeError

log = logging.getLogger("ppipe.api")

try:  # uvicorn[standard]'s fast protocol; without httptools, uvicorn's default serves
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is a dependency of this project
    httptools = None
    HttpToolsProtocol = object  # type: ignore[misc,assignment]

#: What :class:`InferHttpProtocol` uses of uvicorn's protocol (checked at start-up).
_NEEDED = ("on_message_begin", "on_url", "on_header", "on_headers_complete", "on_body",
           "on_message_complete", "on_response_complete", "shutdown", "connection_lost")
_INSTANCE_NEEDED = ("parser", "url", "headers", "scope", "cycle", "pipeline", "transport",
                    "loop", "server_state", "expect_100_continue", "limit_concurrency",
                    "access_log", "access_logger", "client", "tasks", "root_path")


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode())


_STATUS_LINES = {s.value: _status_line(s.value) for s in http.HTTPStatus}


class _NoEvent:
    """Stands for the cycle's ``message_event`` that uvicorn sets when a connection drops."""

    @staticmethod
    def set() -> None:
        pass


class _Exchange:
    """One infer request taken by the protocol: what uvicorn's protocol reads of the
    request-response cycle it believes current (``response_complete``, ``disconnected``,
    ``keep_alive``, ``message_event``), and the request's own state."""

    __slots__ = ("response_complete", "disconnected", "keep_alive", "message_event",
                 "model", "route", "path", "http_version", "started", "chunks", "size",
                 "header_length", "encoding")

    def __init__(self, model, route: str, path: str, http_version: str, keep_alive: bool):
        self.response_complete = False
        self.disconnected = False
        self.keep_alive = keep_alive
        self.message_event = _NoEvent
        self.model = model
        self.route = route
        self.path = path
        self.http_version = http_version
        self.started = time.perf_counter()
        self.chunks: list[bytes] = []
        self.size = 0
        self.header_length: str | None = None
        self.encoding = "identity"


#: Request targets kept in :attr:`InferHttpProtocol._routes` (a client reuses a few).
_ROUTES_KEPT = 1024


def _route(root_path: str, url: bytes) -> tuple[str, tuple[str, str | None, str] | None]:
    """(path, :func:`api.fast._match` of it) of a request target; no match for a path that
    is not ASCII."""
    raw_path = httptools.parse_url(url).path
    try:
        path = raw_path.decode("ascii")
    except UnicodeDecodeError:
        return "", None
    if "%" in path:
        path = urllib.parse.unquote(path)
    path = root_path + path
    return path, _match(path)


class InferHttpProtocol(HttpToolsProtocol):  # type: ignore[misc,valid-type]
    """uvicorn's httptools protocol, answering the infer routes itself (see the module).

    A subclass per app (:func:`http_protocol_for`) sets :attr:`ppipe_app` and its own
    :attr:`_routes` and :attr:`_defaults`."""

    ppipe_app: Any = None  # the api.app.PPipeApp served
    #: (root path, request target) -> (path, infer route match or None)
    _routes: dict[tuple[str, bytes], tuple[str, Any]] = {}
    #: [uvicorn's default headers list, their encoded lines] (uvicorn replaces the list
    #: every second: a new date)
    _defaults: list = [None, b""]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._exchange: _Exchange | None = None  # the request being received, when taken

    # ---- parser callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._exchange = None
        # uvicorn's, less the ASGI scope: made in on_headers_complete for a request that
        # goes the ASGI way (an infer request taken here never needs one)
        self.url = b""
        self.expect_100_continue = False
        self.headers = []

    def on_headers_complete(self) -> None:
        exchange = self._take()
        if exchange is None:
            url, headers, expect = self.url, self.headers, self.expect_100_continue
            super().on_message_begin()  # the scope, over this request's headers
            self.url, self.headers, self.expect_100_continue = url, headers, expect
            self.scope["headers"] = headers
            return super().on_headers_complete()
        self._exchange = exchange
        self.cycle = exchange  # what uvicorn's protocol consults (pipelining, shutdown)
        app = self.ppipe_app
        declared = None
        authorization = None
        for key, value in self.headers:
            if key == b"content-length":
                declared = value.decode("latin-1")
            elif key == b"inference-header-content-length":
                exchange.header_length = value.decode("latin-1")
            elif key == b"content-encoding":
                exchange.encoding = value.decode("latin-1").strip().lower()
            elif key == b"authorization":
                authorization = value
        auth = app.auth
        if auth is not None and not auth.allows(authorization):
            # as PPipeApp.__call__: counted as unauthenticated, answered by api.auth's body
            from api.auth import _REFUSAL_BODY, _REFUSAL_HEADERS

            app.state.metrics.count_http("unauthenticated", 401, 0.0)
            return self._write(exchange, 401, _REFUSAL_BODY,
                               [h for h in _REFUSAL_HEADERS if h[0] != b"content-length"],
                               count=False)
        fast = app.fast_infer
        try:
            exchange.model = fast.service.model(exchange.model[0], exchange.model[1])
            refuse_declared_oversize(declared, fast.limit)
        except PPipeError as exc:
            return self._error(exchange, exc)
        if self.expect_100_continue and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        exchange = self._exchange
        if exchange is None:
            return super().on_body(body)
        if exchange.response_complete:
            return  # answered already (an error): the rest of the body is read and dropped
        exchange.size += len(body)
        limit = self.ppipe_app.fast_infer.limit
        if exchange.size > limit:
            exchange.chunks = []
            return self._error(exchange, BodyTooLargeError(
                f"request body is over the {limit}-byte limit"))
        exchange.chunks.append(body)

    def on_message_complete(self) -> None:
        exchange = self._exchange
        if exchange is None:
            return super().on_message_complete()
        self._exchange = None
        if exchange.response_complete:
            return
        chunks = exchange.chunks
        exchange.chunks = []
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        fast = self.ppipe_app.fast_infer
        model = exchange.model
        try:
            body = inflate(body, exchange.encoding, fast.limit)
            if len(body) > OFFLOAD_BYTES:  # parsed in a thread: the ASGI-style coroutine
                return self._answer_in_task(exchange, body)
            parsed = parse_infer_request(body, exchange.header_length, model)

            def done(outcome, error) -> None:
                if error is not None:
                    return self._fail(exchange, error)
                try:
                    payload, lines = render_answer_lines(model, parsed, outcome)
                except Exception as exc:  # noqa: BLE001 - answered 500 below
                    return self._fail(exchange, exc)
                self._write(exchange, 200, payload, lines)

            fast.service.infer_soon(model, parsed, done, self.loop)
        except Exception as exc:  # noqa: BLE001 - a domain error, else 500 (see _fail)
            self._fail(exchange, exc)

    # ---- internals ----------------------------------------------------------------------------
    def _take(self) -> _Exchange | None:
        """The exchange for this request when the protocol answers it, else ``None``."""
        app = self.ppipe_app
        if app is None or app.fast_infer is None or self.parser.get_method() != b"POST":
            return None
        if self.parser.should_upgrade() or self.limit_concurrency is not None \
                or self.pipeline or (self.cycle is not None
                                     and not self.cycle.response_complete):
            return None  # uvicorn queues it (pipelined) or handles it: the ASGI way
        routes = self._routes
        key = (self.root_path, self.url)
        found = routes.get(key)
        if found is None:
            found = _route(self.root_path, self.url)
            if len(routes) >= _ROUTES_KEPT:
                routes.clear()
            routes[key] = found
        path, match = found
        if match is None:
            return None
        version = self.parser.get_http_version()
        keep_alive = version != "1.0" and self.parser.should_keep_alive()
        return _Exchange((match[0], match[1]), match[2], path, version, keep_alive)

    def _answer_in_task(self, exchange: _Exchange, body: bytes) -> None:
        """A large body: parsed in a worker thread by :func:`api.fast.infer_answer`."""
        service = self.ppipe_app.fast_infer.service

        async def run() -> None:
            try:
                payload, headers = await infer_answer(service, exchange.model, body,
                                                      exchange.header_length)
            except BaseException as exc:  # noqa: BLE001 - answered, as InferFastPath does
                self._fail(exchange, exc)
                if not isinstance(exc, Exception):
                    raise
                return
            self._respond(exchange, 200, payload, headers)

        task = self.loop.create_task(run())
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def _fail(self, exchange: _Exchange, exc: BaseException) -> None:
        if isinstance(exc, PPipeError):
            return self._error(exchange, exc)
        if isinstance(exc, Exception):  # a bug: answered 500 with its name, logged
            log.error("infer %s failed", getattr(exchange.model, "name", exchange.model),
                      exc_info=exc)
        detail = f"internal server error: {type(exc).__name__}: {exc}"
        self._respond(exchange, 500, _json({"error": detail}),
                      [("content-type", "application/json")])

    def _error(self, exchange: _Exchange, exc: PPipeError) -> None:
        status, payload, headers = error_body(exc)
        headers.append(("content-type", "application/json"))
        self._respond(exchange, status, payload, headers)

    def _respond(self, exchange: _Exchange, status: int, payload: bytes,
                 headers: list[tuple[str, str]]) -> None:
        lines = "".join([f"{k.lower()}: {v}\r\n" for k, v in headers]).encode("latin-1")
        self._write(exchange, status, payload, lines)

    def _write(self, exchange: _Exchange, status: int, payload: bytes,
               headers: bytes | list[tuple[bytes, bytes]], count: bool = True) -> None:
        """Write the response as uvicorn's cycle writes it (status line, uvicorn's default
        headers, ours in lower case, the length; ``connection: close`` when the connection
        ends), then let uvicorn's protocol go on (keep-alive timer, next pipelined request).
        ``headers``: ours, as (name, value) pairs or their encoded lines."""
        if exchange.response_complete:
            return
        exchange.response_complete = True
        if count:
            self.ppipe_app.fast_infer.metrics.count_http(
                exchange.route, status, time.perf_counter() - exchange.started)
        if exchange.disconnected or self.transport.is_closing():
            return
        if self.access_log:
            client = "%s:%d" % self.client if self.client else "-"
            self.access_logger.info('%s - "%s %s HTTP/%s" %d', client, "POST", exchange.path,
                                    exchange.http_version, status)
        defaults = self._defaults
        if defaults[0] is not self.server_state.default_headers:
            defaults[0] = self.server_state.default_headers
            defaults[1] = b"".join([b"%s: %s\r\n" % (name.lower(), value)
                                    for name, value in defaults[0]])
        if not isinstance(headers, bytes):
            headers = b"".join([b"%s: %s\r\n" % (name.lower(), value)
                                for name, value in headers])
        self.transport.write(b"".join((
            _STATUS_LINES.get(status) or _status_line(status), defaults[1], headers,
            b"content-length: %d\r\n" % len(payload),
            b"\r\n" if exchange.keep_alive else b"connection: close\r\n\r\n", payload)))
        if not exchange.keep_alive:
            self.transport.close()
        self.on_response_complete()  # as uvicorn's cycle does: starts a pipelined request


def http_protocol_for(app) -> type | str:
    """The uvicorn ``http`` setting for ``app`` (an :class:`api.app.PPipeApp`): a subclass of
    :class:`InferHttpProtocol` bound to it, or ``"auto"`` (uvicorn's choice, every route
    answered the ASGI way) when the fast path is off or this uvicorn lacks what the protocol
    relies on (logged)."""
    if getattr(app, "fast_infer", None) is None:
        return "auto"
    problem = _incompatibility()
    if problem is not None:
        log.warning("infer requests go through ASGI (%s)", problem)
        return "auto"
    return type("PPipeInferHttpProtocol", (InferHttpProtocol,),
                {"ppipe_app": app, "_routes": {}, "_defaults": [None, b""]})


def _incompatibility() -> str | None:
    """Why this uvicorn cannot run :class:`InferHttpProtocol`, else ``None``."""
    if httptools is None:
        return "httptools is not installed"
    missing = [m for m in _NEEDED if not callable(getattr(HttpToolsProtocol, m, None))]
    if missing:
        return f"uvicorn's HttpToolsProtocol has no {', '.join(missing)}"
    import inspect

    try:
        source = "".join(inspect.getsource(getattr(HttpToolsProtocol, m)) for m in (
            "__init__", "on_message_begin", "on_header"))
    except (OSError, TypeError):  # no source (a compiled or zipped install): trust the tests
        return None
    missing = [a for a in _INSTANCE_NEEDED if f"self.{a}" not in source]
    if missing:
        return f"uvicorn's HttpToolsProtocol sets no {', '.join(missing)}"
    return None

