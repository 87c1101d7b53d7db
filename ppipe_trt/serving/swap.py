"""Swapping the plan of a serving runtime, with no request lost.

A swap has two halves:

1. :func:`prepare_swap` (any thread but the loop's; may take seconds): place the new plan on
   the cluster keeping every worker whose role persists
   (:func:`~ppipe_trt.scheduler.carry_over.carry_over`), build the new plan's schedulers on
   the same link timelines and batch-id counter (:meth:`ClusterState.successor`), and build
   and *start* the added workers (their engines are opened and warmed up here, before the
   switch; an added worker that gets no job yet costs nothing).
2. The switch, on the loop thread (:class:`SwapPlan`, posted by
   :meth:`~ppipe_trt.serving.runtime.ServingRuntime.swap`; :func:`apply_swap`): every old
   scheduler hands over its queued requests (with their deadlines) to the new one; a kept
   worker is held in the new scheduler until its last old reservation ends, an added worker
   on the GPU of retiring workers until theirs end (no GPU share runs two plans' batches at
   once); from this instant arrivals go to the new schedulers.  Batches already dispatched
   finish on the old workers and are answered; their finishes go to the old schedulers (batch
   ids below the swap's first id).  When the old schedulers have no batch left in flight,
   the retired workers stop (:func:`retire_drained`).

Every accepted request is answered once: it is either in a dispatched batch (answered by
its last stage) or in a queue that moves as a whole.  Plan swaps need a policy that can hand
its queue over (``Scheduler.swappable``: the reservation policy).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

from ppipe_trt.errors import PlanSwapError
from ppipe_trt.plan import Plan
from ppipe_trt.scheduler.carry_over import CarryOver, carry_over
from ppipe_trt.scheduler.interface import Scheduler
from ppipe_trt.scheduler.placement import Placement
from ppipe_trt.scheduler.tables import ClusterState
from ppipe_trt.serving.events import LoopEvent

if TYPE_CHECKING:
    from ppipe_trt.serving.handle import WorkerHandle
    from ppipe_trt.serving.runtime import ServingRuntime
    from ppipe_trt.serving.specs import WorkerSpec

log = logging.getLogger("ppipe.serving")

#: How long a swap waits for the previous swap's old plan to drain (its batches finish
#: within their deadlines, normally well under a second).
DRAIN_WAIT_S = 10.0


@dataclass(slots=True)
class Generation:
    """One plan as served: generation ``number`` (0 at start), since ``since_us`` (runtime
    clock), why it came (``reason``), and the workers it kept, added and retired from the
    previous one.  ``first_batch_id``: batches of this plan have ids from it on."""

    number: int
    plan: Plan
    placement: Placement
    state: ClusterState
    since_us: float = 0.0
    reason: str = "initial plan"
    kept: tuple[int, ...] = ()
    added: tuple[int, ...] = ()
    retired: tuple[int, ...] = ()
    waits: dict[int, tuple[int, ...]] = field(default_factory=dict)
    first_batch_id: int = 0
    moved: int = 0
    in_flight_at_switch: int = 0
    prepare_s: float = 0.0
    drained_us: float | None = None

    def to_dict(self, started_us: float) -> dict[str, Any]:
        """JSON-ready (times in seconds since the runtime started)."""
        return {"generation": self.number, "reason": self.reason,
                "since_s": round((self.since_us - started_us) / 1e6, 6) if started_us else 0.0,
                "since_us": self.since_us,
                "workers_kept": list(self.kept), "workers_added": list(self.added),
                "workers_retired": list(self.retired),
                # added workers on a GPU share still held by retiring workers: they start
                # the new plan's batches only after those workers' last batch
                "workers_waiting_for_retiring": {str(k): list(v)
                                                 for k, v in self.waits.items()},
                "requests_moved": self.moved,
                "batches_in_flight_at_switch": self.in_flight_at_switch,
                "prepare_s": round(self.prepare_s, 3),
                "old_plan_drained_s": None if self.drained_us is None else
                round((self.drained_us - started_us) / 1e6, 6)}


@dataclass(frozen=True, slots=True)
class SwapReport:
    """What a swap did.  Times: ``switch_us`` on the runtime clock; ``prepare_s`` to build
    the schedulers and start the added workers; ``switch_ms`` from the call of
    :meth:`~ppipe_trt.serving.runtime.ServingRuntime.swap_plan` to the switch (the first
    request after it goes to the new plan)."""

    generation: int
    reason: str
    switch_us: float
    prepare_s: float
    switch_ms: float
    requests_moved: int
    batches_in_flight: int
    kept: tuple[int, ...]
    added: tuple[int, ...]
    retired: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"generation": self.generation, "reason": self.reason,
                "switch_us": self.switch_us,
                "prepare_s": round(self.prepare_s, 3), "switch_ms": round(self.switch_ms, 3),
                "requests_moved": self.requests_moved,
                "batches_in_flight_at_switch": self.batches_in_flight,
                "workers_kept": list(self.kept), "workers_added": list(self.added),
                "workers_retired": list(self.retired)}


class WorkerBuilder(Protocol):
    """How a runtime's assembly builds workers for a plan swap (local threads, Ray actors)."""

    profiles: Any
    built_models: Mapping[str, Any]

    def specs(self, plan: Plan, placement: Placement,
              worker_ids: Sequence[int]) -> "Sequence[WorkerSpec]":
        """The specs of ``worker_ids`` of ``placement``."""

    def build(self, specs: "Sequence[WorkerSpec]") -> "list[WorkerHandle]":
        """Build the workers (engines opened, not started)."""

    def schedulers(self, plan: Plan, placement: Placement,
                   state: ClusterState) -> dict[str, Scheduler]:
        """The schedulers of ``plan`` on ``placement``, sharing ``state``."""


@dataclass(slots=True)
class PreparedSwap:
    """A new plan ready to be switched to (see :func:`prepare_swap`)."""

    base: int                     # the generation it was prepared against
    plan: Plan
    carry: CarryOver
    state: ClusterState
    schedulers: dict[str, Scheduler]
    workers: list
    reason: str
    prepare_s: float
    asked_at: float = 0.0         # perf_counter() when the swap was asked for
    future: Future = field(default_factory=Future)


class SwapPlan(LoopEvent):
    """Switch to a prepared plan (handled on the loop thread by :func:`apply_swap`)."""

    __slots__ = ("prepared",)

    def __init__(self, prepared: PreparedSwap):
        self.prepared = prepared


def prepare_swap(rt: "ServingRuntime", plan: Plan, reason: str) -> PreparedSwap:
    """Build what the switch to ``plan`` needs and start the added workers (see the module
    docstring).  Raises :class:`PlanSwapError` (or :class:`ConfigError` from the placement)
    when ``plan`` cannot replace the plan in force."""
    t0 = time.perf_counter()
    builder = rt.builder
    if builder is None or rt.generation is None:
        raise PlanSwapError("this runtime was assembled without a worker builder and a "
                            "placement; plan swaps need build_runtime (or the Ray assembly)")
    # The carry-over places the new plan against the plan in force only: wait until an
    # earlier plan's batches are done (their retiring workers then hold no GPU share).
    deadline = t0 + DRAIN_WAIT_S
    while rt.generation.number > 0 and rt.generation.drained_us is None:
        if time.perf_counter() > deadline:
            raise PlanSwapError(f"the previous plan (generation {rt.generation.number - 1}) "
                                f"still has batches in flight after {DRAIN_WAIT_S:.0f} s; "
                                "try again")
        time.sleep(0.005)
    gen = rt.generation
    if set(plan.model_names) != set(rt.models):
        raise PlanSwapError(f"the new plan serves {sorted(plan.model_names)}, the server "
                            f"{sorted(rt.models)}; a plan swap keeps the models (load and "
                            "unload models by restarting with another repository)")
    for m in plan.models:
        if abs(m.slo_ms * 1000.0 - rt.models[m.model].slo_us) > 1e-6:
            raise PlanSwapError(f"{m.model}: the new plan's SLO is {m.slo_ms} ms, the served "
                                f"model's {rt.models[m.model].slo_us / 1000.0} ms")
    for model in rt.models:
        if not rt.scheduler(model).swappable:
            raise PlanSwapError(f"the {rt.info.get('policy', '?')!r} policy cannot hand its "
                                "queue over to a new plan; plan swaps need 'reservation'")
    carry = carry_over(plan, gen.placement, rt.next_worker_id())
    state = gen.state.successor(carry.placement)
    schedulers = builder.schedulers(plan, carry.placement, state)
    specs = builder.specs(plan, carry.placement, carry.added)
    workers = builder.build(specs)
    try:
        for w in workers:
            w.start()
    except BaseException:
        for w in workers:
            w.stop(0.0)
        raise
    return PreparedSwap(gen.number, plan, carry, state, schedulers, workers, reason,
                        time.perf_counter() - t0)


def apply_swap(rt: "ServingRuntime", prepared: PreparedSwap, now: float) -> SwapReport:
    """The switch (loop thread): see the module docstring."""
    gen = rt.generation
    if prepared.base != gen.number:
        raise PlanSwapError(f"the plan changed (generation {gen.number}) since this swap was "
                            f"prepared against generation {prepared.base}; prepare it again")
    loop = rt.decision_loop
    old = {m: loop.scheduler(m) for m in rt.models}
    new = prepared.schedulers
    carry = prepared.carry
    first_batch_id = next(prepared.state.batch_ids)
    queued = {m: old[m].take_queued(now) for m in old}
    in_flight = sum(s.batches_in_flight for s in old.values()) + loop.old_batches_in_flight()
    # No GPU share runs two plans' batches at once: a kept worker and an added worker on a
    # retiring worker's GPU start the new plan's batches after the old ones reserved there.
    for wid in carry.kept:
        slot = carry.placement.worker(wid)
        new[slot.model].hold_worker(wid, loop.reserved_until(slot.model, wid))
    for wid, waited in carry.waits.items():
        slot = carry.placement.worker(wid)
        until = max(loop.reserved_until(gen.placement.worker(w).model, w) for w in waited)
        new[slot.model].hold_worker(wid, until)
    for w in prepared.workers:
        rt.register_worker(w)
    for wid in carry.kept:   # a kept worker may sit at another pipeline / stage index
        rt.worker(wid).info = carry.placement.worker(wid)
    loop.swap_schedulers(new, first_batch_id)
    moved = sum(len(q) for q in queued.values())
    rt.generation = Generation(gen.number + 1, prepared.plan, carry.placement, prepared.state,
                               now, prepared.reason, carry.kept, carry.added, carry.retired,
                               dict(carry.waits), first_batch_id, moved, in_flight,
                               prepared.prepare_s)
    rt.history.append(rt.generation)
    rt.plan_switched(prepared.plan, first_batch_id)
    for m, reqs in queued.items():
        if reqs:
            loop.apply(m, new[m].on_arrivals(reqs, now), now)
    switch_ms = (time.perf_counter() - prepared.asked_at) * 1e3 if prepared.asked_at else 0.0
    log.info("plan generation %d in force (%s): %d workers kept, %d added, %d retiring; "
             "%d queued requests moved, %d batches in flight", rt.generation.number,
             prepared.reason, len(carry.kept), len(carry.added), len(carry.retired), moved,
             in_flight)
    retire_drained(rt, now)
    return SwapReport(rt.generation.number, prepared.reason, now, prepared.prepare_s,
                      switch_ms, moved, in_flight, carry.kept, carry.added, carry.retired)


def retire_drained(rt: "ServingRuntime", now: float) -> None:
    """Once every older plan's batches are finished: stop the workers no plan in force
    uses (loop thread; a worker with a thread is stopped on another thread)."""
    loop = rt.decision_loop
    if loop.old_batches_in_flight():
        return
    loop.forget_old_schedulers()
    in_force = set(rt.generation.placement.worker_ids)
    leaving = [w for w in rt.workers if w.worker_id not in in_force]
    if rt.generation.drained_us is None and rt.generation.number > 0:
        rt.generation.drained_us = now
    if not leaving:
        return
    for w in leaving:
        rt.unregister_worker(w.worker_id)
        rt.transport.unregister(w.worker_id)
    threaded = [w for w in leaving if not getattr(w, "threadless", False)]
    for w in leaving:
        if getattr(w, "threadless", False):
            _stop_retired(rt, w)
    if threaded:
        threading.Thread(target=lambda: [_stop_retired(rt, w) for w in threaded],
                         name="ppipe-retire", daemon=True).start()


def _stop_retired(rt: "ServingRuntime", w) -> None:
    left = w.stop()
    if left:   # cannot happen once its scheduler is empty; say so if it does
        log.error("retired worker %d still held %d jobs", w.worker_id, len(left))
        for job in left:
            rt.batch_failed(job, PlanSwapError("worker retired by a plan swap"), rt.now_us())


__all__ = ["Generation", "PlanSwapError", "PreparedSwap", "SwapPlan", "SwapReport",
           "WorkerBuilder", "apply_swap", "prepare_swap", "retire_drained"]
