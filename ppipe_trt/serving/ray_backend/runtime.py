"""The runtime with Ray actors as stage workers: worker health, removal, re-dispatch, re-adding.

:class:`RayServingRuntime` *is* the single-host :class:`ServingRuntime` (same loop, same
schedulers, same front end); it adds cluster events to the loop's inbox:

* ``down`` (a worker died or stopped answering: from the :class:`HealthMonitor` or from a
  batch whose report was lost): the worker is removed from its scheduler
  (``remove_worker``), which stops reserving on it and drops the batches reserved on it with
  ``WORKER_FAILED``;
* ``lost`` (a batch's stage report can never come): its reservations are released;
* ``up`` (:meth:`RayServingRuntime.readd_worker` started a new actor for the slot): the
  worker is put back in its pool (``add_worker``).

The scheduler answers a worker failure only with drops; this runtime turns a ``WORKER_FAILED``
drop (and a lost batch) into a **re-dispatch**: the request arrives again at its scheduler
with its original arrival time and deadline, at most ``max_redispatch`` times.  If the
scheduler cannot meet the deadline any more, the request is answered with an explicit
``worker_failed`` error.  Each request is answered exactly once either way (futures resolve
once; a late result of a killed actor cannot come, since actors declared down are killed).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from ppipe_trt.errors import PPipeError
from ppipe_trt.scheduler.interface import Decisions, Dispatch, DropReason, Request
from ppipe_trt.serving.runtime import ServingRuntime
from ppipe_trt.serving.ray_backend.health import HealthMonitor, HealthOptions
from ppipe_trt.serving.worker import WorkerInfo, WorkerStats

log = logging.getLogger("ppipe.serving.ray")


class RayWorkerProxy:
    """The API process's view of one stage actor (duck-types ``StageWorker`` for the
    runtime: ``worker_id``, ``info``, ``mode``, ``start``, ``stop``, ``stats``).  Its counters
    are those of the latest health ping."""

    def __init__(self, info: WorkerInfo, handle: Any, mode: str, node_id: str, pid: int,
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
        s = self._stats
        return WorkerStats(s.worker_id, s.model, s.stage, s.gpu_class, self.mode, s.batches,
                           s.samples, s.busy_us, s.queue_length, s.overruns, s.failures,
                           s.started_us)


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
        self._transport.attach(self)
        self.monitor = HealthMonitor(self._live_handles, self.worker_down, self._on_stats,
                                     health)

    # ---- life cycle ---------------------------------------------------------------------------
    def start(self) -> "RayServingRuntime":
        import gc

        # Ray's driver makes the API process's heap large: a full collection then takes
        # ~100 ms (measured: 70-113 ms gen-2 pauses under load), and stalls the loop and
        # every answer.  Objects alive at start-up (modules, Ray, engines' metadata) are moved
        # out of the collector's sight; later garbage is collected as usual.
        gc.collect()
        gc.freeze()
        super().start()
        self.monitor.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
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
        w = self._workers.get(worker_id)
        if w is not None and w.alive:
            w.update_stats(stats)

    def worker_down(self, worker_id: int, reason: str) -> None:
        """Declare ``worker_id`` down (thread-safe); the loop removes it from its pool."""
        w = self._workers.get(worker_id)
        if w is not None and w.alive:
            self._inbox.put(("down", worker_id, reason, self._clock()))

    def batch_lost(self, d: Dispatch, stage: int, suspect: int | None, error: BaseException,
                   now_us: float) -> None:
        """A stage report of batch ``d`` will never come (called by the transport)."""
        if suspect is not None:
            self.worker_down(suspect, f"a call to it failed: {type(error).__name__}")
        self._inbox.put(("lost", d, stage, f"{type(error).__name__}", now_us))

    def readd_worker(self, worker_id: int) -> RayWorkerProxy:
        """Start a new actor for ``worker_id``'s slot and put it back in its pool.  Blocks
        until the actor is up (seconds).  Call from any thread but the runtime loop."""
        old = self._workers.get(worker_id)
        if old is None:
            raise PPipeError(f"no worker {worker_id}; workers are {sorted(self._workers)}")
        if old.alive:
            raise PPipeError(f"worker {worker_id} is alive; only a worker that is down can be "
                             "re-added")
        proxy = self._relaunch(worker_id)
        self._transport.set_handle(worker_id, proxy.handle)
        self._workers[worker_id] = proxy
        self._set_peers({w.worker_id: w for w in self.workers if w.alive})
        self._inbox.put(("up", worker_id))
        return proxy

    # ---- the loop ---------------------------------------------------------------------------
    def _process(self, events: list[tuple]) -> bool:
        plain: list[tuple] = []
        for ev in events:
            if ev[0] in ("down", "lost", "up"):
                if plain and not super()._process(plain):
                    return False
                plain = []
                try:
                    self._cluster_event(ev, self._clock())
                except Exception:
                    log.exception("runtime loop: cluster event %s failed", ev[0])
            else:
                plain.append(ev)
        return super()._process(plain)

    def _cluster_event(self, ev: tuple, now: float) -> None:
        kind = ev[0]
        if kind == "down":
            _, wid, reason, detected = ev
            w = self._workers[wid]
            if not w.alive:
                return
            w.alive, w.down_reason = False, reason
            rec = WorkerDownRecord(wid, reason, detected, now)
            with self._cluster_lock:
                self._down[wid] = rec
                self.cluster.workers_removed += 1
                self.cluster.history.append(rec)
            log.warning("worker %d (%s stage %d) down: %s", wid, w.info.model, w.info.stage,
                        reason)
            w.stop()  # a hung actor must not answer later
            self._apply(w.info.model, self._schedulers[w.info.model].remove_worker(wid, now),
                        now)
        elif kind == "up":
            wid = ev[1]
            w = self._workers[wid]
            with self._cluster_lock:
                rec = self._down.pop(wid, None)
                if rec is not None:
                    rec.readded_us = now
                self.cluster.workers_readded += 1
            self._apply(w.info.model, self._schedulers[w.info.model].add_worker(wid, now), now)
        elif kind == "lost":
            _, d, stage, why, _lost_us = ev
            with self._inflight_lock:
                live = self._inflight.pop((d.model, d.batch_id), None) is not None
            if not live:  # already settled (dropped by remove_worker, answered, failed)
                return
            with self._cluster_lock:
                self.cluster.batches_lost += 1
            for s in range(stage, len(d.route)):  # release what it still holds
                self._inbox.put(("finished", d.model, d.batch_id, s, now))
            failed = d.route[stage].worker_id
            self._retry_or_fail(d.model, d.requests, f"batch {d.batch_id} lost in stage "
                                f"{stage} on worker {failed} ({why})", now)

    def _apply(self, model: str, decisions: Decisions, now: float) -> None:
        failed = [dr for dr in decisions.drops if dr.reason == DropReason.WORKER_FAILED]
        if failed:
            decisions.drops = [dr for dr in decisions.drops
                               if dr.reason != DropReason.WORKER_FAILED]
            ids = {dr.request.request_id for dr in failed}
            with self._inflight_lock:  # their batches are settled here, not by a late report
                for key in [k for k, d in self._inflight.items()
                            if d.model == model and any(r.request_id in ids for r in d.requests)]:
                    del self._inflight[key]
        super()._apply(model, decisions, now)
        if failed:
            self._retry_or_fail(model, [dr.request for dr in failed],
                                failed[0].detail or "worker failed", now)

    def _retry_or_fail(self, model: str, requests, why: str, now: float) -> None:
        sched = self._schedulers[model]
        for r in requests:
            if r.payload.future.done():
                continue
            tries = self._attempts.get(r.request_id, 0)
            if tries < self.max_redispatch and now < r.deadline_us:
                self._attempts[r.request_id] = tries + 1
                with self._cluster_lock:
                    self.cluster.requests_redispatched += 1
                self._apply(model, sched.on_arrival(r, now), now)
            else:
                self._answer_drop(model, r, DropReason.WORKER_FAILED,
                                  why + ("; already re-dispatched" if tries else ""))

    def _answer_drop(self, model: str, request: Request, reason, detail: str) -> None:
        if request.request_id in self._attempts:
            self._attempts.pop(request.request_id, None)
            if reason != DropReason.SHUTDOWN:  # a re-dispatch that cannot make it any more
                if reason == DropReason.DEADLINE_UNREACHABLE:
                    detail = "re-dispatch after a worker failure cannot meet the deadline"
                reason = DropReason.WORKER_FAILED
        if reason == DropReason.WORKER_FAILED:
            with self._cluster_lock:
                self.cluster.requests_failed += 1
        super()._answer_drop(model, request, reason, detail)

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

