"""How requests are answered: each future gets exactly one outcome, and a dropped request
is told why in words."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future, InvalidStateError
from typing import Any

from ppipe_trt.errors import RequestRejectedError
from ppipe_trt.scheduler.interface import DropReason, Request

log = logging.getLogger("ppipe.serving")

#: What each drop reason means to the client.
DROP_MESSAGES = {
    DropReason.DEADLINE_UNREACHABLE.value: "cannot finish within the deadline",
    DropReason.NO_WORKERS.value: "no live worker for some stage of the model",
    DropReason.WORKER_FAILED.value: "the reserved worker failed and there is no time to "
                                    "re-dispatch",
    DropReason.QUEUE_FULL.value: "server overloaded",
    DropReason.SHUTDOWN.value: "server shutting down",
}


class CallbackAnswer:
    """Stands for a request's future where the caller is on the runtime's event loop and
    answers from a callback (the HTTP front end): ``callback(result, None)`` or
    ``callback(None, error)`` is called once, on the event loop's thread, from where the
    runtime answers (a batch's completion, a drop) -- no future, no extra turn of the event
    loop.  What the runtime uses of a future: ``set_result``, ``set_exception`` (a second
    outcome raises ``InvalidStateError``, which :func:`resolve` ignores), ``done``;
    ``cancel`` answers ``asyncio.CancelledError`` (the front end's answer guard gives up).

    An outcome that comes before :meth:`arm` (the request refused while it is submitted) is
    called back on the next turn of ``loop``, not inside the submitting call.  An exception
    raised by the callback is logged; it never reaches the runtime."""

    __slots__ = ("_callback", "_loop", "_done", "_armed")

    def __init__(self, callback, loop: asyncio.AbstractEventLoop):
        self._callback = callback
        self._loop = loop
        self._done = False
        self._armed = False

    def arm(self) -> None:
        """The submitting call returned: outcomes are called back at once from now on."""
        self._armed = True

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return False

    def set_result(self, result: Any) -> None:
        # _fire and _call, inline: every answered request comes here
        if self._done:
            raise InvalidStateError("the request was answered already")
        self._done = True
        if not self._armed:
            self._loop.call_soon(self._call, result, None)
            return
        try:
            self._callback(result, None)
        except Exception:  # noqa: BLE001 - the front end's bug: not the runtime's problem
            log.exception("answer callback failed")

    def set_exception(self, error: BaseException) -> None:
        self._fire(None, error)

    def cancel(self) -> bool:
        if self._done:
            return False
        self._fire(None, asyncio.CancelledError())
        return True

    def _fire(self, result: Any, error: BaseException | None) -> None:
        if self._done:
            raise InvalidStateError("the request was answered already")
        self._done = True
        if not self._armed:
            self._loop.call_soon(self._call, result, error)
        else:
            self._call(result, error)

    def _call(self, result: Any, error: BaseException | None) -> None:
        try:
            self._callback(result, error)
        except Exception:  # noqa: BLE001 - the front end's bug: not the runtime's problem
            log.exception("answer callback failed")


def resolve(fut: Future | asyncio.Future, result: Any = None,
            error: BaseException | None = None) -> None:
    """Set a future's outcome once; a second outcome (e.g. a late result after shutdown
    already answered it, or an asyncio future its waiter cancelled) is ignored by design.
    An asyncio future must be set on its event loop's thread."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except (InvalidStateError, asyncio.InvalidStateError):
        pass


def drop_error(request: Request, reason: str, detail: str) -> RequestRejectedError:
    """The error a request dropped for ``reason`` (a :class:`DropReason` value) gets.
    ``request.payload`` is the runtime's :class:`~ppipe_trt.serving.types.PendingRequest`."""
    message = DROP_MESSAGES.get(reason, reason)
    budget_ms = (request.payload.deadline_us - request.arrival_us) / 1000.0
    return RequestRejectedError(reason, f"request dropped ({reason}): {message} "
                                        f"(deadline {budget_ms:.1f} ms after arrival)"
                                + (f"; {detail}" if detail else ""))


def shutdown_error(what: str) -> RequestRejectedError:
    """The error of a request the stopping server cannot answer any more (``what``: e.g.
    "batch cancelled")."""
    return RequestRejectedError(DropReason.SHUTDOWN.value, f"server shutting down; {what}")
