"""Build small plans by hand (tests, examples, what-if runs), with latencies from profiles.

    plan = hand_plan(profiles, cluster, [
        ModelSpec("googlenet-v3-pytorch", slo_ms=25.0, pipelines=[
            (4, [(0, 9, "L4", 1, 4)]),                       # batch 4, one stage
            (4, [(0, 6, "L4", 2, 8), (7, 9, "T4", 1, 6)]),   # two stages
        ]),
    ])

A stage is ``(first_block, last_block, gpu_class, mps_share, workers)``.  Each stage's
``latency_us`` is its profiled latency at the pipeline's batch; ``transfer_us`` the time to
send that batch's activations on to the next stage; a pipeline's throughput is that of its
slowest stage (workers x batch / latency) and its link (bandwidth / bytes per batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from ppipe_trt.cluster import ClusterSpec
from ppipe_trt.errors import ConfigError
from ppipe_trt.plan import ModelPlan, PipelinePlan, Plan, StagePlan
from ppipe_trt.profiles.types import BlockLatencyTable, ModelProfile, ProfileSet
from ppipe_trt.scheduler.tables import transfer_us

StageSpec = tuple[int, int, str, int, int]


@dataclass(frozen=True)
class ModelSpec:
    model: str
    slo_ms: float
    pipelines: Sequence[tuple[int, Sequence[StageSpec]]]
    weight: float = 1.0
    extra: dict = field(default_factory=dict)


def hand_plan(profiles: ProfileSet, cluster: ClusterSpec, specs: Sequence[ModelSpec],
              scheduler: str = "hand") -> Plan:
    models = []
    gpus: dict[str, float] = {}
    for spec in specs:
        prof = profiles[spec.model]
        pipes = []
        for batch, stages in spec.pipelines:
            sps = []
            rates = []
            for i, (first, last, cls, mps, workers) in enumerate(stages):
                lat = prof.range_latency_us(cls, mps, first, last, batch)
                xfer = 0.0
                if i + 1 < len(stages):
                    nxt = cluster.pool(stages[i + 1][2])
                    bw = min(cluster.pool(cls).link_bandwidth_gbps, nxt.link_bandwidth_gbps)
                    xfer = transfer_us(prof.bytes_out_of_block(last), batch, bw)
                sps.append(StagePlan(first, last, cls, mps, workers, lat, xfer))
                rates.append(workers * batch * 1e6 / lat)
                gpus[cls] = gpus.get(cls, 0) + workers / mps
            tput = min(rates)
            latency = sum(s.latency_us + s.transfer_us for s in sps)
            pipes.append(PipelinePlan(batch, tuple(sps), tput, latency))
        tput = sum(p.throughput_rps for p in pipes)
        models.append(ModelPlan(spec.model, spec.slo_ms, spec.weight, tuple(pipes), tput))
    norm = min(m.throughput_rps / m.weight for m in models)
    return Plan(scheduler, cluster, tuple(models), norm,
                {k: int(-(-v // 1)) for k, v in gpus.items()})


def synthetic_profile(model: str, block_latency_us: Mapping[tuple[str, int], Sequence[float]],
                      *, cut_bytes_per_sample: Sequence[int] | None = None,
                      batch_growth: float = 0.5, max_batch: int = 8) -> ModelProfile:
    """A made-up profile with exact, simple numbers (tests, what-if runs).

    ``block_latency_us[(gpu_class, mps_share)]`` lists each block's batch-1 latency; at batch
    ``b`` a block takes ``l1 * (1 + batch_growth * (b - 1))``.  Cuts default to 125 000
    bytes per sample (100 us per sample over a 10 Gbps link).
    """
    tables = {}
    num_blocks = None
    for (gpu, mps), per_block in block_latency_us.items():
        num_blocks = len(per_block)
        rows = tuple(tuple(l1 * (1.0 + batch_growth * (b - 1)) for b in range(1, max_batch + 1))
                     for l1 in per_block)
        tables[(gpu, mps)] = BlockLatencyTable(model, gpu, mps, rows)
    if num_blocks is None:
        raise ConfigError(f"{model}: synthetic profile needs at least one latency table")
    cuts = tuple(cut_bytes_per_sample if cut_bytes_per_sample is not None
                 else [125_000] * (num_blocks - 1))
    return ModelProfile(model, num_blocks, cuts, tables)
