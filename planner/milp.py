"""The planning MILP, written once over candidate pipelines and handed to any solver.

Variables (per model ``i``, candidate pipeline ``p`` of ``i``, stage ``s`` of ``p``)::

    w[p,s]  integer workers of stage s (each owns 1/mps GPU)
    x[p]    throughput of p, req/s (for one-stage candidates x[p] = cap[p,0] * w[p,0], folded)
    G[i,s,c] integer GPUs of class c given to model i's stage index s (the paper's rounding:
            GPUs are rounded up per (model, stage index, class), summed over pipelines)
    t       the minimum over models of throughput / weight

Constraints::

    x[p] <= cap[p,s] * w[p,s]                        every stage of a multi-stage candidate
    sum_{p,s on c} w[p,s] / mps[p,s] <= G[i,s,c]
    sum_{i,s} G[i,s,c] <= GPUs of class c
    weight[i] * t <= sum_p x[p]

With ``whole_gpus_per_level`` (the planner's fallback when placement would need more GPUs
than the cluster has, see ``planner.planning``), also what placement needs: a GPU hosts MPS
shares of one level only (a profile at share ``m`` assumes ``m`` co-runners), so::

    sum_{all stages on c at level m} w[p,s] / m <= H[c,m]     H integer
    sum_m H[c,m] <= GPUs of class c

Phase 1 maximises ``t``.  Phase 2 (``tie_break``) keeps ``t`` and phase 1's workers (they can
only grow) and maximises the sum of normalized throughputs minus a small penalty per newly
opened pipeline, so that GPUs phase 1 left idle go to the models without opening many
pipelines.  Keeping the workers makes phase 2 a cheap solve.
"""

from __future__ import annotations

import math
from fractions import Fraction
from dataclasses import dataclass
from typing import Mapping, Sequence

from ppipe_trt.cluster import Workload

from planner.candidates import CandidateSet, PipelineCandidate
from planner.solvers import MilpModel, solve, solve_lp_relaxation

#: Relative slack when phase 2 keeps phase 1's objective (solver feasibility tolerance).
_KEEP_OBJECTIVE_SLACK = 1e-7
#: Relative MIP gap of the tie-break solve (its objective only ranks equally good plans).
_TIE_BREAK_GAP = 1e-3
#: Branch-and-bound nodes the tie-break may explore: it starts from phase 1's plan, so a
#: deterministic work limit (not a time limit) keeps it cheap and the output reproducible.
_TIE_BREAK_NODES = 200
_TIE_BREAK_KEEPS_WORKERS = True


@dataclass(frozen=True, slots=True)
class Allocation:
    """A candidate pipeline with the integer workers the MILP gave each stage."""

    candidate: PipelineCandidate
    workers: tuple[int, ...]

    @property
    def throughput_rps(self) -> float:
        return min(s.capacity_rps * w for s, w in zip(self.candidate.stages, self.workers))


@dataclass(frozen=True, slots=True)
class MilpOutcome:
    """Solved allocation.  ``normalized_throughput`` is recomputed from the integer workers."""

    allocations: Mapping[str, tuple[Allocation, ...]]
    normalized_throughput: float
    solver: str
    mip_gap: float
    solve_s: float
    num_cols: int
    num_rows: int
    num_integer: int


@dataclass(slots=True)
class _Built:
    model: MilpModel
    t: int
    x_terms: list[list[tuple[int, float]]]       # per model: (col, coefficient) summing to x
    pipe_cols: list[list[tuple[PipelineCandidate, list[int], int | None]]]
    gpu_limits: Mapping[str, int]
    models: list[str]
    class_rows: dict[str, int]
    g_cols: dict[tuple[int, int, str], int]
    h_cols: dict[tuple[str, int], int]


def _build(sets: Sequence[CandidateSet], workloads: Sequence[Workload],
           gpu_limits: Mapping[str, int], whole_gpus_per_level: bool = False) -> _Built:
    mm = MilpModel()
    t = mm.add_col("t", cost=1.0)
    x_terms: list[list[tuple[int, float]]] = []
    pipe_cols: list[list[tuple[PipelineCandidate, list[int], int | None]]] = []
    gpu_cols: dict[str, list[int]] = {c: [] for c in gpu_limits}
    g_cols: dict[tuple[int, int, str], int] = {}
    level_usage: dict[tuple[str, int], dict[int, float]] = {}
    for i, (cset, wl) in enumerate(zip(sets, workloads)):
        terms: list[tuple[int, float]] = []
        pipes = []
        usage: dict[tuple[int, str], dict[int, float]] = {}
        for j, cand in enumerate(cset.candidates):
            wcols = []
            for s, st in enumerate(cand.stages):
                ub = gpu_limits.get(st.gpu_class, 0) * st.mps_share
                col = mm.add_col(f"w_{i}_{j}_{s}", upper=float(ub), integer=True)
                wcols.append(col)
                usage.setdefault((s, st.gpu_class), {})[col] = 1.0 / st.mps_share
                level_usage.setdefault((st.gpu_class, st.mps_share), {})[col] = \
                    1.0 / st.mps_share
            if len(cand.stages) == 1:
                terms.append((wcols[0], cand.stages[0].capacity_rps))
                xcol = None
            else:
                ub = min(st.capacity_rps * gpu_limits.get(st.gpu_class, 0) * st.mps_share
                         for st in cand.stages)
                xcol = mm.add_col(f"x_{i}_{j}", upper=ub)
                for st, wcol in zip(cand.stages, wcols):
                    mm.add_row({xcol: 1.0, wcol: -st.capacity_rps}, upper=0.0)
                terms.append((xcol, 1.0))
            pipes.append((cand, wcols, xcol))
        for (s, cls), row in sorted(usage.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            g = mm.add_col(f"G_{i}_{s}_{cls}", upper=float(gpu_limits.get(cls, 0)), integer=True)
            gpu_cols[cls].append(g)
            g_cols[(i, s, cls)] = g
            mm.add_row({**row, g: -1.0}, upper=0.0)
        mm.add_row({t: wl.weight, **{c: -v for c, v in terms}}, upper=0.0)
        x_terms.append(terms)
        pipe_cols.append(pipes)
    class_rows = {}
    for cls, cols in gpu_cols.items():
        if cols:
            class_rows[cls] = mm.add_row({c: 1.0 for c in cols}, upper=float(gpu_limits[cls]))
    h_cols: dict[tuple[str, int], int] = {}
    if whole_gpus_per_level:
        for (cls, level), row in sorted(level_usage.items()):
            h = mm.add_col(f"H_{cls}_{level}", upper=float(gpu_limits.get(cls, 0)),
                           integer=True)
            h_cols[(cls, level)] = h
            mm.add_row({**row, h: -1.0}, upper=0.0)
        for cls in gpu_cols:
            hs = [h for (c, _), h in h_cols.items() if c == cls]
            if hs:
                mm.add_row({h: 1.0 for h in hs}, upper=float(gpu_limits[cls]))
    return _Built(mm, t, x_terms, pipe_cols, gpu_limits, [w.model for w in workloads],
                  class_rows, g_cols, h_cols)


def solve_allocation(sets: Sequence[CandidateSet], workloads: Sequence[Workload],
                     gpu_limits: Mapping[str, int], *, solver: str, time_limit_s: float,
                     mip_rel_gap: float, tie_break: bool = True, pipeline_penalty: float = 1e-3,
                     gurobi_max_vars: int = 2000, gurobi_max_constraints: int = 2000,
                     start: Mapping[str, Sequence[Allocation]] | None = None,
                     first_time_limit_s: float | None = None,
                     whole_gpus_per_level: bool = False) -> MilpOutcome:
    """Choose integer workers for the candidates of every model (see the module docstring).

    ``start``: a feasible allocation (over candidates present in ``sets``) the solver starts
    from, so the result is never worse (ignored when it breaks ``whole_gpus_per_level``).
    ``first_time_limit_s`` overrides the time limit of the main solve.
    ``whole_gpus_per_level``: also count whole GPUs per class and MPS level, as placement
    packs them (see the module docstring).
    """
    built = _build(sets, workloads, gpu_limits, whole_gpus_per_level)
    kw = dict(time_limit_s=time_limit_s, mip_rel_gap=mip_rel_gap,
              gurobi_max_vars=gurobi_max_vars, gurobi_max_constraints=gurobi_max_constraints)
    start_values = _start_values(built, start, workloads) if start else None
    first = solve(built.model, solver, start=start_values,
                  **{**kw, "time_limit_s": first_time_limit_s or time_limit_s})
    values = list(first.values)
    solve_s = first.solve_s
    solver_used = first.solver
    t_best = _normalized_from(built, values, workloads)
    if start_values is not None:
        # A solver that stopped early may not have adopted the start: never return less.
        t_start = _normalized_from(built, start_values, workloads)
        if t_start > t_best:
            values, t_best = list(start_values), t_start
    if tie_break and t_best > 0:
        second_model, start = _tie_break_model(built, workloads, values, t_best, pipeline_penalty)
        # Phase 2 must use the solver phase 1 used (so 'auto' does not switch solvers midway),
        # unless Gurobi refuses the larger model; then auto falls back to HiGHS.
        phase2_solver = solver_used if solver != "auto" else "auto"
        # The tie-break only ranks plans of equal minimum: a looser gap is enough there.
        second = solve(second_model, phase2_solver, start=start, node_limit=_TIE_BREAK_NODES,
                       **{**kw, "mip_rel_gap": max(mip_rel_gap, _TIE_BREAK_GAP)})
        solve_s += second.solve_s
        candidate_values = list(second.values[:built.model.num_cols])
        if _normalized_from(built, candidate_values, workloads) >= t_best * (1 - 1e-6):
            values = candidate_values
            if second.solver != solver_used:
                solver_used = f"{solver_used}+{second.solver}"
    allocations = _allocations(built, values)
    normalized = min(
        (sum(a.throughput_rps for a in allocations[w.model]) / w.weight for w in workloads),
        default=0.0)
    return MilpOutcome(allocations, normalized, solver_used, first.mip_gap, solve_s,
                       built.model.num_cols, built.model.num_rows, built.model.num_integer)


def screen_candidates(sets: Sequence[CandidateSet], workloads: Sequence[Workload],
                      gpu_limits: Mapping[str, int], per_model: int) -> list[CandidateSet]:
    """Keep, per model, the candidates its LP relaxation uses plus the ``per_model`` cheapest.

    Price of a candidate = sum over stages of (GPU-class price from the LP duals) / (req/s one
    GPU of that stage delivers): the GPU cost of one req/s.  Used where the full candidate set
    makes the MILP too large (three-stage pipelines); a heuristic, not an exact reduction.
    """
    built = _build(sets, workloads, gpu_limits)
    values, duals = solve_lp_relaxation(built.model)
    price = {cls: abs(duals[row]) for cls, row in built.class_rows.items()}
    out = []
    for cset, pipes in zip(sets, built.pipe_cols):
        scored = []
        for j, (cand, wcols, xcol) in enumerate(pipes):
            used = (values[xcol] if xcol is not None else values[wcols[0]]) > 1e-9
            cost = sum(price.get(s.gpu_class, 0.0) / (s.capacity_rps * s.mps_share)
                       for s in cand.stages)
            scored.append((not used, cost, j))
        keep = sorted(j for _, _, j in sorted(scored)[:max(per_model, 1)])
        keep = sorted(set(keep) | {j for unused, _, j in scored if not unused})
        out.append(CandidateSet(cset.model, tuple(cset.candidates[j] for j in keep),
                                cset.enumerated, cset.min_latency_us))
    return out


def _tie_break_model(built: _Built, workloads: Sequence[Workload], values: list[float],
                     t_best: float, penalty: float) -> tuple[MilpModel, list[float]]:
    base = built.model
    mm = MilpModel(list(base.col_lower), list(base.col_upper), [0.0] * base.num_cols,
                   list(base.col_integer), list(base.col_names),
                   [list(r) for r in base.row_index], [list(r) for r in base.row_value],
                   list(base.row_lower), list(base.row_upper))
    start = list(values)
    mm.col_lower[built.t] = t_best * (1 - _KEEP_OBJECTIVE_SLACK)
    start[built.t] = max(start[built.t], mm.col_lower[built.t])
    for terms, wl in zip(built.x_terms, workloads):
        for col, coef in terms:
            mm.col_cost[col] += coef / (wl.weight * t_best)
    for i, pipes in enumerate(built.pipe_cols):
        for j, (_, wcols, _) in enumerate(pipes):
            used = values[wcols[0]] > 0.5
            if used and _TIE_BREAK_KEEPS_WORKERS:
                # Phase 2 only hands out what phase 1 left: workers can grow, never shrink.
                for col in wcols:
                    mm.col_lower[col] = float(round(values[col]))
            if penalty > 0 and not (used and _TIE_BREAK_KEEPS_WORKERS):
                y = mm.add_col(f"y_{i}_{j}", upper=1.0, cost=-penalty, integer=True)
                mm.add_row({wcols[0]: 1.0, y: -base.col_upper[wcols[0]]}, upper=0.0)
                start.append(1.0 if used else 0.0)
    return mm, start


def candidate_key(c: PipelineCandidate) -> tuple:
    """Identity of a candidate across enumerations: batch and per-stage (blocks, class, MPS)."""
    return (c.batch_size, tuple((s.first_block, s.last_block, s.gpu_class, s.mps_share)
                                for s in c.stages))


def _start_values(built: _Built, start: Mapping[str, Sequence[Allocation]],
                  workloads: Sequence[Workload]) -> list[float] | None:
    values = [0.0] * built.model.num_cols
    usage: dict[tuple[int, int, str], Fraction] = {}
    for i, (model, pipes) in enumerate(zip(built.models, built.pipe_cols)):
        by_key = {candidate_key(a.candidate): a for a in start.get(model, ())}
        for cand, wcols, xcol in pipes:
            alloc = by_key.pop(candidate_key(cand), None)
            if alloc is None:
                continue
            for s, (st, col, w) in enumerate(zip(cand.stages, wcols, alloc.workers)):
                values[col] = float(w)
                key = (i, s, st.gpu_class)
                usage[key] = usage.get(key, Fraction(0)) + Fraction(w, st.mps_share)
            if xcol is not None:
                values[xcol] = alloc.throughput_rps
    for key, frac in usage.items():
        values[built.g_cols[key]] = float(math.ceil(frac))
    if built.h_cols:
        per_level: dict[tuple[str, int], Fraction] = {}
        for cset_pipes in built.pipe_cols:
            for cand, wcols, _ in cset_pipes:
                for st, col in zip(cand.stages, wcols):
                    key2 = (st.gpu_class, st.mps_share)
                    per_level[key2] = per_level.get(key2, Fraction(0)) + \
                        Fraction(int(values[col]), st.mps_share)
        per_class: dict[str, int] = {}
        for key2, frac in per_level.items():
            values[built.h_cols[key2]] = float(math.ceil(frac))
            per_class[key2[0]] = per_class.get(key2[0], 0) + math.ceil(frac)
        if any(n > built.gpu_limits.get(c, 0) for c, n in per_class.items()):
            return None   # the start needs more whole GPUs than the cluster has
    values[built.t] = _normalized_from(built, values, workloads)
    return values


def _normalized_from(built: _Built, values: list[float], workloads: Sequence[Workload]) -> float:
    allocations = _allocations(built, values)
    return min((sum(a.throughput_rps for a in allocations[w.model]) / w.weight
                for w in workloads), default=0.0)


def _allocations(built: _Built, values: list[float]) -> dict[str, tuple[Allocation, ...]]:
    """Integer workers per used candidate, trimmed to what the pipeline's throughput needs."""
    out: dict[str, tuple[Allocation, ...]] = {}
    for model, pipes in zip(built.models, built.pipe_cols):
        model_allocs = []
        for cand, wcols, xcol in pipes:
            workers = [int(round(values[c])) for c in wcols]
            if min(workers) <= 0:
                continue
            planned = (cand.stages[0].capacity_rps * workers[0] if xcol is None
                       else min(values[xcol], min(s.capacity_rps * w
                                                  for s, w in zip(cand.stages, workers))))
            if planned <= 0:
                continue
            # Stages with more workers than the pipeline's throughput needs give them back.
            trimmed = tuple(min(w, max(1, math.ceil(planned / s.capacity_rps - 1e-6)))
                            for s, w in zip(cand.stages, workers))
            model_allocs.append(Allocation(cand, trimmed))
        out[model] = tuple(model_allocs)
    return out
