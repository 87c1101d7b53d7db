"""How requests are answered: each future gets exactly one outcome, and a dropped request
is told why in words."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future, InvalidStateError
from typing import Any

from ppipe_trt.errors import RequestRejectedError
from ppipe_trt.scheduler.interface import DropReason, Request

#: What each drop reason means to the client.
DROP_MESSAGES = {
    DropReason.DEADLINE_UNREACHABLE.value: "cannot finish within the deadline",
    DropReason.NO_WORKERS.value: "no live worker for some stage of the model",
    DropReason.WORKER_FAILED.value: "the reserved worker failed and there is no time to "
                                    "re-dispatch",
    DropReason.QUEUE_FULL.value: "server overloaded",
    DropReason.SHUTDOWN.value: "server shutting down",
}


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
