"""A small exact cluster, profile and plan for the scheduler tests, and a fake-clock driver."""

from __future__ import annotations

import heapq
import random

from ppipe_trt.cluster import ClusterSpec, GpuPool
from ppipe_trt.profiles.types import ProfileSet
from ppipe_trt.scheduler import build_schedulers, place_workers
from ppipe_trt.scheduler.interface import Request
from ppipe_trt.simulator.handplan import ModelSpec, hand_plan, synthetic_profile

SLO_MS = 20.0

# H: 4 GPUs, 2 per server, MPS up to 2.  L: 4 GPUs, 2 per server, no MPS.
CLUSTER = ClusterSpec((GpuPool("H", 4, 2, 2, 10.0), GpuPool("L", 4, 2, 1, 10.0)), "H-L")


def toy_profiles() -> ProfileSet:
    # batch b takes l1 * (1 + 0.5 (b - 1)); cut: 100 us per sample over 10 Gbps
    prof = synthetic_profile("toy", {("H", 1): [1000.0, 1000.0], ("H", 2): [1600.0, 1600.0],
                                     ("L", 1): [3000.0, 3000.0]})
    other = synthetic_profile("other", {("H", 1): [500.0, 500.0], ("L", 1): [1500.0, 1500.0]})
    return ProfileSet({"toy": prof, "other": other}, "toy")


def toy_plan(profiles=None, with_other: bool = False):
    """Pipeline 0: batch 4, whole model on 2 H workers (H GPUs 0-1, server 0).
    Pipeline 1: batch 2, block 0 on 2 MPS shares of H GPU 2 (server 1), block 1 on 2 L GPUs
    (server 2)."""
    profiles = profiles or toy_profiles()
    specs = [ModelSpec("toy", SLO_MS, [(4, [(0, 1, "H", 1, 2)]),
                                       (2, [(0, 0, "H", 2, 2), (1, 1, "L", 1, 2)])])]
    if with_other:  # shares L server 3 and H GPU 3 (server 1) with toy's pipeline 1
        specs.append(ModelSpec("other", SLO_MS, [(2, [(0, 0, "H", 1, 1), (1, 1, "L", 1, 2)])]))
    return hand_plan(profiles, CLUSTER, specs)


def schedulers(plan=None, policy="reservation", **kw):
    plan = plan or toy_plan()
    profiles = toy_profiles()
    placement = place_workers(plan)
    return build_schedulers(plan, profiles, placement, policy, **kw), placement


class FakeClockDriver:
    """Drives schedulers from a heap of hand-built events; stages finish exactly when
    reserved plus ``delay_us(batch_id, stage)`` (default 0)."""

    def __init__(self, scheds, delay_us=None):
        self.scheds = scheds
        self.delay_us = delay_us or (lambda bid, stage: 0.0)
        self.heap: list = []
        self.seq = 0
        self.dispatches = []
        self.arrived = []
        self.drops = []
        self.wake_token = {m: 0 for m in scheds}
        self.now = 0.0

    def _push(self, t, kind, payload):
        heapq.heappush(self.heap, (t, self.seq, kind, payload))
        self.seq += 1

    def arrive(self, t, model="toy", deadline_us=None, rid=None):
        rid = self.seq if rid is None else rid
        req = Request(rid, model, t, t + SLO_MS * 1000.0 if deadline_us is None else deadline_us)
        self._push(t, "arrival", req)
        self.arrived.append(req)
        return req

    def _apply(self, model, dec):
        for d in dec.dispatches:
            self.dispatches.append(d)
            shift = 0.0
            for r in d.route:
                shift += self.delay_us(d.batch_id, r.stage)
                self._push(r.finish_us + shift, "finish", (model, d.batch_id, r.stage))
        self.drops.extend(dec.drops)
        self.wake_token[model] += 1
        if dec.wake_at_us is not None:
            self._push(max(dec.wake_at_us, self.now), "wake", (model, self.wake_token[model]))

    def run(self, until=float("inf")):
        while self.heap and self.heap[0][0] <= until:
            t, _, kind, payload = heapq.heappop(self.heap)
            self.now = t
            if kind == "arrival":
                self._apply(payload.model, self.scheds[payload.model].on_arrival(payload, t))
            elif kind == "finish":
                model, bid, stage = payload
                self._apply(model, self.scheds[model].on_stage_finished(bid, stage, t, t))
            else:
                model, token = payload
                if token == self.wake_token[model]:
                    self._apply(model, self.scheds[model].on_wake(t))


def decision_words(dec, t, details: bool = False) -> list[str]:
    """One word per dispatch (batch, pipeline, requests, per stage worker, reserved times and
    link transfer) and per drop (request, reason, with ``details`` the detail), then the
    wake-up; times written with ``t`` (``None`` included)."""
    words = []
    for d in dec.dispatches:
        route = ";".join(f"{r.stage}@{r.worker_id}:{t(r.start_us)}-{t(r.finish_us)}"
                         f"/{t(r.transfer_start_us)}-{t(r.transfer_finish_us)}"
                         for r in d.route)
        ids = ",".join(str(r.request_id) for r in d.requests)
        words.append(f"D{d.batch_id}p{d.pipeline}[{ids}]{route}")
    for drop in dec.drops:
        reason = getattr(drop.reason, "value", drop.reason)
        words.append(f"X{drop.request.request_id}:{reason}"
                     + (f":{drop.detail}" if details else ""))
    words.append(f"w{t(dec.wake_at_us)}")
    return words


def poisson_times(rate_rps: float, horizon_us: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    while True:
        t += rng.expovariate(rate_rps) * 1e6
        if t >= horizon_us:
            return out
        out.append(t)
