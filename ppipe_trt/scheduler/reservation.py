"""PPipe's reservation-based adaptive batching scheduler (the paper's Alg. 1-2).

State: for every worker of the model the time until which it is reserved (``till``); for every
server link the timeline of its uplink and downlink reservations (shared with the other
models' schedulers through :class:`~ppipe_trt.scheduler.tables.ClusterState`; a transfer may
take any gap long enough on both links, see :mod:`~ppipe_trt.scheduler.links`).  Under the
``"sender"`` link model of the state, a transfer reserves only the sender's uplink and
downlink timelines stay empty; under ``"channel"`` the "uplink" of a worker is its sending
channel's timeline (``ClusterState.worker_uplink``) and downlinks stay empty as well.
Requests wait in one queue per model, ordered by deadline.

Decision loop, run on every arrival and wake-up:

1. *Probe* every pipeline at its planned batch: stage by stage take the worker of the stage's
   pool that finishes earliest, counting the transfer into it, which needs the previous
   worker's uplink and this worker's downlink free over the same interval (a hand-off within
   one server is free).  A probe's *waiting* is its finish time minus now minus the batch's
   pure compute and network time.  Pick the pipeline with the least waiting.
2. On it, try batch sizes from the planned one downwards until the batch finishes by the
   deadline of the oldest queued request.  If even batch 1 misses, the other pipelines are
   tried (least waiting first); if none can finish batch 1 in time, every queued request whose
   deadline is before the earliest batch-1 finish is dropped (``DEADLINE_UNREACHABLE``), and
   the loop repeats.
3. If fewer requests are queued than the chosen batch, wait: wake up at the last moment at
   which a batch of all queued requests still meets the oldest deadline (``wake_lead_us``
   earlier, for callers that oversleep).  Otherwise reserve the route and dispatch.

Waiting ``slack`` = deadline - (finish if dispatched now) is exact when links are not
involved (the finish then grows by at most the wait).  A transfer that fits a link gap now
may not fit it later, so for multi-stage pipelines the wake-up time is checked with a probe
at that time and, if that batch would miss, moved earlier by bisection.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

from ppipe_trt.errors import SchedulerError
from ppipe_trt.scheduler.interface import (Decisions, Dispatch, Drop, DropReason, Request,
                                           Scheduler, StageReservation)
from ppipe_trt.scheduler.links import RESERVE_TRANSFER, common_free, first_free, is_free
from ppipe_trt.scheduler.tables import (INF, ClusterState, PipelineTable,
                                        with_stage_latency)
from ppipe_trt.scheduler.work_conserving import WorkConservingRule

#: Wake-ups are placed this much (us) before the exact last moment, so that rounding in
#: ``now + slack`` can never make the batch miss its deadline when woken exactly on time.
_WAKE_GUARD_US = 1e-3
#: Under light traffic (work-conserving option), pipelines whose waiting is at most this (us)
#: count as equally idle and the earliest finish among them is chosen.
_IDLE_TIE_US = 1.0


class ReservationScheduler(Scheduler):
    """One model's reservation scheduler.  Construct with :func:`build_schedulers`.

    ``strict_batch_fraction`` (optional, off by default) reproduces the public artifact's
    admission rule: the first time a request is at the head of the queue, only batch sizes
    of at least ``round(fraction * planned)`` are tried and the request is dropped if none
    meets its deadline; ``max_queue`` bounds the queue (``QUEUE_FULL`` drops beyond it).

    ``work_conserving`` (off by default: PPipe's behaviour): when fewer requests are queued
    than the chosen batch and either no batch of the model is in flight or the estimated
    arrival rate is at most ``work_conserving_max_load`` of what the model serves at batches
    of the queue's size
    (:class:`~ppipe_trt.scheduler.work_conserving.WorkConservingRule`, rate decayed over
    ``work_conserving_window_us``), the queued requests are dispatched at once when their
    route is free now, else the scheduler wakes when it frees (never later than PPipe's
    last moment) instead of waiting for a fuller batch.  A queue the rule holds is looked at
    again when the decaying estimate would let it go.  ``work_conserving_min_gain``
    (default ``None``): also dispatch early when a fuller batch would serve at most that
    fraction more (see the rule).
    """

    def __init__(self, model: str, pipelines: Sequence[PipelineTable], state: ClusterState,
                 *, wake_lead_us: float = 0.0, strict_batch_fraction: float | None = None,
                 max_queue: int | None = None, work_conserving: bool = False,
                 work_conserving_max_load: float = 0.5,
                 work_conserving_window_us: float = 100_000.0,
                 work_conserving_min_gain: float | None = None):
        self.model = model
        self.pipelines = tuple(pipelines)
        self._state = state
        self._uplinks = state.uplinks
        self._downlinks = state.downlinks
        # chosen once: under the "sender" and "channel" link models downlinks are never
        # reserved, so the probe always finds them free and the hot path needs no branch on
        # the model (under "channel" the uplink indices in the groups are channels)
        self._reserve_transfer = RESERVE_TRANSFER[state.link_model]
        self.wake_lead_us = float(wake_lead_us)
        self.strict_batch_fraction = strict_batch_fraction
        self.max_queue = max_queue
        # Per pipeline, per stage: [server, uplink, tills, worker_ids] groups of the workers
        # of the stage's pool that share a server and an uplink timeline (under "duplex" and
        # "sender" the uplink is the server's, so a group is a server); a dead worker's till
        # is INF.
        worker_uplink = state.worker_uplink
        self._groups: list[list[list[list]]] = []
        self._loc: dict[int, tuple[list, int]] = {}
        for pt in self.pipelines:
            stages = []
            for st in pt.stages:
                by_link: dict[tuple[int, int], list] = {}
                for wid, srv in zip(st.worker_ids, st.server_ids):
                    link = worker_uplink[wid]
                    g = by_link.setdefault((srv, link), [srv, link, [], []])
                    self._loc[wid] = (g[2], len(g[2]))
                    g[2].append(0.0)
                    g[3].append(wid)
                stages.append(list(by_link.values()))
            self._groups.append(stages)
        # (tables, stage groups, latency rows, transfer rows) per pipeline for the hot path.
        self._probe_data = [self._probe_row(i) for i in range(len(self.pipelines))]
        self._queue: deque[Request] = deque()
        self._batches: dict[int, list] = {}
        self._dead: set[int] = set()
        self._retried: set[int] = set()
        self._wake_at: float | None = None
        self._last_now = -INF
        self.work_conserving = bool(work_conserving)
        self._early = (WorkConservingRule(self.pipelines, work_conserving_max_load,
                                          work_conserving_window_us,
                                          work_conserving_min_gain)
                       if work_conserving else None)

    def _probe_row(self, i: int):
        pt = self.pipelines[i]
        return (pt.planned_batch, [(self._groups[i][s], st.latency_us, st.transfer_in_us, s,
                                    pt.stages[s + 1].transfer_in_us if s + 1 < len(pt.stages)
                                    else None)
                                   for s, st in enumerate(pt.stages)])

    # ---- calibration (ppipe_trt.scheduler.calibration) ------------------------------------

    calibratable = True

    def set_stage_latency(self, pipeline: int, stage: int, latency_us: Sequence[float]) -> None:
        """Plan stage ``stage`` of ``pipeline`` with ``latency_us`` (index = batch size, as
        the table's row, same length) from now on: what its workers were measured to take.
        Reservations already made stay; the work-conserving rule's capacities follow."""
        self.pipelines = with_stage_latency(self.pipelines, pipeline, stage, latency_us)
        self._probe_data[pipeline] = self._probe_row(pipeline)
        if self._early is not None:
            self._early.set_pipelines(self.pipelines)

    # ---- inspection (tests, metrics) ------------------------------------------------------

    def reserved_until(self, worker_id: int) -> float:
        """The time (us) until which ``worker_id`` is reserved (INF when removed)."""
        tills, pos = self._worker(worker_id)
        return tills[pos]

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def wake_at_us(self) -> float | None:
        return self._wake_at

    # ---- events ---------------------------------------------------------------------------

    def on_arrival(self, request: Request, now_us: float) -> Decisions:
        return self.on_arrivals((request,), now_us)

    def on_arrivals(self, requests: Sequence[Request], now_us: float) -> Decisions:
        """Queue ``requests`` and decide once for all of them (the whole burst is in the
        queue, in deadline order, when batches are formed).  With ``max_queue``, a full queue
        is first scheduled as one arrival at a time would have been, and a request that still
        finds it full is dropped (``QUEUE_FULL``)."""
        self._tick(now_us)
        q = self._queue
        dec = Decisions()
        if self._early is not None:
            for request in requests:
                self._early.observe(min(request.arrival_us, now_us))
        for request in requests:
            if self.max_queue is not None and len(q) >= self.max_queue:
                self._schedule(now_us, dec)
                if len(q) >= self.max_queue:
                    dec.drops.append(Drop(request, DropReason.QUEUE_FULL,
                                          f"queue holds {len(q)} requests (max "
                                          f"{self.max_queue})"))
                    continue
            if not q or request.deadline_us >= q[-1].deadline_us:
                q.append(request)
            else:  # an earlier deadline than the tail: keep the queue sorted
                i = len(q) - 1
                while i > 0 and q[i - 1].deadline_us > request.deadline_us:
                    i -= 1
                q.insert(i, request)
        self._schedule(now_us, dec)
        return dec

    def on_wake(self, now_us: float) -> Decisions:
        self._tick(now_us)
        dec = Decisions()
        self._schedule(now_us, dec)
        return dec

    def on_stage_finished(self, batch_id: int, stage: int, finish_us: float,
                          now_us: float) -> Decisions:
        self._tick(now_us)
        rec = self._batches.get(batch_id)
        if rec is None:
            raise SchedulerError(f"{self.model}: finish reported for unknown batch {batch_id} "
                                 "(never dispatched, already finished, or dropped)")
        wids, ends = rec[2], rec[3]
        if not 0 <= stage < len(wids):
            raise SchedulerError(f"{self.model}: batch {batch_id} has stages 0..{len(wids) - 1}, "
                                 f"finish reported for stage {stage}")
        reserved = ends[stage]
        late = finish_us > reserved
        if finish_us != reserved and wids[stage] not in self._dead:
            tills, pos = self._loc[wids[stage]]
            if tills[pos] == reserved:    # nothing reserved after this batch: take the truth
                tills[pos] = finish_us
            elif late:                    # later reservations on it are pushed back as much
                tills[pos] += finish_us - reserved
            elif stage == 0:              # early: a first stage's worker starts its later
                self._pull_forward(rec, reserved - finish_us)  # batches as soon as it is free
            ends[stage] = finish_us
        rec[4] = stage + 1
        if stage == len(wids) - 1:
            del self._batches[batch_id]
        dec = Decisions()
        if (late or self._early is not None) and self._queue:
            # the last moment to wait may have moved earlier (late), or a route freed early
            self._schedule(now_us, dec)
        else:
            dec.wake_at_us = self._wake_at
        return dec

    def _pull_forward(self, rec: list, gain_us: float) -> None:
        """``rec``'s first stage finished ``gain_us`` before its reservation: its worker starts
        the batches reserved after it on the first stage that much earlier (a real worker's
        early start), so they and the worker's reserved-until move as much."""
        wid = rec[2][0]
        tills, pos = self._loc[wid]
        tills[pos] -= gain_us
        for other in self._batches.values():
            if other is not rec and other[4] == 0 and other[2][0] == wid:
                other[3][0] -= gain_us

    def remove_worker(self, worker_id: int, now_us: float) -> Decisions:
        self._tick(now_us)
        tills, pos = self._worker(worker_id)
        tills[pos] = INF
        self._dead.add(worker_id)
        dec = Decisions()
        for bid in [b for b, rec in self._batches.items() if worker_id in rec[2][rec[4]:]]:
            rec = self._batches.pop(bid)
            for r in rec[1]:
                dec.drops.append(Drop(r, DropReason.WORKER_FAILED,
                                      f"worker {worker_id} failed under batch {bid}"))
        self._schedule(now_us, dec)
        return dec

    def add_worker(self, worker_id: int, now_us: float) -> Decisions:
        self._tick(now_us)
        tills, pos = self._worker(worker_id)
        self._dead.discard(worker_id)
        tills[pos] = now_us
        dec = Decisions()
        self._schedule(now_us, dec)
        return dec

    def drain(self, now_us: float) -> Decisions:
        dec = Decisions()
        while self._queue:
            dec.drops.append(Drop(self._queue.popleft(), DropReason.SHUTDOWN, "server stopping"))
        self._wake_at = None
        return dec

    # ---- plan swap ----------------------------------------------------------------------

    swappable = True

    def take_queued(self, now_us: float) -> list[Request]:
        self._tick(now_us)
        taken = list(self._queue)
        self._queue.clear()
        self._retried.clear()
        self._wake_at = None
        return taken

    def hold_worker(self, worker_id: int, until_us: float) -> None:
        tills, pos = self._worker(worker_id)
        if until_us > tills[pos]:
            tills[pos] = until_us

    @property
    def batches_in_flight(self) -> int:
        return len(self._batches)

    # ---- internals ------------------------------------------------------------------------

    def _worker(self, worker_id: int) -> tuple[list, int]:
        try:
            return self._loc[worker_id]
        except KeyError:
            raise SchedulerError(f"{self.model}: worker {worker_id} does not serve this model; "
                                 f"its workers are {sorted(self._loc)}") from None

    def _tick(self, now_us: float) -> None:
        if now_us < self._last_now:
            raise SchedulerError(f"{self.model}: time went backwards from {self._last_now} us "
                                 f"to {now_us} us")
        self._last_now = now_us

    def _probe(self, p: int, b: int, now: float):
        """Earliest route of a batch of ``b`` on pipeline ``p`` given the reservations.

        Returns ``(finish_us, work_us, picks)``; ``picks`` holds per stage ``(tills, till,
        transfer_start, transfer_end, start, end, server, prev_uplink, worker_ids, uplink)``
        (``prev_uplink``: the uplink timeline index the transfer into the stage uses;
        ``uplink``: the stage worker's own); ``finish_us`` is INF when a stage has no live
        worker.
        """
        uplinks, downlinks = self._uplinks, self._downlinks
        stages = self._probe_data[p][1]
        t = now
        work = 0.0
        prev_srv = prev_link = -1
        picks = []
        for groups, lat_row, net_row, s, next_row in stages:
            lat = lat_row[b]
            best = INF
            pick = None
            next_net = next_row[b] if next_row is not None else 0.0
            # No group of a stage can finish before t + lat (it starts at t at the earliest):
            # once one does, later groups can only tie, and a tie never replaces the pick,
            # so the scan stops there (same pick, fewer groups looked at when some are idle).
            floor = t + lat
            if s == 0:
                for srv, link, tills, gw in groups:
                    m = min(tills)
                    start = m if m > t else t
                    end = start + lat
                    if end >= best:
                        continue
                    key = end
                    if next_row is not None:  # its output must also get onto the uplink
                        key = first_free(uplinks[link], end, next_net)
                    if key < best:
                        best = key
                        pick = (tills, m, t, t, start, end, srv, -1, gw, link)
                        if best <= floor:
                            break
            else:
                net = net_row[b]
                up = uplinks[prev_link]
                u0 = first_free(up, t, net)   # earliest the sender's uplink can carry it
                for srv, link, tills, gw in groups:
                    m = min(tills)
                    if srv == prev_srv:
                        ts = te = t
                    else:
                        lb = u0 + net
                        if (m if m > lb else lb) + lat >= best:
                            continue
                        dn = downlinks[srv]
                        ts = u0 if is_free(dn, u0, net) else common_free(up, dn, u0, net)
                        te = ts + net
                    start = m if m > te else te
                    end = start + lat
                    if end >= best:
                        continue
                    key = end
                    if next_row is not None:
                        key = first_free(uplinks[link], end, next_net)
                    if key < best:
                        best = key
                        pick = (tills, m, ts, te, start, end, srv, prev_link, gw, link)
                        if best <= floor:
                            break
            if pick is None or pick[1] == INF:
                return INF, 0.0, None
            work += lat + (pick[3] - pick[2])
            t = pick[5]
            prev_srv = pick[6]
            prev_link = pick[9]
            picks.append(pick)
        return t, work, picks

    def _schedule(self, now: float, dec: Decisions) -> None:
        q = self._queue
        probe = self._probe
        self._wake_at = None
        npipes = len(self.pipelines)
        while q:
            deadline = q[0].deadline_us
            best_p = -1
            best_key = INF
            best = None
            # light traffic (work-conserving): among the pipelines that can start now, the
            # one that answers the queued requests soonest, not the first in plan order
            light = self._early is not None and self._early.allows(len(q), now)
            best_fin_n = INF
            for p in range(npipes):
                b = self._probe_data[p][0]
                fin, work, picks = probe(p, b, now)
                if fin == INF:
                    continue
                key = fin - now - work
                if light:
                    key = key if key > _IDLE_TIE_US else 0.0
                    n = len(q) if len(q) < b else b
                    fin_n = fin if n == b else probe(p, n, now)[0]
                    if key < best_key or (key == best_key and fin_n < best_fin_n):
                        best_key, best_fin_n, best_p, best = key, fin_n, p, (b, fin, picks)
                    continue
                if key < best_key:
                    best_key, best_p, best = key, p, (b, fin, picks)
            if best is None:
                while q:
                    dec.drops.append(Drop(q.popleft(), DropReason.NO_WORKERS,
                                          f"{self.model}: some stage of every pipeline has no "
                                          "live worker"))
                break
            chosen = self._fit(best_p, best, deadline, now, q[0].request_id)
            if chosen is None and not self._is_strict(q[0].request_id):
                for p in self._by_waiting(now, exclude=best_p):
                    chosen = self._fit(p, None, deadline, now, q[0].request_id)
                    if chosen is not None:
                        best_p = p
                        break
            if chosen is None and q[0].grace_us > 0.0:
                # Late (a stalled wake-up): dispatch what still makes the real deadline.
                head = q[0]
                late = self._fit(best_p, None, deadline + head.grace_us, now, head.request_id)
                if late is not None:
                    n = min(late[0], len(q))
                    picks = late[2] if n == late[0] else probe(best_p, n, now)[2]
                    self._dispatch(best_p, n, picks, dec)
                    continue
            if chosen is None:
                self._drop_unreachable(now, dec)
                continue
            b, fin, picks = chosen
            if len(q) >= b:
                self._dispatch(best_p, b, picks, dec)
                continue
            n = len(q)
            fin_n, work_n, picks_n = probe(best_p, n, now)
            early_at = INF
            if self._early is not None:
                # nothing of this model in flight: no batch is running that arrivals could
                # join the queue behind, and holding only idles its pools (a closed-loop
                # client, a lull); else the rate rule decides
                if not self._batches or self._early.allows(n, now):
                    early_at = fin_n - work_n   # the route is free for the batch from then on
                    if early_at <= now + _WAKE_GUARD_US and fin_n <= deadline:
                        self._dispatch(best_p, n, picks_n, dec)
                        continue
                else:  # look again when the decaying rate estimate would allow it
                    early_at = self._early.allowed_at(n, now)
            slack = deadline - fin_n
            if slack <= _WAKE_GUARD_US + self.wake_lead_us:
                self._dispatch(best_p, n, picks_n, dec)
                continue
            wake = now + slack - _WAKE_GUARD_US - self.wake_lead_us
            if len(self.pipelines[best_p].stages) > 1 and probe(best_p, n, wake)[0] > deadline:
                lo, hi = now, wake          # dispatching at lo meets the deadline
                for _ in range(8):
                    mid = 0.5 * (lo + hi)
                    if probe(best_p, n, mid)[0] <= deadline:
                        lo = mid
                    else:
                        hi = mid
                wake = lo
                if wake - now <= _WAKE_GUARD_US:
                    self._dispatch(best_p, n, picks_n, dec)
                    continue
            if early_at < wake:
                wake = early_at
            self._wake_at = wake
            break
        dec.wake_at_us = self._wake_at

    def _is_strict(self, request_id: int) -> bool:
        return self.strict_batch_fraction is not None and request_id not in self._retried

    def _fit(self, p: int, planned, deadline: float, now: float, head_id: int):
        """Largest batch (planned downwards) on pipeline ``p`` finishing by ``deadline``."""
        b_max = self._probe_data[p][0]
        b_min = 1
        if self._is_strict(head_id):
            b_min = max(1, round(b_max * self.strict_batch_fraction))
        if planned is not None and planned[1] <= deadline:
            if self.strict_batch_fraction is not None:
                self._retried.add(head_id)
            return planned
        for b in range(b_max - 1 if planned is not None else b_max, b_min - 1, -1):
            fin, _, picks = self._probe(p, b, now)
            if fin <= deadline:
                if self.strict_batch_fraction is not None:
                    self._retried.add(head_id)
                return b, fin, picks
        return None

    def _by_waiting(self, now: float, exclude: int) -> list[int]:
        keyed = []
        for p in range(len(self.pipelines)):
            if p != exclude:
                fin, work, _ = self._probe(p, self._probe_data[p][0], now)
                if fin != INF:
                    keyed.append((fin - now - work, p))
        keyed.sort()
        return [p for _, p in keyed]

    def _drop_unreachable(self, now: float, dec: Decisions) -> None:
        """Drop the head, and every request behind it that no pipeline can finish in time."""
        q = self._queue
        head = q.popleft()
        self._retried.discard(head.request_id)
        earliest = min(self._probe(p, 1, now)[0] for p in range(len(self.pipelines)))
        detail = f"earliest batch-1 finish {earliest:.0f} us > deadline"
        dec.drops.append(Drop(head, DropReason.DEADLINE_UNREACHABLE, detail))
        while q and q[0].deadline_us < earliest:
            r = q.popleft()
            self._retried.discard(r.request_id)
            dec.drops.append(Drop(r, DropReason.DEADLINE_UNREACHABLE, detail))

    def _dispatch(self, p: int, b: int, picks, dec: Decisions) -> None:
        q = self._queue
        reqs = tuple([q.popleft() for _ in range(b)])
        if self.strict_batch_fraction is not None:
            for r in reqs:
                self._retried.discard(r.request_id)
        route = []
        wids = []
        ends = []
        for s, (tills, m, ts, te, start, end, srv, prev_link, gw, _) in enumerate(picks):
            pos = tills.index(m)
            tills[pos] = end
            if te != ts:
                self._reserve_transfer(self._uplinks[prev_link], self._downlinks[srv], ts, te,
                                       self._last_now)
            else:
                ts = te = start
            wid = gw[pos]
            route.append(StageReservation(s, wid, start, end, ts, te))
            wids.append(wid)
            ends.append(end)
        bid = next(self._state.batch_ids)
        self._batches[bid] = [p, reqs, wids, ends, 0]
        dec.dispatches.append(Dispatch(bid, self.model, p, reqs, tuple(route)))
