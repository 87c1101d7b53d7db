"""Baseline policies behind the same :class:`Scheduler` interface, for comparison.

* :class:`ReactiveScheduler` (Nexus-like): no reservations.  Every stage pool of every
  pipeline has a queue; whenever one of its workers is idle it takes what the queue holds, up
  to the planned batch, and runs it; finished requests move on to the next stage's queue.
  Requests that cannot finish by their deadline even alone are dropped when picked.  A
  dispatch here covers *one* stage (``route`` has one :class:`StageReservation` whose
  ``stage`` may be > 0; its inputs are wherever the previous stage ran them).
* :class:`TritonScheduler` (Triton's dynamic batcher): one queue per model; a batch is formed
  when an instance (a stage-0 worker) is idle and either the planned batch is full or the
  oldest request has waited ``max_queue_delay_us``; it then runs through the pipeline on the
  least-loaded worker of each later stage.  Requests past their deadline are dropped from the
  queue (Triton's queue-policy timeout); nothing is reserved and links are ignored.

Times in the returned reservations are the policy's estimates; the caller runs stages as
soon as their inputs and workers are ready.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

from ppipe_trt.errors import SchedulerError
from ppipe_trt.scheduler.interface import (Decisions, Dispatch, Drop, DropReason, Request,
                                           Scheduler, StageReservation)
from ppipe_trt.scheduler.tables import ClusterState, PipelineTable, with_stage_latency


class _PoolPolicy(Scheduler):
    """Shared bookkeeping: per stage pool its idle workers and outstanding batch counts."""

    def __init__(self, model: str, pipelines: Sequence[PipelineTable], state: ClusterState):
        self.model = model
        self.pipelines = tuple(pipelines)
        self._state = state
        self._idle: list[list[list[int]]] = [[list(st.worker_ids) for st in pt.stages]
                                             for pt in self.pipelines]
        self._load: dict[int, int] = {w: 0 for pt in self.pipelines for st in pt.stages
                                      for w in st.worker_ids}
        self._where: dict[int, tuple[int, int]] = {w: (p, s) for p, pt in enumerate(self.pipelines)
                                                   for s, st in enumerate(pt.stages)
                                                   for w in st.worker_ids}
        self._dead: set[int] = set()
        self._batches: dict[int, list] = {}
        self._wake_at: float | None = None
        self._rest1 = self._remaining_work()

    def _remaining_work(self) -> list[list[float]]:
        """Per pipeline and stage: the work (us) of one request from that stage to the end,
        at batch 1."""
        return [[sum(st.latency_us[1] + st.transfer_in_us[1]
                     for k, st in enumerate(pt.stages) if k >= s)
                 for s in range(len(pt.stages))] for pt in self.pipelines]

    calibratable = True

    def set_stage_latency(self, pipeline: int, stage: int, latency_us: Sequence[float]) -> None:
        self.pipelines = with_stage_latency(self.pipelines, pipeline, stage, latency_us)
        self._rest1 = self._remaining_work()

    def _check_worker(self, worker_id: int) -> tuple[int, int]:
        if worker_id not in self._where:
            raise SchedulerError(f"{self.model}: worker {worker_id} does not serve this model")
        return self._where[worker_id]

    def remove_worker(self, worker_id: int, now_us: float) -> Decisions:
        p, s = self._check_worker(worker_id)
        self._dead.add(worker_id)
        if worker_id in self._idle[p][s]:
            self._idle[p][s].remove(worker_id)
        dec = Decisions()
        for bid in [b for b, rec in self._batches.items() if worker_id in rec[2][rec[4]:]]:
            for r in self._batches.pop(bid)[1]:
                dec.drops.append(Drop(r, DropReason.WORKER_FAILED, f"worker {worker_id} failed"))
        self._pump(now_us, dec)
        return dec

    def add_worker(self, worker_id: int, now_us: float) -> Decisions:
        p, s = self._check_worker(worker_id)
        self._dead.discard(worker_id)
        if worker_id not in self._idle[p][s]:
            self._idle[p][s].append(worker_id)
        self._load[worker_id] = 0
        dec = Decisions()
        self._pump(now_us, dec)
        return dec

    def on_wake(self, now_us: float) -> Decisions:
        dec = Decisions()
        self._pump(now_us, dec)
        return dec

    def _pump(self, now: float, dec: Decisions) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class ReactiveScheduler(_PoolPolicy):
    """Nexus-like per-pool batcher without reservations (see the module docstring)."""

    def __init__(self, model: str, pipelines: Sequence[PipelineTable], state: ClusterState):
        super().__init__(model, pipelines, state)
        self._front: deque[Request] = deque()
        self._queues: list[list[deque]] = [[deque() for _ in pt.stages] for pt in self.pipelines]
        self._rr = 0

    def on_arrival(self, request: Request, now_us: float) -> Decisions:
        self._front.append(request)
        dec = Decisions()
        self._pump(now_us, dec)
        return dec

    def on_stage_finished(self, batch_id: int, stage: int, finish_us: float,
                          now_us: float) -> Decisions:
        rec = self._batches.pop(batch_id, None)
        if rec is None:
            raise SchedulerError(f"{self.model}: finish reported for unknown batch {batch_id}")
        p, reqs, wids = rec[0], rec[1], rec[2]
        wid = wids[0]
        if wid not in self._dead:
            self._idle[p][stage].append(wid)
        if stage + 1 < len(self.pipelines[p].stages):
            self._queues[p][stage + 1].extend(reqs)
        dec = Decisions()
        self._pump(now_us, dec)
        return dec

    def drain(self, now_us: float) -> Decisions:
        dec = Decisions()
        for q in [self._front] + [q for qs in self._queues for q in qs[1:]]:
            while q:
                dec.drops.append(Drop(q.popleft(), DropReason.SHUTDOWN, "server stopping"))
        return dec

    def _pump(self, now: float, dec: Decisions) -> None:
        # later stages first: they hold requests that already used GPU time
        for p, pt in enumerate(self.pipelines):
            for s in range(len(pt.stages) - 1, 0, -1):
                q = self._queues[p][s]
                while q and self._idle[p][s]:
                    self._start(p, s, q, now, dec)
        q = self._front
        npipes = len(self.pipelines)
        while q:
            for k in range(npipes):
                p = (self._rr + k) % npipes
                if self._idle[p][0]:
                    break
            else:
                break
            self._rr = (p + 1) % npipes
            self._start(p, 0, q, now, dec)
        if self._front and not any(self._idle[p][0] for p in range(npipes)):
            # nothing can start: drop what can no longer make it anywhere
            best = min(r[0] for r in self._rest1)
            while q and q[0].deadline_us < now + best:
                dec.drops.append(Drop(q.popleft(), DropReason.DEADLINE_UNREACHABLE,
                                      "queued past its last start time"))

    def _start(self, p: int, s: int, q: deque, now: float, dec: Decisions) -> None:
        pt = self.pipelines[p]
        st = pt.stages[s]
        rest = self._rest1[p][s]
        reqs = []
        while q and len(reqs) < pt.planned_batch:
            r = q.popleft()
            if r.deadline_us < now + rest:
                dec.drops.append(Drop(r, DropReason.DEADLINE_UNREACHABLE,
                                      f"stage {s} cannot finish it by its deadline"))
            else:
                reqs.append(r)
        if not reqs:
            return
        wid = self._idle[p][s].pop(0)
        b = len(reqs)
        ts = now
        te = now + st.transfer_in_us[b]
        bid = next(self._state.batch_ids)
        route = (StageReservation(s, wid, te, te + st.latency_us[b], ts, te),)
        self._batches[bid] = [p, tuple(reqs), [wid], [te + st.latency_us[b]], 0]
        dec.dispatches.append(Dispatch(bid, self.model, p, tuple(reqs), route))


class TritonScheduler(_PoolPolicy):
    """Triton-style dynamic batcher over whole pipelines (see the module docstring)."""

    def __init__(self, model: str, pipelines: Sequence[PipelineTable], state: ClusterState,
                 max_queue_delay_us: float = 1000.0):
        super().__init__(model, pipelines, state)
        if max_queue_delay_us < 0:
            raise SchedulerError(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}")
        self.max_queue_delay_us = float(max_queue_delay_us)
        self._queue: deque[Request] = deque()
        self._rr = 0

    def on_arrival(self, request: Request, now_us: float) -> Decisions:
        self._queue.append(request)
        dec = Decisions()
        self._pump(now_us, dec)
        return dec

    def on_stage_finished(self, batch_id: int, stage: int, finish_us: float,
                          now_us: float) -> Decisions:
        rec = self._batches.get(batch_id)
        if rec is None:
            raise SchedulerError(f"{self.model}: finish reported for unknown batch {batch_id}")
        p, wids = rec[0], rec[2]
        wid = wids[stage]
        self._load[wid] -= 1
        if stage == 0 and wid not in self._dead:
            self._idle[p][0].append(wid)
        rec[4] = stage + 1
        if stage == len(wids) - 1:
            del self._batches[batch_id]
        dec = Decisions()
        self._pump(now_us, dec)
        return dec

    def drain(self, now_us: float) -> Decisions:
        dec = Decisions()
        while self._queue:
            dec.drops.append(Drop(self._queue.popleft(), DropReason.SHUTDOWN, "server stopping"))
        self._wake_at = None
        return dec

    def _pump(self, now: float, dec: Decisions) -> None:
        q = self._queue
        self._wake_at = None
        while q and q[0].deadline_us < now:
            dec.drops.append(Drop(q.popleft(), DropReason.DEADLINE_UNREACHABLE,
                                  "timed out in the queue"))
        npipes = len(self.pipelines)
        while q:
            for k in range(npipes):
                p = (self._rr + k) % npipes
                if self._idle[p][0]:
                    break
            else:
                break
            pt = self.pipelines[p]
            if len(q) < pt.planned_batch and now < q[0].arrival_us + self.max_queue_delay_us:
                self._wake_at = q[0].arrival_us + self.max_queue_delay_us
                break
            self._rr = (p + 1) % npipes
            reqs = tuple([q.popleft() for _ in range(min(len(q), pt.planned_batch))])
            b = len(reqs)
            route = []
            t = now
            for s, st in enumerate(pt.stages):
                if s == 0:
                    wid = self._idle[p][0].pop(0)
                else:
                    live = [w for w in st.worker_ids if w not in self._dead]
                    if not live:
                        for r in reqs:
                            dec.drops.append(Drop(r, DropReason.NO_WORKERS,
                                                  f"stage {s} of pipeline {p} has no worker"))
                        return
                    wid = min(live, key=self._load.__getitem__)
                ts, te = t, t + st.transfer_in_us[b]
                t = te + st.latency_us[b]
                self._load[wid] += 1
                route.append(StageReservation(s, wid, te, t, ts, te))
            bid = next(self._state.batch_ids)
            self._batches[bid] = [p, reqs, [r.worker_id for r in route],
                                  [r.finish_us for r in route], 0]
            dec.dispatches.append(Dispatch(bid, self.model, p, reqs, tuple(route)))
        dec.wake_at_us = self._wake_at
