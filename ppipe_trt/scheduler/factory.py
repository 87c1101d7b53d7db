"""Build one scheduler per model of a plan, all sharing one :class:`ClusterState`."""

from __future__ import annotations

from typing import Any, Mapping

from ppipe_trt.errors import ConfigError
from ppipe_trt.plan import Plan
from ppipe_trt.profiles.types import ProfileSet
from ppipe_trt.scheduler.baselines import ReactiveScheduler, TritonScheduler
from ppipe_trt.scheduler.interface import Scheduler
from ppipe_trt.scheduler.native import NativeReservationScheduler
from ppipe_trt.scheduler.placement import Placement
from ppipe_trt.scheduler.reservation import ReservationScheduler
from ppipe_trt.scheduler.tables import ClusterState, build_pipeline_tables

POLICIES = ("reservation", "reactive", "triton")


def build_schedulers(plan: Plan, profiles: ProfileSet, placement: Placement,
                     policy: str = "reservation", *, hop_overhead_us: float = 0.0,
                     state: ClusterState | None = None, link_model: str = "duplex",
                     **kw: Any) -> Mapping[str, Scheduler]:
    """One scheduler per model of ``plan``, keyed by model name.

    All of them share one :class:`ClusterState` (link reservations, batch ids): pass
    ``state`` to reuse one, else a fresh one is made (reach it as ``sched.cluster_state``).
    ``hop_overhead_us`` is added to every network transfer (the live server feeds it from
    measurement).  ``link_model`` (see :data:`~ppipe_trt.scheduler.links.LINK_MODELS`):
    ``"duplex"`` reserves the sender's uplink and the receiver's downlink for a transfer,
    ``"sender"`` only the sender's uplink, ``"channel"`` only the sending worker's channel
    (the public artifact's exact semantics, see :func:`~ppipe_trt.scheduler.tables.
    sender_channels`); a given ``state`` must
    have been made with the same model.  Further keywords go to the policy: ``wake_lead_us``,
    ``strict_batch_fraction``, ``max_queue``, ``work_conserving`` (+ ``_max_load``,
    ``_window_us``) (reservation); ``max_queue_delay_us`` (triton).
    """
    if policy not in POLICIES:
        raise ConfigError(f"unknown scheduling policy {policy!r}; expected one of {POLICIES}")
    if state is None:
        state = ClusterState(placement, hop_overhead_us, link_model)
    elif state.link_model != link_model:
        raise ConfigError(f"the given cluster state uses link model {state.link_model!r} but "
                          f"link_model={link_model!r} was asked for; pass the same one")
    out: dict[str, Scheduler] = {}
    for m in plan.models:
        tables = build_pipeline_tables(plan, m, profiles, placement, hop_overhead_us)
        if policy == "reservation":
            allowed = {"wake_lead_us", "strict_batch_fraction", "max_queue", "work_conserving",
                       "work_conserving_max_load", "work_conserving_window_us",
                       "work_conserving_min_gain"}
            _check_kw(kw, allowed, policy)
            cls = NativeReservationScheduler() if state.native else ReservationScheduler
            sched: Scheduler = cls(m.model, tables, state, **kw)
        elif policy == "reactive":
            _check_kw(kw, set(), policy)
            sched = ReactiveScheduler(m.model, tables, state)
        else:
            _check_kw(kw, {"max_queue_delay_us"}, policy)
            sched = TritonScheduler(m.model, tables, state, **kw)
        sched.cluster_state = state  # type: ignore[attr-defined]
        out[m.model] = sched
    return out


def _check_kw(kw: Mapping[str, Any], allowed: set[str], policy: str) -> None:
    bad = set(kw) - allowed
    if bad:
        raise ConfigError(f"policy {policy!r} takes no option(s) {sorted(bad)}; "
                          f"it takes {sorted(allowed) or 'none'}")
