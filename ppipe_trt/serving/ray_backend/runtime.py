"""The runtime with Ray actors as stage workers: worker health, removal, re-dispatch, re-adding.

:class:`RayServingRuntime` *is* the single-host :class:`ServingRuntime` (same loop, same
schedulers, same front end, workers driven through the same
:class:`~ppipe_trt.serving.handle.WorkerHandle` protocol); it implements the runtime's hooks:

* :meth:`~RayServingRuntime.on_cluster_event` handles three events of its own:
  :class:`WorkerDown` (a worker died or stopped answering: from the :class:`HealthMonitor`
  or from a batch whose report was lost): the worker is removed from its scheduler
  (``remove_worker``), which stops reserving on it and drops the batches reserved on it with
  ``WORKER_FAILED``; :class:`BatchLost` (a batch's stage report can never come): its
  reservations are released; :class:`WorkerUp` (:meth:`RayServingRuntime.readd_worker`
  started a new actor for the slot): the worker is put back in its pool (``add_worker``);
* :meth:`~RayServingRuntime.on_drops` takes the ``WORKER_FAILED`` drops out of a decision
  pass to re-dispatch them; :meth:`~RayServingRuntime.before_answer_drop` tells a request
  that was re-dispatched and still missed its deadline that a worker failed.

The scheduler answers a worker failure only with drops; this runtime turns a ``WORKER_FAILED``
drop (and a lost batch) into a **re-dispatch**: the request arrives again at its scheduler
with its original arrival time and deadline, at most ``max_redispatch`` times.  If the
scheduler cannot meet the deadline any more, the request is answered with an explicit
``worker_failed`` error.  Each request is answered exactly once either way (futures resolve
once; a late result of a killed actor cannot come, since actors declared down are killed).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ppipe_trt.errors import PPipeError
from ppipe_trt.scheduler.interface import Dispatch, Drop, DropReason, Request
from ppipe_trt.scheduler.placement import WorkerSlot
from ppipe_trt.serving.events import LoopEvent
from ppipe_trt.serving.handle import WorkerStats
from ppipe_trt.serving.ray_backend.health import HealthMonitor, HealthOptions
from ppipe_trt.serving.runtime import ServingRuntime

log = logging.getLogger("ppipe.serving.ray")


class RayWorkerProxy:
    """The API process's view of one stage actor (a :class:`~ppipe_trt.serving.handle.
    WorkerHandle`).  ``alive`` is set by the runtime when the worker is declared down.  Its
    counters are those of the latest health ping."""

    def __init__(self, info: WorkerSlot, handle: Any, mode: str, node_id: str, pid: int,
                 started_us: float):
        self.info = info
        self.handle = handle
        self._mode = mode
        self.node_id = node_id
        self.pid = pid
        self.alive = True
        self.down_reason = ""
        self._stats = WorkerStats(info.worker_id, info.model, info.stage, info.gpu_class, mode,
                                  0, 0, 0.0, 0, 0, 0, started_us)

    @property
    def worker_id(self) -> int:
        return self.info.worker_id

    @property
    def mode(self) -> str:
        return self._mode if self.alive else f"{self._mode} [down]"

    def start(self) -> None:
        """The actor is already running (started by the assembly, warmed up)."""

    def stop(self, timeout_s: float = 5.0) -> list:
        import ray

        try:
            ray.kill(self.handle, no_restart=True)
        except Exception:  # already gone
            pass
        return []

    def update_stats(self, stats: WorkerStats) -> None:
        self._stats = stats

    def stats(self) -> WorkerStats:
        return dataclasses.replace(self._stats, mode=self.mode)


@dataclass(slots=True)
class WorkerDown(LoopEvent):
    """Worker ``worker_id`` died or stopped answering (seen at ``detected_us``, runtime
    clock): the loop removes it from its pool."""

    worker_id: int
    reason: str
    detected_us: float


@dataclass(slots=True)
class WorkerUp(LoopEvent):
    """A new actor serves ``worker_id``'s slot: the loop puts it back in its pool."""

    worker_id: int


@dataclass(slots=True)
class BatchLost(LoopEvent):
    """The report of route position ``stage`` of ``dispatch`` can never come (``why``: the
    error's name; ``lost_us``: when that was known)."""

    dispatch: Dispatch
    stage: int
    why: str
    lost_us: float


@dataclass(slots=True)
class WorkerDownRecord:
    """When and why a worker was declared down (runtime clock, microseconds)."""

    worker_id: int
    reason: str
    detected_us: float
    removed_us: float = 0.0
    readded_us: float | None = None


@dataclass(slots=True)
class ClusterCounters:
    workers_removed: int = 0
    workers_readded: int = 0
    batches_lost: int = 0
    requests_redispatched: int = 0
    requests_failed: int = 0
    history: list[WorkerDownRecord] = field(default_factory=list)


class RayServingRuntime(ServingRuntime):
    """A :class:`ServingRuntime` whose workers are :class:`RayWorkerProxy` objects.

    ``relaunch(worker_id)``: starts a fresh actor for a slot and returns its proxy (used by
    :meth:`readd_worker`); ``set_peers(proxies)``: tells every live actor the handles of the
    others.  ``max_redispatch``: times one request may be re-dispatched after worker failures.
    ``owns_ray``: :meth:`stop` also shuts Ray down (when the assembly started it) and removes
    ``ray_temp_dir`` (the local instance's folder, when the assembly created it).
    """

    def __init__(self, *args, relaunch: Callable[[int], RayWorkerProxy],
                 set_peers: Callable[[dict[int, RayWorkerProxy]], None],
                 health: HealthOptions | None = None, max_redispatch: int = 1,
                 owns_ray: bool = False, ray_temp_dir: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._relaunch = relaunch
        self._set_peers = set_peers
        self.max_redispatch = max_redispatch
        self.owns_ray = owns_ray
        self._ray_temp_dir = ray_temp_dir
        self.cluster = ClusterCounters()
        self._cluster_lock = threading.Lock()
        self._down: dict[int, WorkerDownRecord] = {}
        self._attempts: dict[int, int] = {}   # request id -> re-dispatches so far
        self.transport.attach(self)
        self.monitor = HealthMonitor(self._live_handles, self.worker_down, self._on_stats,
                                     health)

    # ---- life cycle ---------------------------------------------------------------------------
    def start(self, event_loop=None) -> "RayServingRuntime":
        """Start on a loop thread of its own whatever ``event_loop`` is given: the hooks call
        Ray (actor launches, ``ray.get``), which must not block a front end's event loop."""
        super().start()
        self.monitor.start()
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        self.monitor.stop()
        super().stop(timeout_s)
        if self.owns_ray:
            import ray

            ray.shutdown()
            self.owns_ray = False
            if self._ray_temp_dir:  # the local instance's session files and logs
                import shutil

                shutil.rmtree(self._ray_temp_dir, ignore_errors=True)

    # ---- health (any thread) ---------------------------------------------------------------
    def _live_handles(self) -> dict[int, Any]:
        return {w.worker_id: w.handle for w in self.workers if w.alive}

    def _on_stats(self, worker_id: int, stats: WorkerStats) -> None:
        w = self.worker(worker_id)
        if w is not None and w.alive:
            w.update_stats(stats)

    def worker_down(self, worker_id: int, reason: str) -> None:
        """Declare ``worker_id`` down (thread-safe); the loop removes it from its pool."""
        w = self.worker(worker_id)
        if w is not None and w.alive:
            self.post_event(WorkerDown(worker_id, reason, self.now_us()))

    def batch_lost(self, d: Dispatch, stage: int, suspect: int | None, error: BaseException,
                   now_us: float) -> None:
        """A stage report of batch ``d`` will never come (called by the transport)."""
        if suspect is not None:
            self.worker_down(suspect, f"a call to it failed: {type(error).__name__}")
        self.post_event(BatchLost(d, stage, type(error).__name__, now_us))

    def readd_worker(self, worker_id: int) -> RayWorkerProxy:
        """Start a new actor for ``worker_id``'s slot and put it back in its pool.  Blocks
        until the actor is up (seconds).  Call from any thread but the runtime loop."""
        old = self.worker(worker_id)
        if old is None:
            raise PPipeError(f"no worker {worker_id}; workers are "
                             f"{[w.worker_id for w in self.workers]}")
        if old.alive:
            raise PPipeError(f"worker {worker_id} is alive; only a worker that is down can be "
                             "re-added")
        proxy = self._relaunch(worker_id)
        self.transport.set_handle(worker_id, proxy.handle)
        self.replace_worker(proxy)
        self._set_peers({w.worker_id: w for w in self.workers if w.alive})
        self.post_event(WorkerUp(worker_id))
        return proxy

    # ---- hooks of ServingRuntime (loop thread) ---------------------------------------------
    def on_cluster_event(self, event: LoopEvent, now_us: float) -> None:
        kind = type(event)
        if kind is WorkerDown:
            self._remove_worker(event, now_us)
        elif kind is WorkerUp:
            self._readd(event.worker_id, now_us)
        elif kind is BatchLost:
            self._lost(event, now_us)
        else:
            super().on_cluster_event(event, now_us)

    def on_drops(self, model: str, drops: list[Drop], now_us: float) -> list[Drop]:
        """``WORKER_FAILED`` drops are re-dispatched (or answered) here; the rest are
        answered by the runtime."""
        failed = [dr for dr in drops if dr.reason == DropReason.WORKER_FAILED]
        if not failed:
            return drops
        # their batches are settled here, not by a late report
        self.settle_requests(model, {dr.request.request_id for dr in failed})
        self._retry_or_fail(model, [dr.request for dr in failed],
                            failed[0].detail or "worker failed", now_us)
        return [dr for dr in drops if dr.reason != DropReason.WORKER_FAILED]

    def before_answer_drop(self, model: str, request: Request, reason: DropReason,
                           detail: str) -> tuple[DropReason, str]:
        """A re-dispatched request that is dropped again (but for shutdown) is told that a
        worker failed; ``worker_failed`` answers are counted."""
        if request.request_id in self._attempts:
            self._attempts.pop(request.request_id, None)
            if reason != DropReason.SHUTDOWN:  # a re-dispatch that cannot make it any more
                if reason == DropReason.DEADLINE_UNREACHABLE:
                    detail = "re-dispatch after a worker failure cannot meet the deadline"
                reason = DropReason.WORKER_FAILED
        if reason == DropReason.WORKER_FAILED:
            with self._cluster_lock:
                self.cluster.requests_failed += 1
        return reason, detail

    # ---- cluster events (loop thread) -------------------------------------------------------
    def _remove_worker(self, ev: WorkerDown, now: float) -> None:
        w = self.worker(ev.worker_id)
        if w is None or not w.alive:
            return
        w.alive, w.down_reason = False, ev.reason
        rec = WorkerDownRecord(ev.worker_id, ev.reason, ev.detected_us, now)
        with self._cluster_lock:
            self._down[ev.worker_id] = rec
            self.cluster.workers_removed += 1
            self.cluster.history.append(rec)
        log.warning("worker %d (%s stage %d) down: %s", ev.worker_id, w.info.model,
                    w.info.stage, ev.reason)
        w.stop()  # a hung actor must not answer later
        self.remove_from_pools(w.info.model, ev.worker_id, now)

    def _readd(self, worker_id: int, now: float) -> None:
        model = self.worker(worker_id).info.model
        with self._cluster_lock:
            rec = self._down.pop(worker_id, None)
            if rec is not None:
                rec.readded_us = now
            self.cluster.workers_readded += 1
        if worker_id in self.generation.placement.worker_ids:   # not retired by a swap
            self.apply_decisions(model, self.scheduler(model).add_worker(worker_id, now), now)

    def _lost(self, ev: BatchLost, now: float) -> None:
        d = ev.dispatch
        if self.settle(d.model, d.batch_id) is None:
            return  # already settled (dropped by remove_worker, answered, failed)
        with self._cluster_lock:
            self.cluster.batches_lost += 1
        self.release_reservations(d, ev.stage, now)
        failed = d.route[ev.stage].worker_id
        self._retry_or_fail(d.model, d.requests, f"batch {d.batch_id} lost in stage "
                            f"{ev.stage} on worker {failed} ({ev.why})", now)

    def _retry_or_fail(self, model: str, requests: Iterable[Request], why: str,
                       now: float) -> None:
        sched = self.scheduler(model)
        for r in requests:
            if r.payload.future.done():
                continue
            tries = self._attempts.get(r.request_id, 0)
            if tries < self.max_redispatch and now < r.deadline_us:
                self._attempts[r.request_id] = tries + 1
                with self._cluster_lock:
                    self.cluster.requests_redispatched += 1
                self.apply_decisions(model, sched.on_arrival(r, now), now)
            else:
                self.answer_drop(model, r, DropReason.WORKER_FAILED,
                                 why + ("; already re-dispatched" if tries else ""))

    # ---- introspection ----------------------------------------------------------------------
    def cluster_health(self) -> dict[str, Any]:
        """Workers' liveness and the failure counters (JSON-ready; times in seconds since
        start, detection delays in milliseconds)."""
        t0 = self.started_us
        with self._cluster_lock:
            c = self.cluster
            history = [{"worker_id": r.worker_id, "reason": r.reason,
                        "detected_s": (r.detected_us - t0) / 1e6,
                        "removed_s": (r.removed_us - t0) / 1e6,
                        "readded_s": None if r.readded_us is None else (r.readded_us - t0) / 1e6}
                       for r in c.history]
            counters = {"workers_removed": c.workers_removed,
                        "workers_readded": c.workers_readded, "batches_lost": c.batches_lost,
                        "requests_redispatched": c.requests_redispatched,
                        "requests_failed_worker": c.requests_failed}
        return {"backend": "ray", **counters,
                "workers_down": sorted(w.worker_id for w in self.workers if not w.alive),
                "health_check": {"period_s": self.monitor.options.period_s,
                                 "timeout_s": self.monitor.options.timeout_s},
                "history": history}

    def status(self) -> dict[str, Any]:
        out = super().status()
        by_id = {w.worker_id: w for w in self.workers}
        for entry in out["workers"]:
            w = by_id[entry["worker_id"]]
            entry.update({"alive": w.alive, "node_id": w.node_id, "pid": w.pid,
                          "down_reason": w.down_reason or None})
        out["cluster"] = self.cluster_health()
        return out

