"""DART-r, built from the NP plan (NP itself is the MILP with one stage and MPS share 1).

DART-r (as in the PPipe artifact): the NP plan divides each GPU class among the models; GPUs
NP leaves unused are dealt out evenly (integer division).  Each model then runs, on as many
(high, low) GPU pairs as its scarcer class allows, the best configuration one high-class plus
one low-class GPU can hold (a two-stage pipeline across the pair, or one whole-model pipeline
per GPU, whichever serves more), replicated over the pairs; its leftover GPUs of the more
plentiful class each run the whole model.  Everything runs at MPS share 1.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

from ppipe_trt.cluster import ClusterSpec, Workload
from ppipe_trt.errors import BadInputError
from ppipe_trt.plan import Plan
from ppipe_trt.profiles.types import ProfileSet

from planner.assemble import build_plan, merge_allocations
from planner.candidates import CandidateSet, PipelineCandidate
from planner.milp import Allocation


def plan_dart_r(profiles: ProfileSet, cluster: ClusterSpec, workloads: Sequence[Workload],
                np_plan: Plan, sets: Sequence[CandidateSet], limits: Mapping[str, int], *,
                solver: str, mip_gap: float, started: float, params: Mapping[str, Any]) -> Plan:
    """DART-r plan from ``np_plan`` (see the module docstring).

    ``sets``: per workload, the MPS-share-1 candidates of up to two stages (one stage when the
    cluster has one GPU class) to choose the pair and whole-model configurations from.
    """
    classes = [c for c in cluster.gpu_classes if limits.get(c, 0) > 0]
    if len(classes) > 2:
        raise BadInputError(f"dart-r pairs two GPU classes; cluster {cluster.label} has "
                            f"{len(classes)} ({', '.join(classes)})")
    used = {c: sum(m.gpus_used.get(c, 0) for m in np_plan.models) for c in classes}
    share = {c: (limits[c] - used[c]) // len(workloads) for c in classes}
    allocations: dict[str, tuple[Allocation, ...]] = {}
    for wl, cset, mplan in zip(workloads, sets, np_plan.models):
        budget = {c: mplan.gpus_used.get(c, 0) + share[c] for c in classes}
        singles = {cls: _best(c for c in cset.candidates if len(c.stages) == 1
                              and c.stages[0].gpu_class == cls) for cls in classes}
        allocs: list[Allocation] = []
        if len(classes) == 2:
            hi, lo = classes
            pairs = min(budget[hi], budget[lo])
            if pairs > 0:
                allocs.extend(_pair_config(cset.candidates, singles, hi, lo, pairs))
            extra_cls = hi if budget[hi] >= budget[lo] else lo
            extra = budget[extra_cls] - pairs
        else:
            extra_cls = classes[0]
            extra = budget[extra_cls]
        if extra > 0 and singles[extra_cls] is not None:
            allocs.append(Allocation(singles[extra_cls], (extra,)))
        allocations[wl.model] = merge_allocations(allocs)
    return build_plan("dart-r", cluster, workloads, allocations, solver=solver, mip_gap=mip_gap,
                      solve_s=time.perf_counter() - started, params=params,
                      profiles_source=profiles.source)


def _best(cands) -> PipelineCandidate | None:
    """Highest per-worker throughput; ties: smaller batch, then enumeration order."""
    best = None
    for c in cands:
        cap = min(s.capacity_rps for s in c.stages)
        if best is None or cap > best[0] + 1e-9 or (abs(cap - best[0]) <= 1e-9
                                                     and c.batch_size < best[1].batch_size):
            best = (cap, c)
    return None if best is None else best[1]


def _pair_config(cands: Sequence[PipelineCandidate], singles: Mapping[str, Any], hi: str,
                 lo: str, pairs: int) -> list[Allocation]:
    two = _best(c for c in cands if len(c.stages) == 2 and set(c.classes) == {hi, lo})
    two_rps = min(s.capacity_rps for s in two.stages) if two else 0.0
    single_rps = sum(s.stages[0].capacity_rps for s in singles.values() if s is not None)
    if two is not None and two_rps >= single_rps:
        return [Allocation(two, (pairs, pairs))]
    return [Allocation(s, (pairs,)) for s in singles.values() if s is not None]
