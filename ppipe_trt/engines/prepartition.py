"""Pre-partitioning: cut a topologically ordered layer sequence into N contiguous blocks.

The problem is one-dimensional.  Nodes ``0 .. L-1`` are in topological order; a cut after
node ``j`` costs ``cut_bytes[j]`` bytes per sample (everything alive across that position,
long skip connections included); a position where ``allowed_cuts[j]`` is False (a tensor
without a batch dimension would cross it) is never chosen, and when fewer positions are
allowed than cuts requested, fewer blocks result.  We choose ``N - 1`` cut positions
minimising the total bytes crossing them, subject to a balance constraint on *every*
profiled GPU class: each block's latency lies within ``[lower, upper] x (total / N)`` of
that class.  This is the PPipe artifact's formulation (its MILP normalises each block by the
class total and bounds it by ``lower / N .. upper / N``); here it is solved exactly by
dynamic programming.

For a fixed block end, the feasible block starts form one interval per GPU class (prefix
sums of non-negative latencies are monotone), and the intersection of intervals is an
interval whose ends only move right as the end moves right.  So each DP layer is a sliding
window minimum: ``O(N * L)`` time overall.

If no partition satisfies the bounds, they are relaxed along :data:`DEFAULT_RELAXATION` (the
artifact's own ladder) and the bounds actually used are reported.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ppipe_trt.errors import BadInputError, InfeasiblePlanError

#: Balance bounds tried in order until one is feasible, as (lower, upper) multiples of
#: total / N.  Same ladder as the PPipe artifact, so results are comparable.
DEFAULT_RELAXATION: tuple[tuple[float, float], ...] = (
    (0.7, 1.3), (0.5, 1.5), (0.5, 2.0), (0.5, 2.5), (0.5, 3.0), (0.5, 3.5), (0.5, 4.0),
    (0.4, 4.0),
)

# Relative slack on the bounds so a block sitting exactly on a bound is not lost to rounding.
_REL_SLACK = 1e-9


@dataclass(frozen=True, slots=True)
class Partition:
    """A partition of ``num_nodes`` ordered nodes into ``num_blocks`` contiguous blocks.

    ``block_ranges[b] = (first_node, last_node)``, inclusive.  ``cut_positions[i]`` is the
    node after which cut ``i`` lies; ``cut_bytes_per_sample[i]`` its size.  ``lower`` and
    ``upper`` are the balance bounds that were satisfied (multiples of total / N);
    ``block_share[gpu][b]`` is block ``b``'s fraction of the class total.
    """

    num_nodes: int
    block_ranges: tuple[tuple[int, int], ...]
    cut_bytes_per_sample: tuple[int, ...]
    lower: float
    upper: float
    block_share: Mapping[str, tuple[float, ...]]

    @property
    def num_blocks(self) -> int:
        return len(self.block_ranges)

    @property
    def cut_positions(self) -> tuple[int, ...]:
        return tuple(last for _, last in self.block_ranges[:-1])

    @property
    def total_cut_bytes(self) -> int:
        return int(sum(self.cut_bytes_per_sample))

    def block_of_node(self) -> tuple[int, ...]:
        """Block id of every node, in node order."""
        out: list[int] = []
        for b, (first, last) in enumerate(self.block_ranges):
            out.extend([b] * (last - first + 1))
        return tuple(out)


def _as_latency_matrix(latency_us: Mapping[str, Sequence[float]]) -> tuple[list[str], np.ndarray]:
    if not latency_us:
        raise BadInputError("no per-node latencies given; expected at least one GPU class")
    names = sorted(latency_us)
    rows = [np.asarray(latency_us[n], dtype=np.float64) for n in names]
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        raise BadInputError(f"per-node latency lists differ in length across GPU classes: "
                            f"{dict(zip(names, map(len, rows)))}; expected one entry per node")
    matrix = np.vstack(rows)
    if not np.all(np.isfinite(matrix)) or np.any(matrix < 0):
        raise BadInputError("per-node latencies must be finite and >= 0 us")
    return names, matrix


def block_shares(latency_us: Mapping[str, Sequence[float]],
                 block_ranges: Sequence[tuple[int, int]]) -> dict[str, tuple[float, ...]]:
    """Each block's fraction of the total latency, per GPU class."""
    names, matrix = _as_latency_matrix(latency_us)
    totals = matrix.sum(axis=1)
    return {name: tuple(float(matrix[g, a:b + 1].sum() / totals[g]) if totals[g] > 0 else 0.0
                        for a, b in block_ranges)
            for g, name in enumerate(names)}


def ranges_from_block_ids(block_ids: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Turn a per-node block id list (non-decreasing, starting at 0) into inclusive ranges."""
    ranges: list[tuple[int, int]] = []
    for j, b in enumerate(block_ids):
        if not ranges or b != block_ids[j - 1]:
            if b != len(ranges):
                raise BadInputError(f"node {j} is in block {b} after block {len(ranges) - 1}; "
                                    "expected contiguous blocks numbered 0, 1, 2, ...")
            ranges.append((j, j))
        else:
            ranges[-1] = (ranges[-1][0], j)
    return tuple(ranges)


def is_balanced(latency_us: Mapping[str, Sequence[float]], block_ranges: Sequence[tuple[int, int]],
                lower: float, upper: float) -> bool:
    """Whether every block's share lies within ``[lower, upper] / N`` on every class."""
    n = len(block_ranges)
    lo, hi = lower / n * (1 - _REL_SLACK), upper / n * (1 + _REL_SLACK)
    return all(lo <= s <= hi for shares in block_shares(latency_us, block_ranges).values()
               for s in shares)


def _cut_costs(cut_bytes: Sequence[float], allowed_cuts: Sequence[bool] | None,
               num_nodes: int) -> np.ndarray:
    """Cut sizes as floats, ``inf`` where a cut is not allowed (the DP never takes those)."""
    cuts = np.asarray(cut_bytes, dtype=np.float64)
    if cuts.shape != (max(num_nodes - 1, 0),):
        raise BadInputError(f"{cuts.size} cut sizes for {num_nodes} nodes; expected "
                            f"{num_nodes - 1} (one per position between nodes)")
    if allowed_cuts is not None:
        allowed = np.asarray(allowed_cuts, dtype=bool)
        if allowed.shape != cuts.shape:
            raise BadInputError(f"{allowed.size} allowed-cut flags for {num_nodes} nodes; "
                                f"expected {num_nodes - 1} (one per position between nodes)")
        cuts = np.where(allowed, cuts, math.inf)
    return cuts


def partition_bounded(latency_us: Mapping[str, Sequence[float]], cut_bytes: Sequence[float],
                      num_blocks: int, lower: float, upper: float,
                      allowed_cuts: Sequence[bool] | None = None) -> Partition | None:
    """Exact minimum-bytes partition under fixed bounds, or ``None`` if infeasible.

    ``latency_us[gpu_class][j]`` is node ``j``'s latency on that class (us);
    ``cut_bytes[j]`` the bytes per sample crossing a cut after node ``j`` (``L - 1`` values);
    ``allowed_cuts[j]`` whether that cut may be taken (default: all).
    """
    names, matrix = _as_latency_matrix(latency_us)
    num_nodes = matrix.shape[1]
    cuts = _cut_costs(cut_bytes, allowed_cuts, num_nodes)
    if not 1 <= num_blocks <= num_nodes:
        raise BadInputError(f"num_blocks={num_blocks}; expected 1..{num_nodes} (number of nodes)")
    # prefix[g][j] = latency of nodes 0..j-1 on class g
    prefix = np.zeros((len(names), num_nodes + 1))
    np.cumsum(matrix, axis=1, out=prefix[:, 1:])
    totals = prefix[:, -1]
    lo = lower * totals / num_blocks * (1 - _REL_SLACK)
    hi = upper * totals / num_blocks * (1 + _REL_SLACK)

    # For each block end e (exclusive, 1..L): feasible starts s in [start_lo[e], start_hi[e]].
    ends = np.arange(num_nodes + 1)
    start_lo = np.zeros(num_nodes + 1, dtype=np.int64)
    start_hi = ends - 1  # a block holds at least one node
    for g in range(len(names)):
        # latency(s, e) = prefix[e] - prefix[s] must be in [lo, hi]
        start_lo = np.maximum(start_lo, np.searchsorted(prefix[g], prefix[g] - hi[g], side="left"))
        start_hi = np.minimum(start_hi, np.searchsorted(prefix[g], prefix[g] - lo[g], side="right") - 1)
    start_lo_l, start_hi_l = start_lo.tolist(), start_hi.tolist()
    cut_cost = [0.0] + cuts.tolist()  # cost of a block starting at s > 0 = cut after node s-1

    inf = math.inf
    # best[e] = min bytes to cover nodes 0..e-1 with k blocks; parents for backtracking.
    best = [inf] * (num_nodes + 1)
    for e in range(1, num_nodes + 1):
        if start_lo_l[e] <= 0 <= start_hi_l[e]:
            best[e] = 0.0
    parents: list[list[int]] = []
    for _ in range(1, num_blocks):
        new = [inf] * (num_nodes + 1)
        parent = [-1] * (num_nodes + 1)
        window: deque[int] = deque()  # candidate starts, increasing value
        pushed = 0  # next start to push
        for e in range(1, num_nodes + 1):
            s_lo, s_hi = start_lo_l[e], start_hi_l[e]
            while pushed <= s_hi:
                if best[pushed] < inf and cut_cost[pushed] < inf:
                    value = best[pushed] + cut_cost[pushed]
                    while window and best[window[-1]] + cut_cost[window[-1]] > value:
                        window.pop()
                    window.append(pushed)
                pushed += 1
            while window and window[0] < s_lo:
                window.popleft()
            if window and s_lo <= s_hi:
                s = window[0]
                new[e] = best[s] + cut_cost[s]
                parent[e] = s
        best = new
        parents.append(parent)
    if best[num_nodes] == inf:
        return None
    # Backtrack block starts.
    starts = []
    e = num_nodes
    for parent in reversed(parents):
        s = parent[e]
        starts.append(s)
        e = s
    starts.append(0)
    starts.reverse()
    bounds = starts + [num_nodes]
    ranges = tuple((bounds[i], bounds[i + 1] - 1) for i in range(num_blocks))
    cut_sizes = tuple(int(round(cuts[last])) for _, last in ranges[:-1])
    return Partition(num_nodes, ranges, cut_sizes, lower, upper,
                     block_shares(latency_us, ranges))


def min_max_upper(latency_us: Mapping[str, Sequence[float]], cut_bytes: Sequence[float],
                  num_blocks: int, iterations: int = 40,
                  allowed_cuts: Sequence[bool] | None = None) -> float:
    """Smallest ``upper`` (lower = 0) for which a partition exists: the most balanced one
    possible, found by bisection on the bound (each probe is one DP)."""
    lo, hi = 1.0, float(num_blocks)
    if partition_bounded(latency_us, cut_bytes, num_blocks, 0.0, lo, allowed_cuts) is not None:
        return lo
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if partition_bounded(latency_us, cut_bytes, num_blocks, 0.0, mid,
                             allowed_cuts) is not None:
            hi = mid
        else:
            lo = mid
    return hi


def max_min_lower(latency_us: Mapping[str, Sequence[float]], cut_bytes: Sequence[float],
                  num_blocks: int, upper: float, iterations: int = 30,
                  allowed_cuts: Sequence[bool] | None = None) -> float:
    """Largest ``lower`` for which a partition within ``[lower, upper]`` exists (0 if only
    ``lower = 0`` works), by bisection."""
    lo, hi = 0.0, 1.0
    if partition_bounded(latency_us, cut_bytes, num_blocks, 0.0, upper, allowed_cuts) is None:
        return 0.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if partition_bounded(latency_us, cut_bytes, num_blocks, mid, upper,
                             allowed_cuts) is not None:
            lo = mid
        else:
            hi = mid
    return lo


def prepartition(latency_us: Mapping[str, Sequence[float]], cut_bytes: Sequence[float],
                 num_blocks: int = 10,
                 relaxation: Sequence[tuple[float, float]] = DEFAULT_RELAXATION,
                 fallback_slack: float | None = 1.1,
                 allowed_cuts: Sequence[bool] | None = None) -> Partition:
    """Minimum-bytes balanced partition, relaxing the bounds along ``relaxation`` as needed.

    Cuts are taken only where ``allowed_cuts`` (one flag per position, default all) is True;
    with ``k`` allowed positions at most ``k + 1`` blocks result (compare
    ``Partition.num_blocks`` with the request).

    If even the loosest bounds are infeasible (a few nodes dominate, e.g. big convolutions
    profiled on a CPU) and ``fallback_slack`` is set, the bounds become
    ``[l* / fallback_slack, fallback_slack x u*]`` where ``u*`` is the most balanced
    achievable upper bound and ``l*`` the largest lower bound achievable under it; the bounds
    used are reported in the result either way.  ``num_blocks`` larger than the number of
    nodes is clamped to it.
    Raises :class:`InfeasiblePlanError` naming the loosest bounds tried if none is feasible.
    """
    names, matrix = _as_latency_matrix(latency_us)
    cuts = _cut_costs(cut_bytes, allowed_cuts, matrix.shape[1])
    num_blocks = min(num_blocks, matrix.shape[1], 1 + int(np.isfinite(cuts).sum()))
    if num_blocks < 1:
        raise BadInputError(f"num_blocks={num_blocks}; expected >= 1")
    for lower, upper in relaxation:
        result = partition_bounded(latency_us, cut_bytes, num_blocks, lower, upper, allowed_cuts)
        if result is not None:
            return result
    if fallback_slack is not None:
        upper = round(min(float(num_blocks), fallback_slack * min_max_upper(
            latency_us, cut_bytes, num_blocks, allowed_cuts=allowed_cuts)), 6)
        lower = round(max_min_lower(latency_us, cut_bytes, num_blocks, upper,
                                    allowed_cuts=allowed_cuts) / fallback_slack, 6)
        result = partition_bounded(latency_us, cut_bytes, num_blocks, lower, upper, allowed_cuts)
        if result is not None:
            return result
        # Last resort (a few nodes dominate on several classes at once, e.g. noisy CPU
        # timings): any block may hold up to the whole model, only the cut bytes count.
        result = partition_bounded(latency_us, cut_bytes, num_blocks, 0.0, float(num_blocks),
                                   allowed_cuts)
        if result is not None:
            return result
    loosest = relaxation[-1] if relaxation else None
    raise InfeasiblePlanError(
        f"no partition into {num_blocks} blocks balanced within {loosest} x total/{num_blocks} "
        f"on GPU classes {names}; use fewer blocks or a looser relaxation ladder")
