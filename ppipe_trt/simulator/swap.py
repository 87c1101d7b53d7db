"""A plan swap on the simulator's virtual clock: what changes hands at the switch instant.

The same semantics as the live runtime (``ppipe_trt.serving``): the new plan is placed on
the served cluster with :func:`~ppipe_trt.scheduler.carry_over.carry_over` (kept workers
keep their ids, GPU shares and queues; added workers get fresh ids; retired workers finish
what is reserved on them and get nothing new); at the switch instant, per model, the old
scheduler's queued requests move to the new one with their original arrival and deadline
(:meth:`~ppipe_trt.scheduler.interface.Scheduler.take_queued`), every kept worker is held
in the new scheduler until the old one's last reservation on it ends, and every added worker
placed on a retiring worker's GPU share until those retiring workers' last reservations end.
Later arrivals go to the new schedulers; finishes of batches dispatched before the switch go
to the old ones.

Added workers start (engine load and warm-up) *before* the switch: a swap asked for at ``t``
switches at ``t + solve_s + worker_startup_s`` (:class:`SwapCosts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ppipe_trt.errors import ConfigError
from ppipe_trt.plan import Plan
from ppipe_trt.scheduler.carry_over import CarryOver
from ppipe_trt.scheduler.interface import Request, Scheduler
from ppipe_trt.scheduler.placement import Placement

#: Open + warm-up of one ONNX Runtime stage engine of the demo model (demo_resnet, whole
#: model, blocks 0..9, batch 1 and 8, one intra-op thread) on the 2-core development machine,
#: median of 5 (scripts/measure_worker_startup.py, 2026-11-30): 43 ms; the other block
#: ranges took 9-29 ms.  Stage workers of one swap start in parallel, so one figure is the
#: swap's start-up.
MEASURED_ORT_STARTUP_S = 0.043


@dataclass(frozen=True, slots=True)
class SwapCosts:
    """Time from deciding a swap to its switch instant.

    ``solve_s``: the MILP's solve time; ``None`` takes the measured wall time of each solve
    (a plan served from the cache costs what its first solve did), a number fixes it (runs
    are then reproducible).  ``worker_startup_s``: added workers' engine load and warm-up
    before the switch (default: measured, :data:`MEASURED_ORT_STARTUP_S`)."""

    solve_s: float | None = None
    worker_startup_s: float = MEASURED_ORT_STARTUP_S

    def __post_init__(self) -> None:
        if self.solve_s is not None and self.solve_s < 0:
            raise ConfigError(f"solve_s must be >= 0 or None, got {self.solve_s!r}")
        if self.worker_startup_s < 0:
            raise ConfigError(f"worker_startup_s must be >= 0, got {self.worker_startup_s!r}")

    def delay_s(self, measured_solve_s: float) -> float:
        """Seconds from the decision to the switch, given the solve's measured wall time."""
        solve = measured_solve_s if self.solve_s is None else self.solve_s
        return solve + self.worker_startup_s


@dataclass(frozen=True, slots=True)
class PlanSwap:
    """Switch to ``plan`` at ``at_us`` (virtual clock); it was asked for at ``decided_us``."""

    at_us: float
    plan: Plan
    decided_us: float = 0.0
    reason: str = ""


@dataclass(frozen=True, slots=True)
class SwapRecord:
    """What one swap did.  ``plan_index``: the plan's index in the run's plans (0 is the
    first plan); ``moved``: queued requests handed to the new schedulers; ``held_us``: the
    latest time a kept or added worker was held until (old reservations still on it);
    ``added_ids`` / ``retired_ids``: the workers started / retired (ids are never reused)."""

    at_us: float
    decided_us: float
    plan_index: int
    kept: int
    added: int
    retired: int
    moved: int
    held_us: float
    reason: str = ""
    added_ids: tuple[int, ...] = ()
    retired_ids: tuple[int, ...] = ()


def hand_over(old: Mapping[str, Scheduler], new: Mapping[str, Scheduler],
              old_placement: Placement, carry: CarryOver, now_us: float
              ) -> tuple[dict[str, list[Request]], float]:
    """Move the old schedulers' queues and worker reservations to the new ones at ``now_us``.

    Returns, per model, the requests taken from the old scheduler's queue (deadline order;
    the caller gives them to the new scheduler's ``on_arrivals``), and the latest time a
    worker was held until.  Raises :class:`ConfigError` if the plans serve different models
    or a policy cannot hand its queue over."""
    if set(old) != set(new):
        raise ConfigError(f"a plan swap keeps the served models: old plan serves "
                          f"{sorted(old)}, new plan {sorted(new)}")
    for m, s in old.items():
        if not s.swappable:
            raise ConfigError(f"{m}: the {type(s).__name__} policy cannot hand its queue over "
                              "(a plan swap needs the reservation policy)")
    queued = {m: old[m].take_queued(now_us) for m in old}
    owner = {w.worker_id: old[w.model] for w in old_placement.workers}
    held = now_us
    for wid in carry.kept:
        until = owner[wid].reserved_until(wid)   # type: ignore[attr-defined]
        new[carry.placement.worker(wid).model].hold_worker(wid, until)
        held = max(held, until)
    for wid, waited in carry.waits.items():
        until = max(owner[r].reserved_until(r) for r in waited)   # type: ignore[attr-defined]
        new[carry.placement.worker(wid).model].hold_worker(wid, until)
        held = max(held, until)
    return queued, held
