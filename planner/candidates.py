"""Enumerate SLO-feasible candidate pipelines of a model and prune the dominated ones.

A candidate fixes everything of a pipeline but its worker counts: the block range, GPU class
and MPS share of each stage, and the batch size.  The MILP then picks integer workers per
stage.  Candidate ``q`` *dominates* ``p`` when both place their stages on the same GPU classes
and, stage by stage, ``q``'s MPS share is a multiple of ``p``'s and ``q`` delivers at least as
much throughput per GPU: any solution using ``p`` then stays feasible, with at least the same
throughput and the same GPUs, when ``p``'s workers are replaced by ``q``'s.  Pruning dominated
candidates therefore never lowers the optimum; it is what keeps the MILP small.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from ppipe_trt.cluster import ClusterSpec, Workload
from ppipe_trt.profiles.types import ModelProfile

from planner.costs import batching_delay_us, cut_bandwidth_gbps, link_cap_rps

#: Rows of the pairwise-dominance matrix computed at once (bounds memory to ~chunk * n * k).
_DOMINANCE_CHUNK = 256


@dataclass(frozen=True, slots=True)
class StageCandidate:
    """One stage of a candidate: latency and per-worker capacity at the pipeline's batch.

    ``transfer_us``: time to ship the batch to the next stage (0 for the last stage).
    ``capacity_rps``: samples/s of one worker (compute and link-slice bound).
    """

    first_block: int
    last_block: int
    gpu_class: str
    mps_share: int
    latency_us: float
    transfer_us: float
    capacity_rps: float


@dataclass(frozen=True, slots=True)
class PipelineCandidate:
    """A fully specified pipeline but for its worker counts.

    ``latency_us`` = stage latencies + transfers + ``batching_delay_us``.
    """

    model: str
    batch_size: int
    stages: tuple[StageCandidate, ...]
    batching_delay_us: float
    latency_us: float

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(s.gpu_class for s in self.stages)


@dataclass(frozen=True, slots=True)
class CandidateSet:
    """The surviving candidates of one model.

    ``enumerated``: SLO-feasible candidates before pruning.  ``min_latency_us``: the smallest
    batch-1 pipeline latency (no batching delay) of any configuration, feasible or not; used to
    name the smallest SLO that would be feasible.
    """

    model: str
    candidates: tuple[PipelineCandidate, ...]
    enumerated: int
    min_latency_us: float


@dataclass(frozen=True, slots=True)
class _Config:
    gpu_class: str
    mps_share: int
    prefix_us: np.ndarray       # (num_blocks + 1, max_batch): prefix sums of block latencies

    @property
    def max_batch(self) -> int:
        return self.prefix_us.shape[1]


def allowed_configs(profile: ModelProfile, cluster: ClusterSpec, max_batch: int,
                    max_mps: int | None = None) -> list[_Config]:
    """(class, MPS share) pairs both profiled and allowed by the cluster, in cluster order."""
    out = []
    for pool in cluster.pools:
        if pool.count == 0 or pool.gpu_class not in profile.gpu_classes:
            continue
        for share in profile.mps_shares(pool.gpu_class):
            if share > pool.max_mps or (max_mps is not None and share > max_mps):
                continue
            table = np.asarray(profile.table(pool.gpu_class, share).latency_us, dtype=float)
            table = table[:, :max_batch]
            prefix = np.vstack([np.zeros((1, table.shape[1])), np.cumsum(table, axis=0)])
            out.append(_Config(pool.gpu_class, share, prefix))
    return out


def enumerate_candidates(profile: ModelProfile, workload: Workload, cluster: ClusterSpec, *,
                         max_stages: int, max_batch: int, slo_budget_fraction: float,
                         rate_rps: float | None, batching_delay_factor: float,
                         max_mps: int | None = None, prune: bool = True) -> CandidateSet:
    """All SLO-feasible pipelines of ``profile`` on ``cluster`` with the dominated ones removed.

    ``max_mps`` caps the MPS share (NP uses 1).  ``rate_rps`` is the estimated arrival rate
    used for the batch-building delay (None: only batch 1 is feasible when the factor is > 0).
    Output order is deterministic.
    """
    nb = profile.num_blocks
    configs = allowed_configs(profile, cluster, max_batch, max_mps)
    budget_us = workload.slo_us * slo_budget_fraction
    delay = np.array([batching_delay_us(b, rate_rps, batching_delay_factor)
                      for b in range(1, max_batch + 1)])
    cut_bytes = np.asarray(profile.cut_bytes_per_sample, dtype=float)
    pools = {p.gpu_class: p for p in cluster.pools}
    min_latency = math.inf
    groups: dict[tuple[str, ...], list[tuple]] = {}
    enumerated = 0

    for k in range(1, min(max_stages, nb) + 1):
        bounds = np.array([(0, *cuts, nb) for cuts in itertools.combinations(range(1, nb), k - 1)],
                          dtype=int)
        for combo in itertools.product(range(len(configs)), repeat=k):
            cfgs = [configs[i] for i in combo]
            nbatch = min(c.max_batch for c in cfgs)
            batches = np.arange(1, nbatch + 1, dtype=float)
            total = np.broadcast_to(delay[:nbatch], (len(bounds), nbatch)).copy()
            lat = []
            for s, cfg in enumerate(cfgs):
                stage_lat = (cfg.prefix_us[bounds[:, s + 1], :nbatch]
                             - cfg.prefix_us[bounds[:, s], :nbatch])
                lat.append(stage_lat)
                total += stage_lat
            trans = []
            for s in range(k - 1):
                bw = cut_bandwidth_gbps(pools[cfgs[s].gpu_class], pools[cfgs[s + 1].gpu_class])
                per_sample = cut_bytes[bounds[:, s + 1] - 1] * 8.0 / (bw * 1e3)
                stage_trans = per_sample[:, None] * batches[None, :]
                trans.append(stage_trans)
                total += stage_trans
            min_latency = min(min_latency, float((total[:, 0] - delay[0]).min()))
            feasible = total <= budget_us
            if not feasible.any():
                continue
            caps = []
            for s, cfg in enumerate(cfgs):
                cap = batches[None, :] * 1e6 / lat[s]
                pool = pools[cfg.gpu_class]
                if s > 0:
                    link = np.array([link_cap_rps(b, pool, cfg.mps_share)
                                     for b in cut_bytes[bounds[:, s] - 1]])
                    cap = np.minimum(cap, link[:, None])
                if s < k - 1:
                    link = np.array([link_cap_rps(b, pool, cfg.mps_share)
                                     for b in cut_bytes[bounds[:, s + 1] - 1]])
                    cap = np.minimum(cap, link[:, None])
                caps.append(cap)
            rows, cols = np.nonzero(feasible)
            enumerated += len(rows)
            key = tuple(c.gpu_class for c in cfgs)
            for r, b in zip(rows.tolist(), cols.tolist()):
                groups.setdefault(key, []).append((
                    combo, tuple(bounds[r].tolist()), b + 1,
                    tuple(float(lat[s][r, b]) for s in range(k)),
                    tuple(float(trans[s][r, b]) for s in range(k - 1)) + (0.0,),
                    tuple(float(caps[s][r, b]) for s in range(k)),
                    float(delay[b]), float(total[r, b])))

    candidates: list[PipelineCandidate] = []
    for key in sorted(groups, key=lambda g: (len(g), [cluster.gpu_classes.index(c) for c in g])):
        rows = groups[key]
        keep = _undominated(rows, configs) if prune else np.ones(len(rows), dtype=bool)
        for row, kept in zip(rows, keep):
            if not kept:
                continue
            combo, bnd, batch, lats, transfers, caps, dly, tot = row
            stages = tuple(
                StageCandidate(first_block=bnd[s], last_block=bnd[s + 1] - 1,
                               gpu_class=configs[ci].gpu_class, mps_share=configs[ci].mps_share,
                               latency_us=lats[s], transfer_us=transfers[s], capacity_rps=caps[s])
                for s, ci in enumerate(combo))
            candidates.append(PipelineCandidate(profile.model, batch, stages, dly, tot))
    return CandidateSet(profile.model, tuple(candidates), enumerated, min_latency)


def _undominated(rows: list[tuple], configs: list[_Config]) -> np.ndarray:
    """Mask of rows no other row dominates (see the module docstring); ties keep one."""
    mps = np.array([[configs[ci].mps_share for ci in row[0]] for row in rows], dtype=int)
    per_gpu = np.array([row[5] for row in rows], dtype=float) * mps
    # Deterministic preference among equals: more total per-GPU capacity, lower latency, then
    # enumeration order.
    order = np.lexsort((np.arange(len(rows)), np.array([row[7] for row in rows]),
                        -per_gpu.sum(axis=1)))
    rank = np.empty(len(rows), dtype=int)
    rank[order] = np.arange(len(rows))
    keep = np.ones(len(rows), dtype=bool)
    # First within identical MPS tuples (cheap, removes most), then across MPS tuples.
    by_mps: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(map(tuple, mps)):
        by_mps.setdefault(m, []).append(i)
    for idx in by_mps.values():
        sel = np.array(idx)
        keep[sel] = ~_dominated(per_gpu[sel], mps[sel], rank[sel])
    sel = np.nonzero(keep)[0]
    keep[sel] = ~_dominated(per_gpu[sel], mps[sel], rank[sel])
    return keep


def _dominated(u: np.ndarray, m: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """For each row p: does some row q have u_q >= u_p everywhere, m_p | m_q everywhere, and
    either u_q > u_p somewhere or (equal u, equal m and a better rank)?"""
    n = len(u)
    out = np.zeros(n, dtype=bool)
    for start in range(0, n, _DOMINANCE_CHUNK):
        up, mp, rp = u[start:start + _DOMINANCE_CHUNK], m[start:start + _DOMINANCE_CHUNK], \
            rank[start:start + _DOMINANCE_CHUNK]
        ge = (u[None, :, :] >= up[:, None, :]).all(axis=2)
        div = (m[None, :, :] % mp[:, None, :] == 0).all(axis=2)
        gt = (u[None, :, :] > up[:, None, :]).any(axis=2)
        same_m = (m[None, :, :] == mp[:, None, :]).all(axis=2)
        better_rank = rank[None, :] < rp[:, None]
        dom = ge & div & (gt | (same_m & better_rank))
        out[start:start + len(up)] = dom.any(axis=1)
    return out
