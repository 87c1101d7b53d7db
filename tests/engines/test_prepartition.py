"""Exact DP pre-partitioner: against brute force, the relaxation ladder, and the artifact."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ppipe_trt.engines.prepartition import (DEFAULT_RELAXATION, block_shares, is_balanced,
                                            partition_bounded, prepartition,
                                            ranges_from_block_ids)
from ppipe_trt.errors import BadInputError, InfeasiblePlanError


def brute_force(latency, cuts, n_blocks, lower, upper):
    n = len(cuts) + 1
    best = None
    for chosen in itertools.combinations(range(n - 1), n_blocks - 1):
        bounds = [-1, *chosen, n - 1]
        ranges = [(bounds[i] + 1, bounds[i + 1]) for i in range(n_blocks)]
        if not is_balanced(latency, ranges, lower, upper):
            continue
        cost = sum(cuts[c] for c in chosen)
        if best is None or cost < best:
            best = cost
    return best


@pytest.mark.parametrize("seed", range(25))
def test_dp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(6, 13))
    k = int(rng.integers(2, 5))
    latency = {"A": rng.uniform(0.1, 5, n).tolist(), "B": rng.uniform(0.1, 5, n).tolist()}
    cuts = rng.integers(1, 1000, n - 1).tolist()
    lower, upper = [(0.7, 1.3), (0.5, 1.5), (0.5, 2.0)][seed % 3]
    result = partition_bounded(latency, cuts, k, lower, upper)
    expected = brute_force(latency, cuts, k, lower, upper)
    if expected is None:
        assert result is None
    else:
        assert result is not None and result.total_cut_bytes == expected
        assert is_balanced(latency, result.block_ranges, lower, upper)
        assert result.block_ranges[0][0] == 0 and result.block_ranges[-1][1] == n - 1
        assert all(a[1] + 1 == b[0] for a, b in zip(result.block_ranges, result.block_ranges[1:]))
        assert result.cut_bytes_per_sample == tuple(cuts[c] for c in result.cut_positions)


def test_relaxation_reports_bounds_used():
    # one heavy node: blocks cannot be within 1.3x of the mean, but within 4x they can
    latency = {"gpu": [10, 1, 1, 1, 1, 1, 1, 1]}
    part = prepartition(latency, [1] * 7, num_blocks=4)
    assert (part.lower, part.upper) != DEFAULT_RELAXATION[0]
    assert partition_bounded(latency, [1] * 7, 4, *DEFAULT_RELAXATION[0]) is None
    assert is_balanced(latency, part.block_ranges, part.lower, part.upper)


def test_infeasible_names_bounds():
    with pytest.raises(InfeasiblePlanError, match="no partition into 2 blocks"):
        prepartition({"gpu": [100, 1, 1]}, [1, 1], num_blocks=2, relaxation=[(0.9, 1.1)],
                     fallback_slack=None)


def test_blocks_clamped_to_nodes_and_bad_lengths():
    assert prepartition({"g": [1, 1, 1]}, [5, 5], num_blocks=10,
                        relaxation=[(0.9, 1.1)]).num_blocks == 3
    with pytest.raises(BadInputError, match="cut sizes for 3 nodes"):
        partition_bounded({"g": [1, 1, 1]}, [1], 2, 0.5, 1.5)
    with pytest.raises(BadInputError, match="differ in length"):
        prepartition({"a": [1, 1], "b": [1]}, [1])


def test_min_bytes_prefers_small_cut():
    latency = {"g": [1.0] * 6}
    cuts = [100, 100, 1, 100, 100]
    part = partition_bounded(latency, cuts, 2, 0.5, 1.5)
    assert part.cut_positions == (2,) and part.total_cut_bytes == 1


def test_ranges_from_block_ids():
    assert ranges_from_block_ids([0, 0, 1, 2, 2]) == ((0, 1), (2, 2), (3, 4))
    with pytest.raises(BadInputError, match="contiguous"):
        ranges_from_block_ids([0, 2, 2])


def test_no_more_bytes_than_artifact_on_28_models(profiles_dir):
    from ppipe_trt.engines.ppipe_artifact import artifact_model_names, load_artifact_model

    names = artifact_model_names(profiles_dir)
    assert len(names) == 28
    for name in names:
        m = load_artifact_model(profiles_dir, name)
        _, lower, upper = m.artifact_bounds
        ranges = ranges_from_block_ids(m.artifact_block_ids)
        if not is_balanced(m.node_latency_us, ranges, lower, upper):
            shares = [s for v in block_shares(m.node_latency_us, ranges).values() for s in v]
            lower, upper = min(shares) * len(ranges), max(shares) * len(ranges)
        art = sum(m.cut_bytes[last] for _, last in ranges[:-1])
        ours = partition_bounded(m.node_latency_us, m.cut_bytes, len(ranges), lower, upper)
        assert ours is not None, name
        assert ours.total_cut_bytes <= art, name
        assert is_balanced(m.node_latency_us, ours.block_ranges, lower, upper), name


def test_fallback_when_one_node_dominates():
    latency = {"cpu": [50, 1, 1, 1, 1, 1, 1, 1, 1, 1]}  # node 0 alone is 85% of the total
    part = prepartition(latency, [1] * 9, num_blocks=5)
    assert part.lower < 0.4 and part.upper >= 0.85 * 5
    assert is_balanced(latency, part.block_ranges, part.lower, part.upper)
    assert part.block_ranges[0] == (0, 0)
    with pytest.raises(InfeasiblePlanError):
        prepartition(latency, [1] * 9, num_blocks=5, fallback_slack=None)


def test_cut_sizes_match_artifact_trans_size_files(profiles_dir):
    from ppipe_trt.engines.ppipe_artifact import artifact_model_names, load_artifact_model

    for name in artifact_model_names(profiles_dir):
        m = load_artifact_model(profiles_dir, name)
        ranges = ranges_from_block_ids(m.artifact_block_ids)
        size_file = next((profiles_dir / "prepartition_mappings" / name).glob("contraction_trans-size_*"))
        theirs = [int(float(v)) for v in size_file.read_text().split()]
        assert [m.cut_bytes[last] for _, last in ranges[:-1]] == theirs, name
