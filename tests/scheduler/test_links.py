"""Link reservation timelines: gaps are usable, reservations never overlap."""

from __future__ import annotations

import random

from ppipe_trt.scheduler.links import (busy_until, common_free, first_free, is_free,
                                       new_timeline, prune, reserve)


def test_first_free_uses_a_gap_before_a_far_reservation():
    tl = new_timeline()
    reserve(tl, 1000.0, 1100.0)            # a far-future transfer
    assert first_free(tl, 0.0, 200.0) == 0.0
    assert first_free(tl, 900.0, 200.0) == 1100.0   # does not fit before it
    assert first_free(tl, 1050.0, 10.0) == 1100.0
    assert is_free(tl, 800.0, 200.0) and not is_free(tl, 801.0, 200.0)


def test_touching_reservations_merge_and_prune_forgets_the_past():
    tl = new_timeline()
    reserve(tl, 0.0, 10.0)
    reserve(tl, 20.0, 30.0)
    reserve(tl, 10.0, 20.0)                # fills the gap: one block
    assert tl == ([0.0], [30.0])
    reserve(tl, 40.0, 50.0)
    reserve(tl, 35.0, 40.0)                # touches the next block
    assert tl == ([0.0, 35.0], [30.0, 50.0])
    prune(tl, 31.0)
    assert tl == ([35.0], [50.0]) and busy_until(tl) == 50.0


def test_common_free_needs_both_links():
    a, b = new_timeline(), new_timeline()
    reserve(a, 0.0, 100.0)
    reserve(b, 100.0, 200.0)
    reserve(a, 250.0, 300.0)
    assert common_free(a, b, 0.0, 50.0) == 200.0
    assert common_free(a, b, 0.0, 60.0) == 300.0


def test_random_reservations_never_overlap():
    rng = random.Random(4)
    a, b = new_timeline(), new_timeline()
    placed = []
    for _ in range(500):
        t, dur = rng.uniform(0, 5000), rng.uniform(1, 40)
        s = common_free(a, b, t, dur)
        assert s >= t
        reserve(a, s, s + dur)
        reserve(b, s, s + dur)
        placed.append((s, s + dur))
    placed.sort()
    assert all(x[1] <= y[0] + 1e-9 for x, y in zip(placed, placed[1:]))
    for tl in (a, b):
        assert tl[0] == sorted(tl[0]) and all(s < e for s, e in zip(*tl))
