"""Health checks of the stage actors, from the API process.

A :class:`HealthMonitor` thread pings every live worker's actor every ``period_s``.  A
worker is declared down when a ping fails (the actor died) or has gone unanswered for
``timeout_s`` (the actor hangs); a hung actor is then killed, so that nothing it still holds
can answer later.  Detection is therefore bounded by ``period_s + timeout_s`` for a hang and
by about ``period_s`` for a death (often sooner: a batch sent to a dead actor reports it).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("ppipe.serving.ray")


@dataclass(frozen=True, slots=True)
class HealthOptions:
    """``period_s``: time between pings of one worker; ``timeout_s``: a ping unanswered this
    long marks the worker down (seconds)."""

    period_s: float = 0.25
    timeout_s: float = 1.0


class HealthMonitor:
    """Pings actors; calls ``on_down(worker_id, reason)`` once per failure and
    ``on_stats(worker_id, stats)`` with each ping's answer.  ``handles()`` returns the live
    workers' ``{worker_id: actor handle}`` at each round."""

    def __init__(self, handles: Callable[[], dict[int, Any]],
                 on_down: Callable[[int, str], None], on_stats: Callable[[int, Any], None],
                 options: HealthOptions | None = None):
        self.options = options or HealthOptions()
        self._handles = handles
        self._on_down = on_down
        self._on_stats = on_stats
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: dict[int, tuple[Any, float]] = {}  # worker -> (ping ref, sent at)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="ppipe-ray-health")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def _run(self) -> None:
        import time

        import ray

        opts = self.options
        while not self._stop.wait(opts.period_s):
            try:
                live = self._handles()
                now = time.monotonic()
                for wid in [w for w in self._pending if w not in live]:
                    del self._pending[wid]
                for wid, handle in live.items():
                    if wid not in self._pending:
                        self._pending[wid] = (handle.ping.remote(), now)
                refs = {ref: wid for wid, (ref, _) in self._pending.items()}
                if not refs:
                    continue
                ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
                for ref in ready:
                    wid = refs[ref]
                    del self._pending[wid]
                    try:
                        self._on_stats(wid, ray.get(ref))
                    except Exception as exc:  # the actor died
                        self._on_down(wid, f"health check failed: {type(exc).__name__}")
                now = time.monotonic()
                for wid, (ref, sent) in list(self._pending.items()):
                    if now - sent > opts.timeout_s:
                        del self._pending[wid]
                        self._on_down(wid, f"no answer to a health check within "
                                           f"{opts.timeout_s:.2f} s")
                        try:
                            ray.kill(live[wid], no_restart=True)
                        except Exception:
                            log.warning("could not kill hung worker %d", wid, exc_info=True)
            except Exception:
                log.exception("health monitor round failed")
