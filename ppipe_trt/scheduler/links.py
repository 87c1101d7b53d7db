"""Reservation timelines of network links (one per server and direction, or per channel).

A timeline is a pair of parallel lists ``(starts, ends)`` of reserved intervals (us), sorted
and disjoint; touching intervals are merged, so back-to-back transfers make one block.  A
transfer may be placed in any gap long enough for it: a single "reserved until" time per
link would let one far-future reservation (a long compute stage followed by a transfer)
block the link for every batch that could have used it before.  Plain lists and ``bisect``
keep the hot path in C.
"""

from __future__ import annotations

from bisect import bisect_right

Timeline = tuple[list, list]

#: Link models.  ``"duplex"`` (default): a transfer between servers occupies the sender's
#: uplink and the receiver's downlink over the same interval.  ``"sender"`` (as the public
#: PPipe artifact's simulator): it occupies only the sender's uplink; downlinks are never
#: contended (their timelines stay empty).  ``"channel"`` (the artifact's exact semantics): the
#: sending stage's workers are grouped, in order, into channels of ``gpus_per_server *
#: mps_share`` consecutive workers (``gpus_per_server`` the larger of the two adjacent stages'
#: classes'), and a transfer occupies only its sender's channel: channels of different stages,
#: pipelines or models never contend, even on one server, and downlinks are never contended.
#: :class:`~ppipe_trt.scheduler.tables.ClusterState` maps each worker to its uplink timeline
#: (its server's, or its channel's).
LINK_MODELS = ("duplex", "sender", "channel")

#: Past intervals are pruned once a timeline holds more than this many.
PRUNE_AT = 32


def new_timeline() -> Timeline:
    return ([], [])


def first_free(tl: Timeline, t: float, dur: float) -> float:
    """Earliest ``s >= t`` with ``[s, s + dur)`` clear of every reserved interval."""
    starts, ends = tl
    i = bisect_right(ends, t)
    n = len(starts)
    s = t
    while i < n and starts[i] < s + dur:
        s = ends[i]
        i += 1
    return s


def common_free(a: Timeline, b: Timeline, t: float, dur: float) -> float:
    """Earliest ``s >= t`` at which both timelines are clear for ``dur``."""
    s = t
    while True:
        s1 = first_free(a, s, dur)
        s2 = first_free(b, s1, dur)
        if s2 == s1:
            return s1
        s = s2


def is_free(tl: Timeline, s: float, dur: float) -> bool:
    starts, ends = tl
    i = bisect_right(ends, s)
    return i == len(starts) or starts[i] >= s + dur


def reserve(tl: Timeline, s: float, e: float) -> None:
    """Add ``[s, e)``; the caller guarantees it is free (see :func:`first_free`)."""
    starts, ends = tl
    i = bisect_right(starts, s)
    n = len(starts)
    if i > 0 and ends[i - 1] >= s:          # touches the previous block
        if i < n and starts[i] <= e:        # ... and the next one: merge all three
            ends[i - 1] = ends[i]
            del starts[i]
            del ends[i]
        else:
            ends[i - 1] = e
    elif i < n and starts[i] <= e:          # touches the next block
        starts[i] = s
    else:
        starts.insert(i, s)
        ends.insert(i, e)


def reserve_duplex(up: Timeline, dn: Timeline, s: float, e: float, now: float) -> None:
    """Reserve ``[s, e)`` on the sender's uplink and the receiver's downlink (pruning the
    past of each once it grows beyond :data:`PRUNE_AT`)."""
    reserve(up, s, e)
    reserve(dn, s, e)
    if len(up[0]) > PRUNE_AT:
        prune(up, now)
    if len(dn[0]) > PRUNE_AT:
        prune(dn, now)


def reserve_sender(up: Timeline, dn: Timeline, s: float, e: float, now: float) -> None:
    """Reserve ``[s, e)`` on the sender's uplink (or channel) only (``dn`` is left untouched)."""
    reserve(up, s, e)
    if len(up[0]) > PRUNE_AT:
        prune(up, now)


#: The transfer-reservation function of each link model.
RESERVE_TRANSFER = {"duplex": reserve_duplex, "sender": reserve_sender,
                    "channel": reserve_sender}


def prune(tl: Timeline, now: float) -> None:
    """Forget intervals that ended by ``now``."""
    starts, ends = tl
    cut = bisect_right(ends, now)
    if cut:
        del starts[:cut]
        del ends[:cut]


def busy_until(tl: Timeline) -> float:
    """End of the last reservation (0.0 when none)."""
    return tl[1][-1] if tl[1] else 0.0
