"""Placement: which GPU (and which server) runs each worker of a plan.

A plan says, per stage, how many workers of one GPU class at one MPS share it needs; it does
not say where they run.  :func:`place_workers` decides that, deterministically:

* workers are numbered ``0..N-1`` in plan order (model, pipeline, stage, worker);
* within a GPU class, the workers of one MPS share ``m`` are packed ``m`` to a GPU (a GPU only
  ever hosts shares of one level, since a profile at share ``m`` assumes ``m`` co-runners); a
  stage first fills the partly used GPU left by the previous stage of the same level, then
  opens new GPUs, in plan order, so the workers of one stage sit on neighbouring GPUs;
* GPU ``i`` of a class sits in server ``i // gpus_per_server`` of that class; servers are
  numbered globally, class by class in cluster order.  All workers of a server share its one
  network link (an uplink and a downlink);
* the packed GPUs are spread over the class's servers to balance link load: each GPU's
  uplink and downlink busy fraction at the plan's rates (from the stages' ``transfer_us``
  and the pipelines' throughput) is computed, and GPUs are placed heaviest first on the
  server whose busier direction stays least loaded.  Without this, the stage-major packing
  puts several heavy senders behind one uplink while other servers' links idle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ppipe_trt.errors import ConfigError
from ppipe_trt.plan import Plan


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """Where one worker sits: in the plan (model, pipeline, stage, inclusive block range
    ``first_block..last_block``) and in the cluster (a whole GPU when ``mps_share == 1``, else
    one of ``mps_share`` MPS shares of it).

    ``gpu_index`` is the GPU's index within its class (0-based); ``share_index`` which share
    of that GPU the worker holds; ``server_id`` the global server number (see
    :class:`ServerSlot`).  The scheduler places and reserves by it; the serving workers carry
    it as their identity (``ppipe_trt.serving.worker.WorkerInfo`` is this type).
    """

    worker_id: int
    model: str
    pipeline: int
    stage: int
    gpu_class: str
    mps_share: int = 1
    gpu_index: int = 0
    server_id: int = 0
    share_index: int = 0
    first_block: int = 0
    last_block: int = 0


@dataclass(frozen=True, slots=True)
class ServerSlot:
    """One server: ``gpu_indices`` (within ``gpu_class``) share one link of
    ``link_bandwidth_gbps`` in each direction."""

    server_id: int
    gpu_class: str
    gpu_indices: tuple[int, ...]
    link_bandwidth_gbps: float


class Placement:
    """The result of :func:`place_workers`: immutable after construction."""

    __slots__ = ("workers", "servers", "gpus_per_class", "_pools", "_gpu_workers", "_by_id")

    def __init__(self, workers: tuple[WorkerSlot, ...], servers: tuple[ServerSlot, ...],
                 gpus_per_class: Mapping[str, int], *, ordered_ids: bool = True):
        """``ordered_ids``: worker ids are ``0..N-1`` in order (what :func:`place_workers`
        makes); ``False`` accepts any distinct ids (a placement carried over from an
        earlier plan, see :mod:`ppipe_trt.scheduler.carry_over`)."""
        self.workers = workers
        self.servers = servers
        self.gpus_per_class = dict(gpus_per_class)
        pools: dict[tuple[str, int, int], list[WorkerSlot]] = {}
        gpu_workers: dict[tuple[str, int], list[WorkerSlot]] = {}
        self._by_id: dict[int, WorkerSlot] = {}
        for i, w in enumerate(workers):
            if ordered_ids and w.worker_id != i:
                raise ConfigError(f"worker ids must be 0..{len(workers) - 1} in order; "
                                  f"position {i} holds id {w.worker_id}")
            if w.worker_id in self._by_id:
                raise ConfigError(f"worker id {w.worker_id} appears twice in the placement")
            self._by_id[w.worker_id] = w
            pools.setdefault((w.model, w.pipeline, w.stage), []).append(w)
            gpu_workers.setdefault((w.gpu_class, w.gpu_index), []).append(w)
        self._pools = {k: tuple(v) for k, v in pools.items()}
        self._gpu_workers = {k: tuple(v) for k, v in gpu_workers.items()}

    def worker(self, worker_id: int) -> WorkerSlot:
        try:
            return self._by_id[worker_id]
        except KeyError:
            raise ConfigError(f"no worker {worker_id}; placement has workers "
                              f"{_id_ranges(sorted(self._by_id))}") from None

    @property
    def worker_ids(self) -> tuple[int, ...]:
        return tuple(w.worker_id for w in self.workers)

    def pool(self, model: str, pipeline: int, stage: int) -> tuple[WorkerSlot, ...]:
        """The workers serving ``stage`` of ``pipeline`` of ``model`` (empty if none)."""
        return self._pools.get((model, pipeline, stage), ())

    def server(self, server_id: int) -> ServerSlot:
        if not 0 <= server_id < len(self.servers):
            raise ConfigError(f"no server {server_id}; placement has servers "
                              f"0..{len(self.servers) - 1}")
        return self.servers[server_id]

    def gpu_workers(self, gpu_class: str, gpu_index: int) -> tuple[WorkerSlot, ...]:
        """The workers sharing one GPU (empty for an idle GPU)."""
        return self._gpu_workers.get((gpu_class, gpu_index), ())

    @property
    def num_servers(self) -> int:
        return len(self.servers)

    def __len__(self) -> int:
        return len(self.workers)

    def __repr__(self) -> str:
        used = {c: len({w.gpu_index for w in self.workers if w.gpu_class == c})
                for c in self.gpus_per_class}
        return (f"Placement({len(self.workers)} workers on GPUs {used} of "
                f"{self.gpus_per_class}, {len(self.servers)} servers)")


def check_stage(cluster, model: str, pi: int, si: int, st) -> None:
    """Raise :class:`ConfigError` unless stage ``si`` of pipeline ``pi`` can be placed: its MPS
    share within the class's limit, at least one worker."""
    pool = cluster.pool(st.gpu_class)
    if not 1 <= st.mps_share <= pool.max_mps:
        raise ConfigError(f"{model} pipeline {pi} stage {si}: MPS share {st.mps_share} on "
                          f"{st.gpu_class}; the cluster allows 1..{pool.max_mps}")
    if st.workers < 1:
        raise ConfigError(f"{model} pipeline {pi} stage {si}: {st.workers} workers; "
                          "expected >= 1")


def _id_ranges(ids: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0..2, 5"``."""
    if not ids:
        return "none"
    out, start, prev = [], ids[0], ids[0]
    for i in ids[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}..{prev}" if prev > start else f"{start}")
        if i is not None:
            start = prev = i
    return ", ".join(out)


def packed_gpus(plan: Plan) -> dict[str, int]:
    """Whole GPUs per class that :func:`place_workers` packs ``plan``'s workers into: per MPS
    level ``m``, ``ceil(workers at m / m)`` (a GPU hosts shares of one level only)."""
    workers: dict[tuple[str, int], int] = {}
    for m in plan.models:
        for pipe in m.pipelines:
            for st in pipe.stages:
                key = (st.gpu_class, st.mps_share)
                workers[key] = workers.get(key, 0) + st.workers
    out: dict[str, int] = {}
    for (cls, level), n in workers.items():
        out[cls] = out.get(cls, 0) + -(-n // level)
    return out


def place_workers(plan: Plan) -> Placement:
    """Assign every worker of ``plan`` a GPU and a server (see the module docstring).

    Raises :class:`ConfigError` when a class needs more GPUs than the cluster has, or a stage
    uses an MPS share above the class's ``max_mps``.
    """
    cluster = plan.cluster
    # Pack shares into "virtual" GPUs, numbered per class in plan order.  Per class: the next
    # fresh virtual GPU; per (class, share): [gpu, shares used] of the partly filled one.
    next_gpu = {p.gpu_class: 0 for p in cluster.pools}
    open_gpu: dict[tuple[str, int], list[int]] = {}
    load: dict[tuple[str, int], list[float]] = {}   # (class, vgpu) -> [uplink, downlink]
    raw: list[tuple] = []
    for m in plan.models:
        for pi, pipe in enumerate(m.pipelines):
            for si, st in enumerate(pipe.stages):
                check_stage(cluster, m.model, pi, si, st)
                # busy fraction of the links one worker of this stage causes at plan rate
                batches_per_s = pipe.throughput_rps / pipe.batch_size / st.workers
                up = batches_per_s * st.transfer_us / 1e6
                down = batches_per_s * pipe.stages[si - 1].transfer_us / 1e6 if si else 0.0
                key = (st.gpu_class, st.mps_share)
                for _ in range(st.workers):
                    slot = open_gpu.get(key)
                    if slot is None or slot[1] >= st.mps_share:
                        slot = [next_gpu[st.gpu_class], 0]
                        next_gpu[st.gpu_class] += 1
                        open_gpu[key] = slot
                    raw.append((m.model, pi, si, st.gpu_class, st.mps_share, slot[0], slot[1],
                                st.first_block, st.last_block))
                    acc = load.setdefault((st.gpu_class, slot[0]), [0.0, 0.0])
                    acc[0] += up
                    acc[1] += down
                    slot[1] += 1
    for p in cluster.pools:
        if next_gpu[p.gpu_class] > p.count:
            raise ConfigError(f"plan needs {next_gpu[p.gpu_class]} {p.gpu_class} GPUs once MPS "
                              f"shares are packed (a GPU hosts shares of one level); the "
                              f"cluster has {p.count}.  Plan again with `ppipe plan`: it "
                              "counts whole GPUs per MPS level")
    servers: list[ServerSlot] = []
    gpu_of: dict[tuple[str, int], int] = {}   # (class, vgpu) -> gpu index
    server_base: dict[str, int] = {}
    for p in cluster.pools:
        server_base[p.gpu_class] = len(servers)
        nsrv = p.num_servers
        for s in range(nsrv):
            gpus = tuple(range(s * p.gpus_per_server, min(p.count, (s + 1) * p.gpus_per_server)))
            servers.append(ServerSlot(len(servers), p.gpu_class, gpus, p.link_bandwidth_gbps))
        gpu_of.update(_spread(p.gpu_class, next_gpu[p.gpu_class], load, nsrv,
                              [len(servers[server_base[p.gpu_class] + s].gpu_indices)
                               for s in range(nsrv)], p.gpus_per_server))
    workers = []
    for wid, (model, pi, si, cls, share, vgpu, share_idx, first, last) in enumerate(raw):
        gpu = gpu_of[(cls, vgpu)]
        server = server_base[cls] + gpu // cluster.pool(cls).gpus_per_server
        workers.append(WorkerSlot(wid, model, pi, si, cls, share, gpu, server, share_idx,
                                  first, last))
    return Placement(tuple(workers), tuple(servers), {p.gpu_class: p.count for p in cluster.pools})


def _spread(cls: str, used: int, load: dict, nsrv: int, capacity: list[int],
            gpus_per_server: int) -> dict[tuple[str, int], int]:
    """Give the ``used`` virtual GPUs of ``cls`` GPU indices so that servers' link loads are
    balanced: heaviest first, each to the server whose busier direction stays least loaded
    (ties: lowest server).  Idle GPUs take the remaining slots."""
    srv_load = [[0.0, 0.0] for _ in range(nsrv)]
    filled = [0] * nsrv
    order = sorted(range(used), key=lambda v: (-max(load.get((cls, v), (0.0, 0.0))),
                                                -sum(load.get((cls, v), (0.0, 0.0))), v))
    out = {}
    for v in order:
        up, down = load.get((cls, v), (0.0, 0.0))
        best, best_key = -1, None
        for s in range(nsrv):
            if filled[s] >= capacity[s]:
                continue
            k = (max(srv_load[s][0] + up, srv_load[s][1] + down),
                 srv_load[s][0] + srv_load[s][1] + up + down, s)
            if best_key is None or k < best_key:
                best, best_key = s, k
        srv_load[best][0] += up
        srv_load[best][1] += down
        out[(cls, v)] = best * gpus_per_server + filled[best]
        filled[best] += 1
    return out
