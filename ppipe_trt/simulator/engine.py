"""The cluster simulator: a discrete-event loop driving the real schedulers on a virtual clock.

Events sit in one heap of plain tuples ``(time_us, seq, kind, a, b)``; ``seq`` breaks ties
in insertion order, so a run is a pure function of its inputs and seed.  Kinds: a model's
next arrival, a scheduler's wake-up (stale ones are skipped by a per-model token), a
stage finishing on a worker, a transfer finishing, and -- in runs that change plans
(:func:`run_events` with ``swaps`` or a ``controller``) -- a controller's window tick and a
plan swap's switch instant (see :mod:`.swap`: each dispatched batch remembers the plan's
scheduler and tables it came from, so its finishes go back there; worker ids stay unique
across plans, so a kept worker keeps its queue).

Physical model (the truth the scheduler's reservations are checked against):

* a worker runs the batches handed to it one at a time, in the order they are handed over,
  each as soon as its input is there; a stage of ``b`` samples takes the profiled latency of
  its block range at batch ``b`` and the worker's MPS share, optionally times a log-normal
  factor of mean 1 and coefficient of variation ``latency_cv`` (GPU kernel times are
  right-skewed and never negative; a log-normal is the usual fit);
* a hand-off between two servers occupies the sender's uplink and the receiver's downlink for
  ``bytes_per_sample * b * 8 / bandwidth`` (+ ``hop_overhead_us``), starting when both are
  free; a hand-off within a server is free.  With ``link_model="sender"`` (the public
  artifact's model) it occupies only the sender's uplink: receivers' downlinks are not
  contended; with ``link_model="channel"`` (the artifact's exact semantics) it occupies only
  the sending worker's channel (a FIFO of ``gpus_per_server * mps_share`` consecutive workers
  of the sending stage, see :func:`~ppipe_trt.scheduler.tables.sender_channels`), so
  transfers of different channels never contend, even from one server (the schedulers are
  built with the same link model and share its cluster state).
"""

from __future__ import annotations

import gc
import heapq
import math
import random
import time
from bisect import bisect_left, insort
from collections import deque
from operator import itemgetter
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np

from ppipe_trt.errors import ConfigError
from ppipe_trt.plan import Plan
from ppipe_trt.profiles.types import ProfileSet
from ppipe_trt.scheduler import build_schedulers, place_workers
from ppipe_trt.scheduler.carry_over import carry_over
from ppipe_trt.scheduler.interface import Request, Scheduler
from ppipe_trt.scheduler.links import LINK_MODELS
from ppipe_trt.scheduler.placement import Placement
from ppipe_trt.scheduler.tables import ClusterState, build_pipeline_tables
from ppipe_trt.simulator.arrivals import ArrivalSpec, arrival_times_us
from ppipe_trt.simulator.metrics import SimResult, summarise_run
from ppipe_trt.simulator.swap import PlanSwap, SwapRecord, hand_over

_ARRIVAL, _WAKE, _DONE, _XFER, _TICK, _SWAP = 0, 1, 2, 3, 4, 5
_OK, _LATE, _PENDING = "ok", "late", None
_slot_key = itemgetter(5, 6)


@dataclass(frozen=True, slots=True)
class SimConfig:
    """One simulation run.  ``rates_rps`` overrides the offered rate per model (at load 1.0);
    by default it is the plan's own throughput per model."""

    load_factor: float = 1.0
    duration_s: float = 30.0
    warmup_s: float = 2.0
    arrivals: ArrivalSpec = ArrivalSpec("poisson")
    policy: str = "reservation"
    seed: int = 0
    latency_cv: float = 0.0
    hop_overhead_us: float = 0.0
    rates_rps: Mapping[str, float] | None = None
    policy_options: Mapping[str, object] | None = None
    link_model: str = "duplex"


class SwapController(Protocol):
    """Decides plan swaps from arrival counts on the virtual clock (see
    :mod:`ppipe_trt.simulator.adaptive`).  The engine calls :meth:`on_window` every
    ``window_us`` with each model's cumulative arrival count, and :meth:`on_swapped` when a
    swap it asked for (or a scripted one) has switched."""

    window_us: float

    def on_window(self, now_us: float, counts: Mapping[str, int]) -> PlanSwap | None: ...

    def on_swapped(self, plan: Plan, now_us: float) -> None: ...


@dataclass(slots=True)
class EventRun:
    """The raw outcome of :func:`run_events` (summarised by
    :func:`~ppipe_trt.simulator.metrics.summarise_run` or the adaptive module).  Per request (index = request id): ``req_model`` (model index),
    ``req_arrival`` (us), ``outcome`` (``"ok"``, ``"late"``, a drop reason, or ``None`` if
    unresolved), ``finish_at`` (us).  Per worker id: ``busy`` intervals and ``waits``;
    ``slots`` every worker that ever ran (by id).  ``answered_twice`` counts requests
    resolved more than once (always 0 unless the engine or a scheduler is wrong);
    ``dispatch_log`` (only with ``record=True``): ``(time_us, plan_index, Dispatch)``.
    :func:`~ppipe_trt.simulator.metrics.summarise_run` turns it into a :class:`SimResult`."""

    plans: list
    req_model: list
    req_arrival: list
    outcome: list
    finish_at: list
    batch_sizes: list
    busy: list
    waits: list
    slots: dict
    gpus_per_class: dict
    events: int
    swaps: list
    answered_twice: int
    dispatch_log: list | None


@dataclass(slots=True)
class _Epoch:
    """One model's scheduler under one plan, with that plan's physical tables
    (``lat[pipeline][stage][batch]``, ``xfer`` likewise, ``last[pipeline]``: last stage)."""

    mi: int
    plan_index: int
    sched: Scheduler
    lat: list
    xfer: list
    last: list


def simulate(plan: Plan, profiles: ProfileSet, config: SimConfig = SimConfig(),
             wrap: Callable[[Scheduler], Scheduler] | None = None) -> SimResult:
    """Run ``plan`` under ``config`` and return its metrics (see :mod:`.metrics`).

    ``wrap`` (optional) is applied to each model's scheduler before the run, e.g. to time its
    calls (``scripts/bench_scheduler.py``).
    """
    wall0 = time.perf_counter()
    check_config(config)
    if config.load_factor < 0:
        raise ConfigError(f"load factor must be >= 0, got {config.load_factor}")
    warm_us = config.warmup_s * 1e6
    end_us = warm_us + config.duration_s * 1e6
    rates = {}
    for m in plan.models:
        base = (config.rates_rps or {}).get(m.model, m.throughput_rps)
        rates[m.model] = base * config.load_factor
    arrivals = []
    for mi, m in enumerate(plan.model_names):
        rng = np.random.default_rng([config.seed, mi])
        arrivals.append(arrival_times_us(config.arrivals, rates[m], 0.0, end_us, rng, mi))
    run = run_events(plan, profiles, config, arrivals, end_us, wrap=wrap)
    return summarise_run(plan, config, run, rates, warm_us, end_us,
                         time.perf_counter() - wall0)


def check_config(config: SimConfig) -> None:
    if config.duration_s <= 0 or config.warmup_s < 0:
        raise ConfigError(f"duration must be > 0 and warm-up >= 0 (got {config.duration_s} s, "
                          f"{config.warmup_s} s)")
    if config.link_model not in LINK_MODELS:
        raise ConfigError(f"unknown link model {config.link_model!r}; expected one of "
                          f"{LINK_MODELS}")


def run_events(plan: Plan, profiles: ProfileSet, config: SimConfig,
               arrivals: Sequence[Sequence[float]], end_us: float, *,
               swaps: Sequence[PlanSwap] = (), controller: SwapController | None = None,
               wrap: Callable[[Scheduler], Scheduler] | None = None,
               record: bool = False) -> EventRun:
    """Drive ``plan``'s schedulers over ``arrivals`` (per model in ``plan.model_names``
    order, ascending us) until every event is done; arrivals at or after ``end_us`` are
    not taken.  ``swaps`` are switched at their ``at_us``; ``controller`` (optional) is
    asked every ``controller.window_us`` until ``end_us`` and may ask for more (see
    :mod:`.swap`).  ``config``'s load factor, rates, arrivals and duration are not used
    here (the caller drew ``arrivals``)."""
    # The loop allocates millions of short-lived, acyclic records (stage and transfer
    # items, requests, decisions); the cyclic collector finds nothing in them and cost about
    # 20 % of the run (2026-11-30, 1.8 M requests: 36.9 k requests per CPU second with it,
    # 45.5 k without), so it is paused for the loop and restored after.
    paused = gc.isenabled()
    gc.disable()
    try:
        return _run_events(plan, profiles, config, arrivals, end_us, swaps=swaps,
                           controller=controller, wrap=wrap, record=record)
    finally:
        if paused:
            gc.enable()


def _run_events(plan: Plan, profiles: ProfileSet, config: SimConfig,
                arrivals: Sequence[Sequence[float]], end_us: float, *,
                swaps: Sequence[PlanSwap], controller: SwapController | None,
                wrap: Callable[[Scheduler], Scheduler] | None, record: bool) -> EventRun:
    placement = place_workers(plan)
    state = ClusterState(placement, config.hop_overhead_us, config.link_model)
    models = plan.model_names
    options = dict(config.policy_options or {})
    plans: list[Plan] = [plan]

    def epochs_for(p: Plan, pl: Placement, st: ClusterState, index: int) -> list[_Epoch]:
        if p.model_names != models:
            raise ConfigError(f"a plan swap keeps the served models: {list(models)} are "
                              f"served, the new plan has {list(p.model_names)}")
        scheds = build_schedulers(p, profiles, pl, config.policy,
                                  hop_overhead_us=config.hop_overhead_us, state=st,
                                  link_model=config.link_model, **options)
        out = []
        for mi, m in enumerate(p.models):
            # physical tables: lat[pipeline][stage][batch], xfer[...] likewise (transfer into
            # the stage from another server; a pool's servers all have the pool's bandwidth)
            tables = build_pipeline_tables(p, m, profiles, pl, config.hop_overhead_us,
                                           max_batch=64)
            s = scheds[m.model]
            out.append(_Epoch(mi, index, wrap(s) if wrap else s,
                              [[st_.latency_us for st_ in pt.stages] for pt in tables],
                              [[st_.transfer_in_us for st_ in pt.stages] for pt in tables],
                              [len(pt.stages) - 1 for pt in tables]))
        return out

    cur = epochs_for(plan, placement, state, 0)
    slots: dict = {w.worker_id: w for w in placement.workers}
    nw = max(slots, default=-1) + 1
    w_server = [0] * nw
    for w in placement.workers:
        w_server[w.worker_id] = w.server_id
    # the uplink queue a worker sends on: its server's, or its channel's under "channel"
    w_uplink = dict(state.worker_uplink)

    warm_us = config.warmup_s * 1e6
    slo_us = [m.slo_ms * 1000.0 for m in plan.models]

    # per request state
    req_model: list[int] = []
    req_arrival: list[float] = []
    outcome: list = []
    finish_at: list[float] = []
    location: list[int] = []
    answered_twice = 0
    dispatch_log: list | None = [] if record else None
    swap_log: list[SwapRecord] = []

    # Resources serve their items strictly in the order they were assigned (for the
    # reservation policy that is reservation order, so with exact latencies every stage
    # and transfer runs no later than reserved).  A stage item is
    # [epoch, dispatch, route position, inputs pending, worker, next item, input-ready time,
    # duration];
    # a transfer item [stage item it feeds, src uplink, dst server, duration, ready,
    # slot start, seq].  Under the reservation policy a transfer starts no earlier than its
    # reserved slot (slots may sit in gaps between others), and each link serves transfers
    # in slot order; the baselines' transfers go first come, first served.
    ns, nu = placement.num_servers, len(state.uplinks)
    wq: list[deque] = [deque() for _ in range(nw)]
    uq: list[list] = [[] for _ in range(nu)]   # transfer items sorted by (slot start, seq)
    dq: list[list] = [[] for _ in range(ns)]
    slotted = config.policy == "reservation"  # transfers keep to their reserved slots
    wbusy = [False] * nw
    ubusy = [False] * nu
    dbusy = [False] * ns
    busy: list[list[tuple[float, float]]] = [[] for _ in range(nw)]
    waits: list[list[float]] = [[] for _ in range(nw)]
    batch_sizes: list[dict[int, int]] = [dict() for _ in models]
    wake_token = [0] * len(models)
    wake_time: list[float | None] = [None] * len(models)
    noise = random.Random(config.seed * 1_000_003 + 17)
    cv = config.latency_cv
    sigma = math.sqrt(math.log(1.0 + cv * cv)) if cv > 0 else 0.0
    mu = -0.5 * sigma * sigma
    heap: list = []
    seq = 0
    push = heapq.heappush
    pop = heapq.heappop
    next_arrival = [0] * len(models)
    for mi, times in enumerate(arrivals):
        if len(times) and times[0] < end_us:
            push(heap, (times[0], seq, _ARRIVAL, mi, 0))
            seq += 1
        next_arrival[mi] = 1
    for sw in swaps:
        push(heap, (sw.at_us, seq, _SWAP, sw, 0))
        seq += 1
    if controller is not None:
        push(heap, (controller.window_us, seq, _TICK, 0, 0))
        seq += 1
    events = 0

    # Plan swaps: an added worker placed on the GPU share of retiring workers starts nothing
    # until their queues are empty (``gate``: added id -> retiring ids; ``waiters``: retiring
    # id -> added ids), as the live runtime's GPU share is free only once they stop.
    gate: dict[int, list[int]] = {}
    waiters: dict[int, list[int]] = {}

    def try_worker(wid: int, now: float) -> None:
        nonlocal seq
        if wbusy[wid]:
            return
        q = wq[wid]
        if not q:
            return
        if gate and wid in gate:
            if any(wq[r] for r in gate[wid]):
                return
            del gate[wid]
        si = q[0]
        if si[3]:
            return
        dur = si[7]
        if cv > 0:
            dur *= noise.lognormvariate(mu, sigma)
        wbusy[wid] = True
        busy[wid].append((now, now + dur))
        waits[wid].append(now - si[6])
        push(heap, (now + dur, seq, _DONE, si, 0))
        seq += 1

    def try_transfer_duplex(xi, now: float) -> None:
        nonlocal seq
        src, dst = xi[1], xi[2]
        if (xi[4] and not ubusy[src] and not dbusy[dst] and uq[src][0] is xi
                and dq[dst][0] is xi):
            ubusy[src] = dbusy[dst] = True
            start = xi[5] if xi[5] > now else now
            push(heap, (start + xi[3], seq, _XFER, xi, 0))
            seq += 1

    def try_transfer_sender(xi, now: float) -> None:
        nonlocal seq
        src = xi[1]
        if xi[4] and not ubusy[src] and uq[src][0] is xi:
            ubusy[src] = True
            start = xi[5] if xi[5] > now else now
            push(heap, (start + xi[3], seq, _XFER, xi, 0))
            seq += 1

    # Under the "sender" and "channel" link models the downlink queues stay empty and are
    # never checked (under "channel" the uplink queues are the channels'):
    # the choice is made here once, not per event.
    duplex = config.link_model == "duplex"
    try_transfer = try_transfer_duplex if duplex else try_transfer_sender

    def feed(item, now: float) -> None:
        """An input of ``item`` (a stage or transfer item) has become ready."""
        if len(item) == 7:  # a transfer
            item[4] = True
            try_transfer(item, now)
        else:
            item[3] -= 1
            if not item[3]:
                item[6] = now
                try_worker(item[4], now)

    def start_batch(ep: _Epoch, d, now: float) -> None:
        nonlocal seq
        route = d.route
        b = len(d.requests)
        r0 = route[0]
        if r0.stage == 0 and warm_us <= now < end_us:
            h = batch_sizes[ep.mi]
            h[b] = h.get(b, 0) + 1
        if dispatch_log is not None:
            dispatch_log.append((now, ep.plan_index, d))
        items = []
        lat_p = ep.lat[d.pipeline]
        for pos, r in enumerate(route):
            si = [ep, d, pos, 1 if pos else 0, r.worker_id, None, now, lat_p[r.stage][b]]
            wq[r.worker_id].append(si)
            items.append(si)
        if len(route) > 1:
            xfer_p = ep.xfer[d.pipeline]
            for pos in range(1, len(route)):
                sw = route[pos - 1].worker_id
                src, dst = w_server[sw], w_server[route[pos].worker_id]
                if src == dst:
                    items[pos - 1][5] = items[pos]
                else:
                    src = w_uplink[sw]
                    xi = [items[pos], src, dst, xfer_p[route[pos].stage][b], False,
                          route[pos].transfer_start_us if slotted else now, seq]
                    seq += 1
                    insort(uq[src], xi, key=_slot_key)
                    if duplex:
                        insort(dq[dst], xi, key=_slot_key)
                    items[pos - 1][5] = xi
        if r0.stage > 0:  # inputs sit where the previous stage ran them (reactive policy)
            si = items[0]
            dst = w_server[r0.worker_id]
            per_src: dict[int, int] = {}
            for r in d.requests:
                sw = location[r.request_id]   # the worker that ran the previous stage
                if w_server[sw] != dst:
                    src = w_uplink[sw]
                    per_src[src] = per_src.get(src, 0) + 1
            si[3] = len(per_src)
            row = ep.xfer[d.pipeline][r0.stage]
            for src, n in per_src.items():
                xi = [si, src, dst, row[n], True, now, seq]
                seq += 1
                insort(uq[src], xi, key=_slot_key)
                if duplex:
                    insort(dq[dst], xi, key=_slot_key)
                try_transfer(xi, now)
        try_worker(r0.worker_id, now)

    def apply(ep: _Epoch, dec, now: float) -> None:
        nonlocal seq, answered_twice
        for d in dec.dispatches:
            start_batch(ep, d, now)
        for drop in dec.drops:
            rid = drop.request.request_id
            if outcome[rid] is not _PENDING:
                answered_twice += 1
            outcome[rid] = drop.reason.value
        mi = ep.mi
        if ep is not cur[mi]:
            return   # a retired plan's scheduler has no say in wake-ups
        w = dec.wake_at_us
        if w != wake_time[mi]:
            wake_time[mi] = w
            wake_token[mi] += 1
            if w is not None:
                push(heap, (w if w > now else now, seq, _WAKE, mi, wake_token[mi]))
                seq += 1

    def switch(sw: PlanSwap, now: float) -> None:
        nonlocal cur, placement, state, nw
        carry = carry_over(sw.plan, placement, max(slots) + 1 if slots else 0)
        new_state = state.successor(carry.placement)
        index = len(plans)
        plans.append(sw.plan)
        new = epochs_for(sw.plan, carry.placement, new_state, index)
        old_scheds = {models[e.mi]: e.sched for e in cur}
        new_scheds = {models[e.mi]: e.sched for e in new}
        queued, held = hand_over(old_scheds, new_scheds, placement, carry, now)
        for w in carry.placement.workers:
            slots[w.worker_id] = w
        top = max(slots) + 1
        if top > nw:
            grow = top - nw
            w_server.extend([0] * grow)
            wq.extend(deque() for _ in range(grow))
            wbusy.extend([False] * grow)
            busy.extend([] for _ in range(grow))
            waits.extend([] for _ in range(grow))
            nw = top
        for w in carry.placement.workers:
            w_server[w.worker_id] = w.server_id
        w_uplink.update(new_state.worker_uplink)
        for wid, waited in carry.waits.items():
            busy_ones = [r for r in waited if wq[r]]
            if busy_ones:
                gate[wid] = busy_ones
                for r in busy_ones:
                    waiters.setdefault(r, []).append(wid)
        placement, state, cur = carry.placement, new_state, new
        moved = 0
        for ep in cur:
            wake_token[ep.mi] += 1        # the old scheduler's wake-up is void
            wake_time[ep.mi] = None
            q = queued[models[ep.mi]]
            moved += len(q)
            if q:
                apply(ep, ep.sched.on_arrivals(q, now), now)
        swap_log.append(SwapRecord(now, sw.decided_us, index, len(carry.kept),
                                   len(carry.added), len(carry.retired), moved, held,
                                   sw.reason, tuple(carry.added), tuple(carry.retired)))
        if controller is not None:
            controller.on_swapped(sw.plan, now)

    while heap:
        now, _, kind, a, b = pop(heap)
        events += 1
        if kind == _DONE:
            ep, d, pos, _, wid, nxt, _, _ = a
            wbusy[wid] = False
            wq[wid].popleft()
            try_worker(wid, now)
            if waiters and not wq[wid] and wid in waiters:   # a retiring worker has stopped
                for w in waiters.pop(wid):
                    try_worker(w, now)
            r = d.route[pos]
            if nxt is not None:
                feed(nxt, now)
            elif r.stage == ep.last[d.pipeline]:  # the requests are done
                for q in d.requests:
                    rid = q.request_id
                    if outcome[rid] is not _PENDING:
                        answered_twice += 1
                    finish_at[rid] = now
                    outcome[rid] = _OK if now <= q.deadline_us else _LATE
            else:  # a one-stage dispatch of a multi-stage pipeline (reactive)
                for q in d.requests:
                    location[q.request_id] = wid
            apply(ep, ep.sched.on_stage_finished(d.batch_id, r.stage, now, now), now)
        elif kind == _ARRIVAL:
            mi = a
            rid = len(req_model)
            req_model.append(mi)
            req_arrival.append(now)
            outcome.append(_PENDING)
            finish_at.append(0.0)
            location.append(-1)
            req = Request(rid, models[mi], now, now + slo_us[mi])
            times = arrivals[mi]
            k = next_arrival[mi]
            if k < len(times) and times[k] < end_us:
                push(heap, (times[k], seq, _ARRIVAL, mi, 0))
                seq += 1
                next_arrival[mi] = k + 1
            ep = cur[mi]
            apply(ep, ep.sched.on_arrival(req, now), now)
        elif kind == _XFER:
            si, src, dst = a[0], a[1], a[2]
            ubusy[src] = dbusy[dst] = False
            for q in ((uq[src], dq[dst]) if duplex else (uq[src],)):
                if q[0] is a:
                    del q[0]
                else:  # cannot happen with the slot keys used above; keep the queue right
                    del q[next(i for i, x in enumerate(q) if x is a)]
            if uq[src]:
                try_transfer(uq[src][0], now)
            if dq[dst]:
                try_transfer(dq[dst][0], now)
            feed(si, now)
        elif kind == _WAKE:
            mi = a
            if b != wake_token[mi]:
                continue
            wake_time[mi] = None
            ep = cur[mi]
            apply(ep, ep.sched.on_wake(now), now)
        elif kind == _TICK:
            counts = {m: bisect_left(arrivals[mi], now) for mi, m in enumerate(models)}
            sw = controller.on_window(now, counts)
            if sw is not None:
                push(heap, (max(sw.at_us, now), seq, _SWAP, sw, 0))
                seq += 1
            nxt_tick = now + controller.window_us
            if nxt_tick < end_us:
                push(heap, (nxt_tick, seq, _TICK, 0, 0))
                seq += 1
        else:  # _SWAP
            switch(a, now)

    for ep in cur:  # nothing should be left; be explicit if it is
        apply(ep, ep.sched.drain(end_us), end_us)

    return EventRun(plans, req_model, req_arrival, outcome, finish_at, batch_sizes, busy,
                    waits, slots, dict(placement.gpus_per_class), events, swap_log,
                    answered_twice, dispatch_log)
