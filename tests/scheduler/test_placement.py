"""place_workers: deterministic GPU and server assignment."""

from __future__ import annotations

import pytest

from ppipe_trt.cluster import ClusterSpec, GpuPool
from ppipe_trt.errors import ConfigError
from ppipe_trt.scheduler import place_workers
from ppipe_trt.simulator.handplan import ModelSpec, hand_plan
from toys import CLUSTER, toy_plan, toy_profiles


def test_toy_plan_placement():
    pl = place_workers(toy_plan())
    got = [(w.worker_id, w.pipeline, w.stage, w.gpu_class, w.mps_share, w.gpu_index,
            w.share_index, w.server_id) for w in pl.workers]
    # Pipeline 1's stage 0 (two MPS shares packed on one GPU) is the only H sender, so it
    # gets an H server to itself; pipeline 0 (no transfers) takes the other.  Its two
    # receivers on L land on different L servers (downlinks balanced).  L servers are 2, 3.
    assert got == [
        (0, 0, 0, "H", 1, 2, 0, 1), (1, 0, 0, "H", 1, 3, 0, 1),
        (2, 1, 0, "H", 2, 0, 0, 0), (3, 1, 0, "H", 2, 0, 1, 0),
        (4, 1, 1, "L", 1, 0, 0, 2), (5, 1, 1, "L", 1, 2, 0, 3),
    ]
    assert [s.gpu_indices for s in pl.servers] == [(0, 1), (2, 3), (0, 1), (2, 3)]
    assert [w.worker_id for w in pl.pool("toy", 1, 0)] == [2, 3]
    assert pl.pool("toy", 5, 0) == ()
    assert [w.worker_id for w in pl.gpu_workers("H", 0)] == [2, 3]
    assert pl.gpu_workers("H", 1) == ()
    assert pl.worker(4).first_block == 1 and pl.worker(4).last_block == 1
    assert pl.gpus_per_class == {"H": 4, "L": 4}
    with pytest.raises(ConfigError, match="no worker 99"):
        pl.worker(99)


def test_placement_is_deterministic():
    a = place_workers(toy_plan(with_other=True))
    b = place_workers(toy_plan(with_other=True))
    assert a.workers == b.workers and a.servers == b.servers


def test_mps_shares_of_one_level_are_packed_across_stages():
    profiles = toy_profiles()
    plan = hand_plan(profiles, CLUSTER, [
        ModelSpec("toy", 20.0, [(1, [(0, 0, "H", 2, 1), (1, 1, "H", 2, 3)])])])
    pl = place_workers(plan)
    # GPU A: the stage-0 worker and one stage-1 worker; GPU B: two stage-1 workers.  A sends
    # (uplink 625/s x 100 us), B only receives: they go to different servers (0 and 1).
    assert [(w.stage, w.gpu_index, w.share_index, w.server_id) for w in pl.workers] == [
        (0, 0, 0, 0), (1, 0, 1, 0), (1, 2, 0, 1), (1, 2, 1, 1)]


def test_too_many_gpus_is_an_error():
    profiles = toy_profiles()
    plan = hand_plan(profiles, CLUSTER, [ModelSpec("toy", 20.0, [(1, [(0, 1, "H", 1, 5)])])])
    with pytest.raises(ConfigError, match="needs 5 H GPUs.*has 4"):
        place_workers(plan)


def test_mps_share_above_the_class_limit_is_an_error():
    profiles = toy_profiles()
    cluster = ClusterSpec((GpuPool("H", 4, 2, 1, 10.0), GpuPool("L", 4, 2, 1, 10.0)))
    plan = hand_plan(profiles, cluster, [ModelSpec("toy", 20.0, [(1, [(0, 1, "H", 2, 2)])])])
    with pytest.raises(ConfigError, match="MPS share 2 on H"):
        place_workers(plan)
