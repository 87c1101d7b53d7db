"""Precomputed tables the schedulers work from, and the state they share within a cluster.

:class:`ClusterState` is the one object all schedulers of a cluster share: the uplink and
downlink reservation timelines of every server, or of every sending channel under the
``"channel"`` link model (microseconds on the caller's clock), each
server's bandwidth, and the batch-id counter (batch ids are unique across the cluster).

:class:`PipelineTable` holds, for one pipeline of one model, per stage and per batch size
``b`` (index ``b``; index 0 is unused), the compute latency of the stage's block range on one
of its workers (from the profiles, at the stage's GPU class and MPS share) and the time to
move ``b`` samples of activations into the stage (``bytes_per_sample * b * 8 / bandwidth``
plus ``hop_overhead_us``; 0 for stage 0).  Tables are plain lists so the hot path indexes
them without attribute look-ups.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Sequence

from ppipe_trt.errors import ConfigError
from ppipe_trt.plan import ModelPlan, Plan
from ppipe_trt.profiles.types import ProfileSet
from ppipe_trt.scheduler.links import LINK_MODELS, new_timeline
from ppipe_trt.scheduler.native import native_module, native_status
from ppipe_trt.scheduler.placement import Placement

INF = float("inf")


class ClusterState:
    """Link reservations and ids shared by every scheduler of one cluster (see module doc).

    ``downlinks[s]``: the reservation timeline of server ``s``'s downlink;
    ``uplinks[worker_uplink[w]]``: that of the uplink worker ``w`` sends on (see
    :mod:`ppipe_trt.scheduler.links`).  ``link_model`` is one of
    :data:`~ppipe_trt.scheduler.links.LINK_MODELS`.  Under ``"duplex"`` and ``"sender"``
    ``worker_uplink[w]`` is ``w``'s server (one uplink per server); under ``"channel"`` it is
    ``w``'s channel (see :func:`sender_channels`; one uplink timeline per channel).  Under
    ``"sender"`` and ``"channel"`` the downlink timelines are never reserved (stay empty).

    ``native``: hold the timelines in the compiled form (C arrays, see
    :mod:`ppipe_trt.scheduler.native`) that the compiled reservation scheduler needs; default:
    when the compiled scheduler is available.  ``tl[0]`` / ``tl[1]`` read either form.
    """

    __slots__ = ("uplinks", "downlinks", "bandwidth_gbps", "batch_ids", "hop_overhead_us",
                 "link_model", "worker_uplink", "native")

    def __init__(self, placement: Placement, hop_overhead_us: float = 0.0,
                 link_model: str = "duplex", native: bool | None = None):
        if link_model not in LINK_MODELS:
            raise ConfigError(f"unknown link model {link_model!r}; expected one of "
                              f"{LINK_MODELS}")
        mod = native_module()
        if native and mod is None:
            raise ConfigError(f"the compiled scheduler is not available: "
                              f"{native_status()['detail']}")
        self.native = mod is not None if native is None else bool(native)
        timeline = mod.new_timeline if self.native else new_timeline
        self.link_model = link_model
        n = placement.num_servers
        if link_model == "channel":
            self.worker_uplink = sender_channels(placement)
            n_up = max(self.worker_uplink.values(), default=-1) + 1
        else:
            self.worker_uplink = {w.worker_id: w.server_id for w in placement.workers}
            n_up = n
        self.uplinks = [timeline() for _ in range(n_up)]
        self.downlinks = [timeline() for _ in range(n)]
        self.bandwidth_gbps = [s.link_bandwidth_gbps for s in placement.servers]
        self.batch_ids = itertools.count()
        if hop_overhead_us < 0:
            raise ConfigError(f"hop_overhead_us must be >= 0, got {hop_overhead_us!r}")
        self.hop_overhead_us = float(hop_overhead_us)

    def successor(self, placement: Placement) -> "ClusterState":
        """The state of the same cluster under another plan (a plan swap): the same link
        timelines (the reservations of batches still in flight stay in them), bandwidths and
        batch-id counter (ids stay unique across plans), ``placement``'s workers' uplinks.
        Only the ``"duplex"`` and ``"sender"`` link models (one uplink per server)."""
        if self.link_model == "channel":
            raise ConfigError("a plan swap needs the 'duplex' or 'sender' link model; "
                              "'channel' numbers uplinks by the plan's stages")
        if placement.num_servers != len(self.downlinks):
            raise ConfigError(f"the new placement has {placement.num_servers} servers, the "
                              f"cluster {len(self.downlinks)}: a plan swap keeps the cluster")
        new = object.__new__(ClusterState)
        new.link_model = self.link_model
        new.native = self.native
        new.worker_uplink = {w.worker_id: w.server_id for w in placement.workers}
        new.uplinks, new.downlinks = self.uplinks, self.downlinks
        new.bandwidth_gbps = self.bandwidth_gbps
        new.batch_ids = self.batch_ids
        new.hop_overhead_us = self.hop_overhead_us
        return new

    def reset(self) -> None:
        """Forget every link reservation."""
        for tl in self.uplinks + self.downlinks:
            if isinstance(tl, tuple):
                tl[0].clear()
                tl[1].clear()
            else:
                tl.clear()


def sender_channels(placement: Placement) -> dict[int, int]:
    """The channel of every worker (by worker id) under the ``"channel"`` link model.

    Per stage that feeds another, the stage's workers, in placement order, are cut into
    channels of ``gpus_per_server * mps_share`` consecutive workers, ``gpus_per_server`` being
    the larger of the two stages' classes' (as the public artifact groups its transfer
    delayers); a last stage's workers never send and get one channel each.  Channel ids are
    ``0..C-1``, global over the cluster, numbered pool by pool in plan order.
    """
    gps: dict[str, int] = {}
    for srv in placement.servers:
        gps[srv.gpu_class] = max(gps.get(srv.gpu_class, 0), len(srv.gpu_indices))
    pools: dict[tuple[str, int, int], list[int]] = {}
    for w in placement.workers:
        pools.setdefault((w.model, w.pipeline, w.stage), []).append(w.worker_id)
    out: dict[int, int] = {}
    next_id = 0
    for (model, pi, si), wids in pools.items():
        first = placement.worker(wids[0])
        after = placement.pool(model, pi, si + 1)
        if after:
            size = first.mps_share * max(gps.get(first.gpu_class, 1),
                                         gps.get(after[0].gpu_class, 1), 1)
        else:
            size = 1
        for k, wid in enumerate(wids):
            out[wid] = next_id + k // size
        next_id += -(-len(wids) // size)
    return out


@dataclass(frozen=True, slots=True)
class StageTable:
    """Per-batch latencies of one stage; ``latency_us[b]``/``transfer_in_us[b]`` for
    ``b = 1..max_batch`` (index 0 unused).  ``worker_ids``/``server_ids`` list the stage's
    workers and the server of each, in placement order."""

    gpu_class: str
    mps_share: int
    first_block: int
    last_block: int
    latency_us: tuple[float, ...]
    transfer_in_us: tuple[float, ...]
    bytes_in_per_sample: int
    worker_ids: tuple[int, ...]
    server_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PipelineTable:
    index: int
    planned_batch: int
    max_batch: int
    stages: tuple[StageTable, ...]

    def work_us(self, batch: int) -> float:
        """Compute plus network time of one batch through the pipeline, with no waiting
        (a transfer between workers of one server would be free; this counts it)."""
        return sum(s.latency_us[batch] + s.transfer_in_us[batch] for s in self.stages)


def with_stage_latency(pipelines: Sequence[PipelineTable], pipeline: int, stage: int,
                       latency_us: Sequence[float]) -> tuple[PipelineTable, ...]:
    """``pipelines`` with the latency row of ``stage`` of ``pipeline`` replaced by
    ``latency_us`` (same length: index = batch size, index 0 unused)."""
    pts = tuple(pipelines)
    if not 0 <= pipeline < len(pts) or not 0 <= stage < len(pts[pipeline].stages):
        raise ConfigError(f"no stage {stage} of pipeline {pipeline} in these tables")
    pt = pts[pipeline]
    st = pt.stages[stage]
    row = tuple(float(x) for x in latency_us)
    if len(row) != len(st.latency_us):
        raise ConfigError(f"pipeline {pipeline} stage {stage}: a latency row of {len(row)} "
                          f"entries for a table of {len(st.latency_us)} (batch sizes 0.."
                          f"{len(st.latency_us) - 1})")
    if any(not x > 0.0 for x in row[1:]):
        raise ConfigError(f"pipeline {pipeline} stage {stage}: latencies must be > 0, got "
                          f"{list(row[1:])}")
    stages = pt.stages[:stage] + (replace(st, latency_us=row),) + pt.stages[stage + 1:]
    return pts[:pipeline] + (replace(pt, stages=stages),) + pts[pipeline + 1:]


def transfer_us(nbytes_per_sample: int, batch: int, bandwidth_gbps: float,
                hop_overhead_us: float = 0.0) -> float:
    """Time to move ``batch`` samples of ``nbytes_per_sample`` over a ``bandwidth_gbps``
    link (1 Gbps = 1000 bits per microsecond), plus a fixed per-hop overhead."""
    return nbytes_per_sample * batch * 8.0 / (bandwidth_gbps * 1000.0) + hop_overhead_us


def build_pipeline_tables(plan: Plan, model_plan: ModelPlan, profiles: ProfileSet,
                          placement: Placement, hop_overhead_us: float = 0.0,
                          max_batch: int | None = None) -> tuple[PipelineTable, ...]:
    """Latency tables of every pipeline of ``model_plan``, for batch sizes 1..max_batch.

    ``max_batch`` defaults to the largest planned batch of the model; batch sizes a stage's
    profile does not cover are an error only if they are at or below the pipeline's planned
    batch (above it they are omitted: the table stops at the profiled maximum).
    """
    profile = profiles[model_plan.model]
    cluster = plan.cluster
    limit = max_batch or max(p.batch_size for p in model_plan.pipelines)
    out = []
    for pi, pipe in enumerate(model_plan.pipelines):
        stage_tables = []
        top = limit
        for st in pipe.stages:
            top = min(top, profile.max_batch(st.gpu_class, st.mps_share))
        if top < pipe.batch_size:
            raise ConfigError(
                f"{model_plan.model} pipeline {pi}: planned batch {pipe.batch_size} but the "
                f"profiles of its stages cover batch sizes up to {top}")
        for si, st in enumerate(pipe.stages):
            lat = [0.0] + [profile.range_latency_us(st.gpu_class, st.mps_share, st.first_block,
                                                    st.last_block, b) for b in range(1, top + 1)]
            slots = placement.pool(model_plan.model, pi, si)
            if len(slots) != st.workers:
                raise ConfigError(f"{model_plan.model} pipeline {pi} stage {si}: placement has "
                                  f"{len(slots)} workers, plan {st.workers}")
            if si == 0:
                nbytes = 0
                net = [0.0] * (top + 1)
            else:
                nbytes = profile.bytes_into_block(st.first_block)
                prev = pipe.stages[si - 1]
                bw = min(cluster.pool(prev.gpu_class).link_bandwidth_gbps,
                         cluster.pool(st.gpu_class).link_bandwidth_gbps)
                net = [0.0] + [transfer_us(nbytes, b, bw, hop_overhead_us)
                               for b in range(1, top + 1)]
            stage_tables.append(StageTable(
                st.gpu_class, st.mps_share, st.first_block, st.last_block, tuple(lat),
                tuple(net), nbytes, tuple(w.worker_id for w in slots),
                tuple(w.server_id for w in slots)))
        out.append(PipelineTable(pi, pipe.batch_size, top, tuple(stage_tables)))
    return tuple(out)
