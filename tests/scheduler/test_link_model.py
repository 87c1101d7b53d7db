"""The link models: ``duplex`` (default) contends the receiver's downlink, ``sender`` does not,
``channel`` contends only the sending worker's channel (see the section below).

Toy cluster: two H servers (one GPU each) send to one L server (two GPUs).  Models ``a`` and
``b`` each run block 0 on their own H GPU and block 1 on an L GPU, so a request of each
arriving at the same time makes two transfers from different uplinks into the same downlink.
"""

from __future__ import annotations

import pytest

from ppipe_trt.cluster import ClusterSpec, GpuPool
from ppipe_trt.errors import ConfigError
from ppipe_trt.profiles.types import ProfileSet
from ppipe_trt.scheduler import build_schedulers, place_workers
from ppipe_trt.scheduler.tables import ClusterState, sender_channels
from ppipe_trt.simulator.handplan import ModelSpec, hand_plan, synthetic_profile
from toys import FakeClockDriver, poisson_times

# H: 2 GPUs, one per server (servers 0, 1).  L: 2 GPUs on one server (server 2).
CLUSTER = ClusterSpec((GpuPool("H", 2, 1, 1, 10.0), GpuPool("L", 2, 2, 1, 10.0)), "H-L")
H_LAT_US, XFER_US = 1000.0, 100.0   # block 0 on H at batch 1; 125 kB over 10 Gbps


def _profiles() -> ProfileSet:
    lat = {("H", 1): [H_LAT_US, 1000.0], ("L", 1): [2000.0, 2000.0]}
    return ProfileSet({m: synthetic_profile(m, lat) for m in ("a", "b")}, "a")


def _setup(link_model=None, slo_ms=20.0):
    profiles = _profiles()
    plan = hand_plan(profiles, CLUSTER, [ModelSpec(m, slo_ms, [(1, [(0, 0, "H", 1, 1),
                                                                    (1, 1, "L", 1, 1)])])
                                         for m in ("a", "b")])
    placement = place_workers(plan)
    kw = {} if link_model is None else {"link_model": link_model}
    return build_schedulers(plan, profiles, placement, **kw), placement


def _two_simultaneous(link_model=None):
    scheds, placement = _setup(link_model)
    drv = FakeClockDriver(scheds)
    drv.arrive(0.0, "a", rid=0)
    drv.arrive(0.0, "b", rid=1)
    drv.run()
    assert len(drv.dispatches) == 2
    servers = [[placement.worker(r.worker_id).server_id for r in d.route]
               for d in drv.dispatches]
    # the premise: different senders, one receiver server
    assert servers[0][0] != servers[1][0] and servers[0][1] == servers[1][1]
    return sorted((d.route[1].transfer_start_us, d.route[1].transfer_finish_us)
                  for d in drv.dispatches)


def test_duplex_serialises_two_transfers_into_one_receiver():
    x, y = _two_simultaneous("duplex")
    assert x == (H_LAT_US, H_LAT_US + XFER_US)
    assert y == (H_LAT_US + XFER_US, H_LAT_US + 2 * XFER_US)


def test_sender_lets_two_transfers_into_one_receiver_overlap():
    x, y = _two_simultaneous("sender")
    assert x == y == (H_LAT_US, H_LAT_US + XFER_US)


def test_default_is_duplex():
    assert _two_simultaneous() == _two_simultaneous("duplex")
    scheds, _ = _setup()
    assert next(iter(scheds.values())).cluster_state.link_model == "duplex"


def test_unknown_link_model_and_mismatched_state_are_rejected():
    with pytest.raises(ConfigError, match="'half'.*duplex"):
        _setup("half")
    scheds, placement = _setup("sender")
    state = next(iter(scheds.values())).cluster_state
    profiles = _profiles()
    plan = hand_plan(profiles, CLUSTER, [ModelSpec("a", 20.0, [(1, [(0, 0, "H", 1, 1),
                                                                     (1, 1, "L", 1, 1)])])])
    with pytest.raises(ConfigError, match="'sender'.*'duplex'"):
        build_schedulers(plan, profiles, place_workers(plan), state=state)
    assert isinstance(state, ClusterState)


def _disjoint(intervals):
    intervals = sorted(intervals)
    return all(p[1] <= q[0] + 1e-9 for p, q in zip(intervals, intervals[1:]))


@pytest.mark.parametrize("link_model", ["duplex", "sender"])
def test_workers_and_uplinks_never_overlap_under_load(link_model):
    scheds, placement = _setup(link_model)
    drv = FakeClockDriver(scheds)
    for i, t in enumerate(poisson_times(900.0, 200_000, 5)):
        drv.arrive(t, "a", rid=2 * i)
    for i, t in enumerate(poisson_times(900.0, 200_000, 6)):
        drv.arrive(t, "b", rid=2 * i + 1)
    drv.run()
    per_worker, per_ul, per_dl = {}, {}, {}
    for d in drv.dispatches:
        assert d.finish_us <= min(r.deadline_us for r in d.requests)
        for r in d.route:
            per_worker.setdefault(r.worker_id, []).append((r.start_us, r.finish_us))
        prev, r = d.route
        assert prev.finish_us <= r.transfer_start_us < r.transfer_finish_us <= r.start_us
        iv = (r.transfer_start_us, r.transfer_finish_us)
        per_ul.setdefault(placement.worker(prev.worker_id).server_id, []).append(iv)
        per_dl.setdefault(placement.worker(r.worker_id).server_id, []).append(iv)
    assert len(drv.dispatches) > 100
    assert all(_disjoint(v) for v in per_worker.values())
    assert all(_disjoint(v) for v in per_ul.values())
    # the receiver's downlink is exclusive under duplex only; under sender it does overlap
    assert all(_disjoint(v) for v in per_dl.values()) == (link_model == "duplex")
    state = next(iter(scheds.values())).cluster_state
    assert any(tl[0] for tl in state.downlinks) == (link_model == "duplex")


# ---- the "channel" link model (the public artifact's per-channel FIFO delayers) ----------
#
# Cluster C2: one H server of 2 GPUs (server 0), one L server of 2 GPUs (server 1); a channel
# is gpus_per_server (2) x mps_share (1) = 2 consecutive workers of a sending stage.
# Cluster C4: two H servers and two L servers of 2 GPUs each; a 4-worker H stage has channels
# {w0, w1} and {w2, w3}, and the link-balancing placement puts w0 and w2 on one server.
C2 = ClusterSpec((GpuPool("H", 2, 2, 1, 10.0), GpuPool("L", 2, 2, 1, 10.0)), "H-L")
C4 = ClusterSpec((GpuPool("H", 4, 2, 1, 10.0), GpuPool("L", 4, 2, 1, 10.0)), "H-L")


def _channel_setup(cluster, pipelines, link_model, slo_ms=20.0):
    profiles = _profiles()
    plan = hand_plan(profiles, cluster, [ModelSpec("a", slo_ms, pipelines)])
    placement = place_workers(plan)
    return build_schedulers(plan, profiles, placement, link_model=link_model), placement


def _transfers(link_model, cluster, pipelines, n):
    """``n`` requests at t=0; per dispatch (sender worker, (transfer start, end))."""
    scheds, placement = _channel_setup(cluster, pipelines, link_model)
    drv = FakeClockDriver(scheds)
    for i in range(n):
        drv.arrive(0.0, "a", rid=i)
    drv.run()
    assert len(drv.dispatches) == n
    state = next(iter(scheds.values())).cluster_state
    return ([(d.route[0].worker_id, (d.route[1].transfer_start_us, d.route[1].transfer_finish_us))
             for d in drv.dispatches], placement, state)


ONE_STAGE_POOL = [(1, [(0, 0, "H", 1, 2), (1, 1, "L", 1, 2)])]
TWO_PIPELINES = [(1, [(0, 0, "H", 1, 1), (1, 1, "L", 1, 1)])] * 2


def test_sender_channels_follow_the_artifact_grouping():
    _, placement = _channel_setup(C4, [(1, [(0, 0, "H", 1, 4), (1, 1, "L", 1, 4)])], "channel")
    # stage 0: channels of 2 consecutive workers; stage 1 (last): one channel per worker
    assert tuple(sender_channels(placement).values()) == (0, 0, 1, 1, 2, 3, 4, 5)
    _, placement = _channel_setup(C2, TWO_PIPELINES, "channel")
    assert tuple(sender_channels(placement).values()) == (0, 1, 2, 3)   # one pool per pipeline and stage


@pytest.mark.parametrize("link_model", ["channel", "sender", "duplex"])
def test_same_channel_serialises(link_model):
    xs, placement, _ = _transfers(link_model, C2, ONE_STAGE_POOL, 2)
    assert {w for w, _ in xs} == {0, 1}     # both senders used: one server, one channel
    assert sorted(iv for _, iv in xs) == [(H_LAT_US, H_LAT_US + XFER_US),
                                          (H_LAT_US + XFER_US, H_LAT_US + 2 * XFER_US)]


@pytest.mark.parametrize("link_model", ["channel", "sender"])
def test_different_pipelines_on_one_server_overlap_only_under_channel(link_model):
    xs, placement, state = _transfers(link_model, C2, TWO_PIPELINES, 2)
    senders = [w for w, _ in xs]
    assert placement.worker(senders[0]).server_id == placement.worker(senders[1]).server_id
    assert placement.worker(senders[0]).pipeline != placement.worker(senders[1]).pipeline
    ivs = sorted(iv for _, iv in xs)
    if link_model == "channel":
        assert ivs == [(H_LAT_US, H_LAT_US + XFER_US)] * 2
        assert len(state.uplinks) == 4 and not any(tl[0] for tl in state.downlinks)
    else:
        assert ivs[1] == (H_LAT_US + XFER_US, H_LAT_US + 2 * XFER_US)


@pytest.mark.parametrize("link_model", ["channel", "sender"])
def test_different_channels_on_one_server_overlap_only_under_channel(link_model):
    xs, placement, _ = _transfers(link_model, C4, [(1, [(0, 0, "H", 1, 4),
                                                        (1, 1, "L", 1, 4)])], 4)
    chan = sender_channels(placement)
    srv = {w: placement.worker(w).server_id for w, _ in xs}
    assert len({w for w, _ in xs}) == 4
    same_server_overlap = any(
        srv[w] == srv[v] and a[0] < b[1] and b[0] < a[1]
        for i, (w, a) in enumerate(xs) for v, b in xs[i + 1:])
    same_channel_overlap = any(
        chan[w] == chan[v] and a[0] < b[1] and b[0] < a[1]
        for i, (w, a) in enumerate(xs) for v, b in xs[i + 1:])
    # a channel (w0, w1) spans both servers: under "sender" its transfers do overlap
    assert same_channel_overlap == (link_model == "sender")
    assert same_server_overlap == (link_model == "channel")


def test_channel_reservations_never_overlap_on_a_worker_or_a_channel():
    scheds, placement = _channel_setup(C4, [(1, [(0, 0, "H", 1, 2), (1, 1, "L", 1, 2)]),
                                            (2, [(0, 0, "H", 1, 2), (1, 1, "L", 1, 2)])],
                                       "channel")
    chan = sender_channels(placement)
    drv = FakeClockDriver(scheds)
    for i, t in enumerate(poisson_times(3000.0, 200_000, 7)):
        drv.arrive(t, "a", rid=i)
    drv.run()
    per_worker, per_chan, per_srv = {}, {}, {}
    for d in drv.dispatches:
        assert d.finish_us <= min(r.deadline_us for r in d.requests)
        for r in d.route:
            per_worker.setdefault(r.worker_id, []).append((r.start_us, r.finish_us))
        prev, r = d.route
        assert prev.finish_us <= r.transfer_start_us < r.transfer_finish_us <= r.start_us
        iv = (r.transfer_start_us, r.transfer_finish_us)
        per_chan.setdefault(chan[prev.worker_id], []).append(iv)
        per_srv.setdefault(placement.worker(prev.worker_id).server_id, []).append(iv)
    assert len(drv.dispatches) > 100
    assert all(_disjoint(v) for v in per_worker.values())
    assert all(_disjoint(v) for v in per_chan.values())
    # servers host several channels, whose transfers do overlap
    assert not all(_disjoint(v) for v in per_srv.values())
    state = next(iter(scheds.values())).cluster_state
    assert state.worker_uplink == chan and not any(tl[0] for tl in state.downlinks)


def test_unknown_link_model_is_rejected_by_the_cluster_state():
    _, placement = _channel_setup(C2, TWO_PIPELINES, "channel")
    with pytest.raises(ConfigError, match="'channels'.*channel"):
        ClusterState(placement, 0.0, "channels")
