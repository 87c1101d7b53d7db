"""Placement of a new plan on a cluster that is serving an old one (a plan swap).

A worker's *role* is what it runs: model, GPU class, MPS share and block range.  A role the
new plan still needs keeps its worker -- same id, same GPU share, same engine, its queue --
even if the new plan numbers its pipelines and stages differently.  Every other worker of the
old plan *retires* (it finishes the batches already reserved on it, then stops); every other
worker of the new plan is *added* with a fresh id, on a GPU share chosen so that no share is
double-booked beyond the MPS level it was profiled at:

1. a free share of a GPU already running the same MPS level (its other shares kept);
2. a GPU nobody uses, old or new (spread over servers: the least-used server first);
3. the share of a retiring worker of the same level on a GPU at that level;
4. a GPU whose workers all retire.

In cases 3 and 4 the added worker *waits* for the retiring workers on its GPU: the new plan's
scheduler holds it until their last reservation ends (``CarryOver.waits``), so the GPU never
runs two plans' batches at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from ppipe_trt.errors import ConfigError
from ppipe_trt.plan import Plan
from ppipe_trt.scheduler.placement import Placement, WorkerSlot, check_stage

Role = tuple[str, str, int, int, int]   # model, gpu_class, mps_share, first_block, last_block


def role_of(slot: WorkerSlot) -> Role:
    return (slot.model, slot.gpu_class, slot.mps_share, slot.first_block, slot.last_block)


@dataclass(frozen=True, slots=True)
class CarryOver:
    """The new plan's placement and how it relates to the old one.

    ``kept``: ids of workers in both (same role, same GPU share); ``added``: ids new to this
    plan; ``retired``: ids of the old plan's workers it no longer has; ``waits``: for an added
    worker placed on a GPU share still used by retiring workers, their ids."""

    placement: Placement
    kept: tuple[int, ...]
    added: tuple[int, ...]
    retired: tuple[int, ...]
    waits: dict[int, tuple[int, ...]]


@dataclass(slots=True)
class _Gpu:
    level: int = 0                          # MPS level of its shares (0: unused)
    kept: dict[int, int] | None = None      # share index -> worker id (old or new plan)
    retiring: dict[int, int] | None = None  # share index -> retiring worker id
    waits: tuple[int, ...] = ()             # retiring workers of another level on it


def carry_over(plan: Plan, previous: Placement, first_new_id: int) -> CarryOver:
    """Place ``plan`` on the cluster where ``previous`` runs (see the module docstring).

    Added workers get ids ``first_new_id, first_new_id + 1, ...`` in plan order.  Raises
    :class:`ConfigError` when the plan's cluster is not ``previous``'s, a stage's MPS share
    exceeds the class's limit, or a class has too few GPUs even counting retiring ones."""
    cluster = plan.cluster
    if {p.gpu_class: p.count for p in cluster.pools} != previous.gpus_per_class:
        raise ConfigError(f"the new plan's cluster {cluster.label} "
                          f"({ {p.gpu_class: p.count for p in cluster.pools} }) is not the "
                          f"one being served ({previous.gpus_per_class}); a plan swap keeps "
                          "the cluster")
    server_of = {(s.gpu_class, g): s.server_id for s in previous.servers for g in s.gpu_indices}
    gpus: dict[tuple[str, int], _Gpu] = {key: _Gpu(0, {}, {}) for key in server_of}
    free_roles: dict[Role, list[WorkerSlot]] = {}
    for w in previous.workers:
        free_roles.setdefault(role_of(w), []).append(w)
    kept, pending, slots = [], [], []
    for m in plan.models:
        for pi, pipe in enumerate(m.pipelines):
            for si, st in enumerate(pipe.stages):
                check_stage(cluster, m.model, pi, si, st)
                role = (m.model, st.gpu_class, st.mps_share, st.first_block, st.last_block)
                for _ in range(st.workers):
                    old = free_roles.get(role)
                    if old:
                        w = old.pop(0)
                        slot = WorkerSlot(w.worker_id, m.model, pi, si, w.gpu_class,
                                          w.mps_share, w.gpu_index, w.server_id, w.share_index,
                                          st.first_block, st.last_block)
                        g = gpus[(w.gpu_class, w.gpu_index)]
                        g.level = w.mps_share
                        g.kept[w.share_index] = w.worker_id
                        kept.append(w.worker_id)
                        slots.append(slot)
                    else:
                        pending.append(len(slots))
                        slots.append((m.model, pi, si, st))
    retired = sorted(w.worker_id for ws in free_roles.values() for w in ws)
    for wid in retired:
        w = previous.worker(wid)
        g = gpus[(w.gpu_class, w.gpu_index)]
        g.retiring[w.share_index] = wid
        if not g.kept:
            g.level = w.mps_share   # only retiring shares on it: their level for now
    added, waits = [], {}
    next_id = first_new_id
    for idx in pending:
        model, pi, si, st = slots[idx]
        gpu, share, wait = _choose(gpus, server_of, st.gpu_class, st.mps_share)
        if gpu is None:
            raise ConfigError(f"{model} pipeline {pi} stage {si}: no {st.gpu_class} GPU share "
                              f"at MPS level {st.mps_share} left for the new plan (the cluster "
                              f"has {previous.gpus_per_class[st.gpu_class]}; kept workers hold "
                              "theirs)")
        g = gpus[(st.gpu_class, gpu)]
        g.kept[share] = next_id
        g.level = st.mps_share
        if wait:
            waits[next_id] = wait
        slots[idx] = WorkerSlot(next_id, model, pi, si, st.gpu_class, st.mps_share, gpu,
                                server_of[(st.gpu_class, gpu)], share, st.first_block,
                                st.last_block)
        added.append(next_id)
        next_id += 1
    placement = Placement(tuple(slots), previous.servers, previous.gpus_per_class,
                          ordered_ids=False)
    return CarryOver(placement, tuple(kept), tuple(added), tuple(retired), waits)


def _choose(gpus: dict[tuple[str, int], _Gpu], server_of: dict[tuple[str, int], int],
            cls: str, level: int) -> tuple[int | None, int, tuple[int, ...]]:
    """(gpu index, share index, retiring ids to wait for) for an added worker, or
    ``(None, 0, ())`` when none is left (see the module docstring for the order)."""
    mine = sorted(i for (c, i) in gpus if c == cls)
    # 1. a free share on a GPU at this level (kept workers on it)
    for i in mine:
        g = gpus[(cls, i)]
        if g.kept and g.level == level:
            for s in range(level):
                if s not in g.kept and s not in g.retiring:
                    return i, s, g.waits
    # 2. a GPU nobody uses: the least-used server first
    used_per_server: dict[int, int] = {}
    for (c, i), g in gpus.items():
        if c == cls and (g.kept or g.retiring):
            used_per_server[server_of[(c, i)]] = used_per_server.get(server_of[(c, i)], 0) + 1
    empty = [i for i in mine if not gpus[(cls, i)].kept and not gpus[(cls, i)].retiring]
    if empty:
        i = min(empty, key=lambda i: (used_per_server.get(server_of[(cls, i)], 0), i))
        return i, 0, ()
    # 3. a retiring share on a GPU at this level
    for i in mine:
        g = gpus[(cls, i)]
        if g.level == level:
            for s in range(level):
                if s not in g.kept:
                    return i, s, (g.retiring[s],) if s in g.retiring else ()
    # 4. a GPU whose workers all retire
    for i in mine:
        g = gpus[(cls, i)]
        if not g.kept and g.retiring:
            g.waits = tuple(sorted(g.retiring.values()))
            g.retiring = {}
            return i, 0, g.waits
    return None, 0, ()
