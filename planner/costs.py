"""The planner's cost model: transfer time, link caps and batch-building delay.

Shared by candidate enumeration and by :func:`planner.verify.verify_plan`, so a plan is always
re-checked with exactly the arithmetic that produced it.  Units: microseconds, bytes per sample,
requests (samples) per second, Gbit/s.
"""

from __future__ import annotations

import math

from ppipe_trt.cluster import ClusterSpec, GpuPool
from ppipe_trt.profiles.types import ModelProfile


def cut_bandwidth_gbps(src: GpuPool, dst: GpuPool) -> float:
    """Bandwidth of a cut between a server of ``src`` and one of ``dst``: the slower link."""
    return min(src.link_bandwidth_gbps, dst.link_bandwidth_gbps)


def transfer_us_per_sample(nbytes: float, bandwidth_gbps: float) -> float:
    """Time to send ``nbytes`` over a ``bandwidth_gbps`` link, in microseconds."""
    return nbytes * 8.0 / (bandwidth_gbps * 1e3)


def link_cap_rps(nbytes: float, pool: GpuPool, mps_share: int) -> float:
    """Samples/s one worker can push through its server's link at a cut of ``nbytes``/sample.

    A server's ``gpus_per_server`` GPUs, each split into ``mps_share`` workers, share one link;
    each worker is given an equal slice (the PPipe artifact's accounting).  ``inf`` for 0 bytes.
    """
    if nbytes <= 0:
        return math.inf
    return pool.link_bandwidth_gbps * 1e9 / (nbytes * 8.0) / (mps_share * pool.gpus_per_server)


def batching_delay_us(batch: int, rate_rps: float | None, factor: float) -> float:
    """Estimated time to gather ``batch`` requests at ``rate_rps``: ``factor (b-1) / rate``.

    ``inf`` for a batch > 1 when no rate is known (then only batch 1 is plannable).
    """
    if batch <= 1 or factor == 0.0:
        return 0.0
    if not rate_rps or rate_rps <= 0:
        return math.inf
    return factor * (batch - 1) / rate_rps * 1e6


def stage_capacity_rps(profile: ModelProfile, cluster: ClusterSpec, first: int, last: int,
                       gpu_class: str, mps_share: int, batch: int) -> float:
    """Throughput (samples/s) of one worker running blocks ``first..last`` at ``batch``.

    Compute-bound ``batch / latency``, capped by the worker's link slice at the stage's input
    cut (unless it starts the model) and output cut (unless it ends it).
    """
    pool = cluster.pool(gpu_class)
    latency = profile.range_latency_us(gpu_class, mps_share, first, last, batch)
    cap = batch * 1e6 / latency
    if first > 0:
        cap = min(cap, link_cap_rps(profile.cut_bytes_per_sample[first - 1], pool, mps_share))
    if last < profile.num_blocks - 1:
        cap = min(cap, link_cap_rps(profile.cut_bytes_per_sample[last], pool, mps_share))
    return cap


def stage_transfer_us(profile: ModelProfile, cluster: ClusterSpec, last_block: int,
                      gpu_class: str, next_gpu_class: str | None, batch: int) -> float:
    """Time to ship a batch's activations after ``last_block`` to the next stage (0 if none)."""
    if next_gpu_class is None or last_block >= profile.num_blocks - 1:
        return 0.0
    bw = cut_bandwidth_gbps(cluster.pool(gpu_class), cluster.pool(next_gpu_class))
    return transfer_us_per_sample(profile.cut_bytes_per_sample[last_block], bw) * batch
