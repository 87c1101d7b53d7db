"""More front-end processes over one runtime: the link between them.

One process owns the runtime (the schedulers must have a single owner) and serves the
protocols itself; ``ppipe serve --frontends N`` starts N - 1 more processes that serve the same
HTTP and gRPC ports (``SO_REUSEPORT``: the kernel spreads connections over the processes) and
hand each inference to the runtime's process over a Unix socket.  Their
:class:`~api.service.InferenceService` sees a :class:`RemoteRuntime`, so both protocols, the
fast path, validation and error mapping are the same code in every process.

The link carries length-prefixed frames, each a pickled list of the tuples one turn of the
event loop sent (one write per turn):

* front end -> runtime: ``("submit", id, model, timeout_us, inputs)``, ``("stats", id)``,
  ``("status", id)``, ``("metrics", id)``;
* runtime -> front end: ``("hello", models, info, counters, ready)`` first, then
  ``("answer", id, result, error)`` (``result``: the fields of an ``InferenceResult``;
  ``error``: ``(kind, reason, message)``, rebuilt as the same exception class),
  ``("stats", id, snapshot, ready)``, ``("status", id, doc)``, ``("metrics", id, bytes)``.

In a front-end process, Triton's statistics come from a snapshot of the runtime's counters
refreshed every :data:`STATS_REFRESH_S`; ``/metrics`` and ``/v2/status`` are fetched from the
runtime's process when asked (its counters; HTTP request counters are each process's own).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import pickle
import socket
import struct
import time
from typing import Any, Callable

from ppipe_trt.errors import (BadInputError, InfeasiblePlanError, ModelNotFoundError,
                              PlanSwapError, PPipeError, RequestRejectedError)
from ppipe_trt.serving.types import (InferenceResult, ServedModel, StageFailedError,
                                     served_model)

log = logging.getLogger("ppipe.api")

_LENGTH = struct.Struct("<I")
#: How often a front-end process refreshes its copy of the runtime's counters.
STATS_REFRESH_S = 0.5
#: How long a front-end process waits for the runtime's process at start.
CONNECT_TIMEOUT_S = 60.0


def _error_record(exc: BaseException) -> tuple[str, str, str]:
    """An exception as ``(kind, reason, message)`` for the link (custom exceptions do not all
    pickle back to themselves)."""
    if isinstance(exc, RequestRejectedError):
        return "rejected", exc.reason, str(exc)
    for kind, cls in _KINDS.items():
        if isinstance(exc, cls):
            return kind, "", str(exc)
    return "error", "", f"{type(exc).__name__}: {exc}"


def _error_of(record: tuple[str, str, str]) -> BaseException:
    kind, reason, message = record
    if kind == "rejected":
        return RequestRejectedError(reason, message)
    return _KINDS.get(kind, PPipeError)(message)


_KINDS = {"not_found": ModelNotFoundError, "bad_input": BadInputError,
          "failed": StageFailedError, "swap": PlanSwapError, "infeasible": InfeasiblePlanError,
          "ppipe": PPipeError}


class _Link(asyncio.Protocol):
    """Framed messages over a stream: what is sent during one turn of the event loop goes
    out as one frame (one pickled list, one write); each frame received is handed to
    ``on_message`` message by message, in order.  ``on_lost`` once the stream ends."""

    def __init__(self, on_message: Callable[[tuple], None],
                 on_lost: Callable[[], None] | None = None):
        self.on_message, self.on_lost = on_message, on_lost
        self.transport: asyncio.Transport | None = None
        self._in = bytearray()
        self._out: list[tuple] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self._out:  # sent before the connection was made (the greeting)
            self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.on_lost is not None:
            self.on_lost()

    def send(self, message: tuple) -> None:
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(message)

    def _flush(self) -> None:
        if self.transport is None:
            return  # connection_made sends it
        out, self._out = self._out, []
        if not self.transport.is_closing():
            data = pickle.dumps(out, protocol=5)
            self.transport.write(_LENGTH.pack(len(data)) + data)

    def data_received(self, data: bytes) -> None:
        buf = self._in
        buf += data
        pos, n = 0, len(buf)
        while n - pos >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(buf, pos)
            end = pos + _LENGTH.size + size
            if end > n:
                break
            messages = pickle.loads(memoryview(buf)[pos + _LENGTH.size:end])
            pos = end
            for message in messages:
                try:
                    self.on_message(message)
                except Exception:  # noqa: BLE001 - one bad message must not end the link
                    log.exception("runtime link: message %r failed", message[:2])
        if pos:
            del buf[:pos]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


# ---- the runtime's process -------------------------------------------------------------------
class RuntimeLinkServer:
    """Listens on the Unix socket ``path`` for front-end processes and answers them from the
    runtime ``runtime_getter()`` returns (the app's) and the app's ``render_metrics``."""

    def __init__(self, runtime_getter: Callable[[], Any], render_metrics: Callable[[], bytes],
                 path: str):
        self.runtime_getter = runtime_getter
        self.render_metrics = render_metrics
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._links: set[_Link] = set()

    async def start(self) -> None:
        self._server = await asyncio.get_running_loop().create_unix_server(self._link,
                                                                           path=self.path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for link in list(self._links):
                link.close()
            self._server = None

    def _link(self) -> _Link:
        """A front-end process connected: greet it with the served models."""
        rt = self.runtime_getter()
        link = _Link(lambda message: self._on_message(link, rt, message))
        link.on_lost = lambda: self._links.discard(link)
        self._links.add(link)
        link.send(("hello", dict(rt.models), dict(rt.info), rt.stats.snapshot(), rt.ready))
        return link

    def _on_message(self, link: _Link, rt, message: tuple) -> None:
        kind, rid = message[0], message[1]
        if kind == "submit":
            self._submit(link, rt, rid, *message[2:])
        elif kind == "stats":
            link.send(("stats", rid, rt.stats.snapshot(), rt.ready))
        elif kind == "status":
            link.send(("status", rid, rt.status()))
        elif kind == "metrics":
            link.send(("metrics", rid, self.render_metrics()))
        elif kind == "plan":
            asyncio.get_running_loop().create_task(self._push_plan(link, rt, rid, message[2]))

    @staticmethod
    async def _push_plan(link: _Link, rt, rid: int, body) -> None:
        """A front-end process forwards ``POST /v2/plan``: done here, off the event loop."""
        from ppipe_trt.serving.adaptive import parse_plan_push, push_plan

        try:
            report = await asyncio.to_thread(push_plan, rt, parse_plan_push(body))
        except Exception as exc:  # noqa: BLE001 - answered to the front end, not raised
            link.send(("plan", rid, None, _error_record(exc)))
            return
        link.send(("plan", rid, report.to_dict(), None))

    @staticmethod
    def _submit(link: _Link, rt, rid: int, model: str, timeout_us, inputs) -> None:
        try:
            fut = rt.submit_async(model, inputs, timeout_us)
        except Exception as exc:  # noqa: BLE001 - e.g. an unknown model: answered, not raised
            link.send(("answer", rid, None, _error_record(exc)))
            return

        def answer(f: asyncio.Future) -> None:
            if f.cancelled():
                link.send(("answer", rid, None, ("rejected", "shutdown", "request cancelled")))
            elif f.exception() is not None:
                link.send(("answer", rid, None, _error_record(f.exception())))
            else:
                r = f.result()
                link.send(("answer", rid, (r.request_id, r.outputs, r.arrival_us, r.finish_us,
                                           r.deadline_us, r.batch_size), None))

        fut.add_done_callback(answer)


# ---- a front-end process ---------------------------------------------------------------------
class _StatsCopy:
    """The runtime's counters as last fetched (``snapshot()`` as ``RuntimeStats``')."""

    def __init__(self) -> None:
        self.counters: dict = {}

    def snapshot(self) -> dict:
        return self.counters


class RemoteRuntime:
    """What :class:`~api.service.InferenceService` needs of a runtime, served by the runtime's
    process over the Unix socket ``path``: the models (from its hello), ``submit_async``,
    readiness, counters (:data:`STATS_REFRESH_S` old at most) and ``status()``.

    Built (blocking: it connects and reads the hello) in the app's lifespan thread; ``start``
    on the event loop opens the link.  ``on_lost``: called once the link is gone (a
    front-end process then exits: it has nothing left to serve from)."""

    threadless = True  # nothing here needs a thread: the app starts it on its event loop

    def __init__(self, path: str, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 on_lost: Callable[[], None] | None = None):
        self.path = path
        self.on_lost = on_lost  # called when the link to the runtime's process is gone
        deadline = time.monotonic() + connect_timeout_s
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                break
            except OSError as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise PPipeError(f"front end: no runtime process on {path}: {exc}") from None
                time.sleep(0.05)
        head = self._read_exactly(sock, _LENGTH.size)
        first = pickle.loads(self._read_exactly(sock, _LENGTH.unpack(head)[0]))
        kind, models, info, counters, ready = first[0]
        if kind != "hello" or len(first) != 1:
            raise PPipeError(f"front end: unexpected first message {kind!r} on {path}")
        self._sock = sock
        self.models: dict[str, ServedModel] = models
        self.info = {**info, "frontend": "remote"}
        self.stats = _StatsCopy()
        self.stats.counters = counters  # refreshed every STATS_REFRESH_S once started
        self._ready = False  # until the link is open: then as the runtime says
        self._ready_at_hello = ready
        self._status: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[asyncio.Future, str | None]] = {}  # id -> (future, model)
        self._link: _Link | None = None
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    @staticmethod
    def _read_exactly(sock: socket.socket, n: int) -> bytes:
        chunks, got = [], 0
        while got < n:
            chunk = sock.recv(n - got)
            if not chunk:
                raise PPipeError("front end: the runtime process closed the link")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    # ---- life cycle (the app's lifespan) ----
    def start(self, event_loop: asyncio.AbstractEventLoop | None = None) -> "RemoteRuntime":
        self._loop = event_loop or asyncio.get_running_loop()
        self._tasks.append(self._loop.create_task(self._run()))
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        for task in self._tasks:
            self._loop.call_soon_threadsafe(task.cancel)
        self._ready = False

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        _, self._link = await loop.create_unix_connection(
            lambda: _Link(self._on_message, self._on_lost), sock=self._sock)
        self._ready = self._ready_at_hello
        self._tasks.append(loop.create_task(self._refresh()))

    def _on_message(self, message: tuple) -> None:
        fut, model = self._waiting.pop(message[1], (None, None))
        kind = message[0]
        if kind == "answer":
            if fut is None or fut.done():
                return
            if message[3] is not None:
                fut.set_exception(_error_of(message[3]))
            else:
                request_id, outputs, arrival, finish, deadline, batch = message[2]
                fut.set_result(InferenceResult(request_id, model, outputs, arrival, finish,
                                               deadline, batch))
            return
        if kind == "plan":
            if fut is not None and not fut.done():
                if message[3] is not None:
                    fut.set_exception(_error_of(message[3]))
                else:
                    fut.set_result(message[2])
            return
        if kind == "stats":
            self.stats.counters, self._ready = message[2], message[3]
        if fut is not None and not fut.done():
            fut.set_result(message[2])

    def _on_lost(self) -> None:
        log.error("front end: the runtime process closed the link")
        self._ready = False
        self._link = None  # later requests fail at once
        for fut, _ in self._waiting.values():
            if not fut.done():
                fut.set_exception(RequestRejectedError(
                    "shutdown", "server shutting down; the runtime process is gone"))
        self._waiting.clear()
        if self.on_lost is not None:
            self.on_lost()

    async def _refresh(self) -> None:
        while True:
            await self._request("stats")
            await asyncio.sleep(STATS_REFRESH_S)

    def _request(self, kind: str, *args) -> asyncio.Future:
        fut = self._loop.create_future()
        if self._link is None:
            fut.set_exception(RequestRejectedError("not_ready", "server is not ready: the "
                                                   "link to the runtime is not open yet"))
            return fut
        rid = next(self._ids)
        self._waiting[rid] = (fut, args[0] if kind == "submit" else None)
        self._link.send((kind, rid, *args))
        return fut

    # ---- what the service asks ----
    @property
    def ready(self) -> bool:
        return self._ready

    def model(self, name: str) -> ServedModel:
        return served_model(self.models, name)

    def submit_async(self, model: str, inputs, timeout_us: float | None = None) -> asyncio.Future:
        self.model(model)
        return self._request("submit", model, timeout_us, inputs)

    def status(self) -> dict[str, Any]:
        """The runtime's status document as last fetched (fetching a newer one)."""
        fut = self._request("status")
        fut.add_done_callback(lambda f: not f.exception() and self._status.update(f.result()))
        return {**self._status, "frontend": "remote (status as of the previous request)"} \
            if self._status else {"ready": self._ready, "frontend": "remote", "models": {}}

    async def fetch_metrics(self) -> bytes:
        """The runtime process's ``/metrics`` document."""
        return await self._request("metrics")

    async def push_plan(self, body) -> dict[str, Any]:
        """``POST /v2/plan``, done by the runtime's process."""
        return await self._request("plan", body)

    async def fetch_status(self) -> dict[str, Any]:
        """The runtime's status document, fetched now."""
        doc = await self._request("status")
        self._status = doc
        return {**doc, "frontend": "remote"}
