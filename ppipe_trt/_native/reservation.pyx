# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""The reservation scheduler compiled, its state in C arrays (issue 10's native hot path).

The same policy as :class:`ppipe_trt.scheduler.reservation.ReservationScheduler` -- that
module's docstring is the specification and its code the reference -- with the decision
pass's state out of Python lists: every worker's reserved-until time, the stages' latency
and transfer tables and the probe's picks are C doubles and indices, and the link timelines
(:class:`Timeline`) are C arrays shared by every scheduler of a cluster through
:class:`~ppipe_trt.scheduler.tables.ClusterState`.  What the scheduler returns is unchanged:
:class:`~ppipe_trt.scheduler.interface.Decisions` of ``Dispatch`` and ``Drop`` objects.

It must decide exactly as the reference: every branch below mirrors the reference's, in the
same order, with the same floating-point expressions (built with ``-ffp-contract=off``: no
fused multiply-adds); ``tests/scheduler/test_decision_digest.py`` pins both to the same
SHA-256 of every decision, and ``tests/scheduler/test_native.py`` drives the two side by
side.  Selected by :mod:`ppipe_trt.scheduler.native`.
"""

from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject_GenericSetAttr
from libc.math cimport exp, log
from libc.string cimport memcpy, memmove

from ppipe_trt.errors import ConfigError, SchedulerError
from ppipe_trt.scheduler.interface import Decisions, Dispatch, Drop, DropReason, StageReservation
from ppipe_trt.scheduler.tables import with_stage_latency
from ppipe_trt.scheduler.work_conserving import WorkConservingRule, capacity_by_batch_rps

from collections import deque

#: SHA-256 of this file when it was compiled (see ``setup.py``; a stale build is not used).
SOURCE_SHA256 = PPIPE_SOURCE_SHA256

cdef double INF = float("inf")
#: as ``ppipe_trt.scheduler.links.PRUNE_AT``
cdef Py_ssize_t PRUNE_AT = 32
#: as the reference's ``_WAKE_GUARD_US`` and ``_IDLE_TIE_US``
cdef double WAKE_GUARD_US = 1e-3
cdef double IDLE_TIE_US = 1.0
cdef enum:
    MAX_STAGES = 32  # stages per pipeline, at most

cdef object _UNREACHABLE = DropReason.DEADLINE_UNREACHABLE
cdef object _NO_WORKERS = DropReason.NO_WORKERS
cdef object _WORKER_FAILED = DropReason.WORKER_FAILED
cdef object _QUEUE_FULL = DropReason.QUEUE_FULL
cdef object _SHUTDOWN = DropReason.SHUTDOWN


# ---- link timelines ------------------------------------------------------------------------

cdef class Timeline:
    """A link's reserved intervals (us): sorted, disjoint, touching ones merged -- the C form
    of ``ppipe_trt.scheduler.links``' ``(starts, ends)`` pair.  ``tl[0]`` / ``tl[1]`` give
    copies of the starts and ends as lists (what the Python timeline's readers use)."""

    cdef double* s
    cdef double* e
    cdef Py_ssize_t n
    cdef Py_ssize_t cap

    def __cinit__(self):
        self.cap = 8
        self.n = 0
        self.s = <double*>PyMem_Malloc(self.cap * sizeof(double))
        self.e = <double*>PyMem_Malloc(self.cap * sizeof(double))
        if self.s == NULL or self.e == NULL:
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self.s)
        PyMem_Free(self.e)

    cdef int grow(self) except -1:
        cdef Py_ssize_t cap = self.cap * 2
        cdef double* s = <double*>PyMem_Realloc(self.s, cap * sizeof(double))
        if s == NULL:
            raise MemoryError()
        self.s = s
        cdef double* e = <double*>PyMem_Realloc(self.e, cap * sizeof(double))
        if e == NULL:
            raise MemoryError()
        self.e = e
        self.cap = cap
        return 0

    # -- Python view (tests, status, pickling) --
    @property
    def starts(self) -> list:
        return [self.s[i] for i in range(self.n)]

    @property
    def ends(self) -> list:
        return [self.e[i] for i in range(self.n)]

    def __len__(self):
        return 2

    def __getitem__(self, i):
        if i == 0 or i == -2:
            return self.starts
        if i == 1 or i == -1:
            return self.ends
        raise IndexError("a timeline is (starts, ends)")

    def __iter__(self):
        return iter((self.starts, self.ends))

    def __eq__(self, other):
        try:
            return (self.starts, self.ends) == (list(other[0]), list(other[1]))
        except (TypeError, IndexError, KeyError):
            return NotImplemented

    def __repr__(self):
        return f"Timeline({self.starts!r}, {self.ends!r})"

    def __reduce__(self):
        return (_timeline, (self.starts, self.ends))

    def clear(self):
        """Forget every reservation."""
        self.n = 0

    # -- the operations of ppipe_trt.scheduler.links, for tests --
    def first_free(self, double t, double dur) -> float:
        return tl_first_free(self, t, dur)

    def is_free(self, double s, double dur) -> bool:
        return tl_is_free(self, s, dur)

    def common_free(self, Timeline other, double t, double dur) -> float:
        return tl_common_free(self, other, t, dur)

    def reserve(self, double s, double e) -> None:
        tl_reserve(self, s, e)

    def prune(self, double now) -> None:
        tl_prune(self, now)

    def busy_until(self) -> float:
        return self.e[self.n - 1] if self.n else 0.0


def _timeline(starts, ends) -> Timeline:
    cdef Timeline tl = Timeline()
    for s, e in zip(starts, ends):
        if tl.n == tl.cap:
            tl.grow()
        tl.s[tl.n] = s
        tl.e[tl.n] = e
        tl.n += 1
    return tl


def new_timeline() -> Timeline:
    return Timeline()


cdef inline Py_ssize_t bisect_right(const double* a, Py_ssize_t n, double x) noexcept:
    cdef Py_ssize_t lo = 0, hi = n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if x < a[mid]:
            hi = mid
        else:
            lo = mid + 1
    return lo


cdef inline double tl_first_free(Timeline tl, double t, double dur) noexcept:
    cdef Py_ssize_t i = bisect_right(tl.e, tl.n, t)
    cdef Py_ssize_t n = tl.n
    cdef double s = t
    while i < n and tl.s[i] < s + dur:
        s = tl.e[i]
        i += 1
    return s


cdef double tl_common_free(Timeline a, Timeline b, double t, double dur) noexcept:
    cdef double s = t, s1, s2
    while True:
        s1 = tl_first_free(a, s, dur)
        s2 = tl_first_free(b, s1, dur)
        if s2 == s1:
            return s1
        s = s2


cdef inline bint tl_is_free(Timeline tl, double s, double dur) noexcept:
    cdef Py_ssize_t i = bisect_right(tl.e, tl.n, s)
    return i == tl.n or tl.s[i] >= s + dur


cdef int tl_reserve(Timeline tl, double s, double e) except -1:
    cdef Py_ssize_t i = bisect_right(tl.s, tl.n, s)
    cdef Py_ssize_t n = tl.n
    if i > 0 and tl.e[i - 1] >= s:           # touches the previous block
        if i < n and tl.s[i] <= e:           # ... and the next one: merge all three
            tl.e[i - 1] = tl.e[i]
            memmove(&tl.s[i], &tl.s[i + 1], (n - i - 1) * sizeof(double))
            memmove(&tl.e[i], &tl.e[i + 1], (n - i - 1) * sizeof(double))
            tl.n = n - 1
        else:
            tl.e[i - 1] = e
    elif i < n and tl.s[i] <= e:             # touches the next block
        tl.s[i] = s
    else:
        if n == tl.cap:
            tl.grow()
        memmove(&tl.s[i + 1], &tl.s[i], (n - i) * sizeof(double))
        memmove(&tl.e[i + 1], &tl.e[i], (n - i) * sizeof(double))
        tl.s[i] = s
        tl.e[i] = e
        tl.n = n + 1
    return 0


cdef void tl_prune(Timeline tl, double now) noexcept:
    cdef Py_ssize_t cut = bisect_right(tl.e, tl.n, now)
    if cut:
        memmove(tl.s, &tl.s[cut], (tl.n - cut) * sizeof(double))
        memmove(tl.e, &tl.e[cut], (tl.n - cut) * sizeof(double))
        tl.n -= cut


# ---- the scheduler ---------------------------------------------------------------------------

cdef struct Pick:
    Py_ssize_t g          # the group picked
    double m              # its earliest reserved-until time (the slot taken)
    double ts, te         # the transfer into the stage
    double start, end     # the stage's compute
    Py_ssize_t srv        # the group's server
    Py_ssize_t prev_link  # the uplink the transfer into the stage uses
    Py_ssize_t link       # the group's own uplink


cdef class _Batch:
    """A dispatched batch: pipeline, requests, per stage slot / worker / reserved end, and
    the first stage not reported finished yet (the reference's ``[p, reqs, wids, ends, k]``)."""
    cdef int p
    cdef int nst
    cdef int next
    cdef tuple reqs
    cdef Py_ssize_t slots[MAX_STAGES]
    cdef long wids[MAX_STAGES]
    cdef double ends[MAX_STAGES]


cdef class NativeReservationScheduler:
    """One model's reservation scheduler, compiled (see the module docstring).  The same
    constructor and interface as the reference ``ReservationScheduler``; its cluster state
    must hold :class:`Timeline` link timelines (``ClusterState(..., native=True)``)."""

    cdef dict __dict__        # attributes set from outside (a test's spy, a wrapper's notes)
    cdef public str model
    cdef public tuple pipelines
    cdef public object cluster_state
    cdef public double wake_lead_us
    cdef public object strict_batch_fraction
    cdef public object max_queue
    cdef public bint work_conserving

    cdef object _state
    cdef list _uplinks
    cdef list _downlinks
    cdef bint _duplex
    cdef object _batch_ids
    cdef Py_ssize_t npipes
    cdef int* p_batch         # planned batch per pipeline
    cdef int* p_st0           # first stage (flat index) per pipeline
    cdef int* p_nst           # stages per pipeline
    cdef int* st_g0           # first group per stage
    cdef int* st_ng           # groups per stage
    cdef double** st_lat      # per stage: latency_us row
    cdef double** st_net      # per stage: transfer_in_us row
    cdef double** st_next     # per stage: the next stage's transfer_in_us row, or NULL
    cdef Py_ssize_t* g_srv
    cdef Py_ssize_t* g_link
    cdef int* g_slot0
    cdef int* g_nslot
    cdef double* till         # per worker slot: reserved until (INF: removed)
    cdef long* slot_wid
    cdef char* slot_dead
    cdef Py_ssize_t nstages, ngroups, nslots
    cdef dict _loc            # worker id -> slot
    cdef object _queue
    cdef dict _batches
    cdef set _dead
    cdef set _retried
    cdef object _wake_at
    cdef double _last_now
    cdef readonly object _early  # the work-conserving rule, compiled (tests read it)
    cdef list _rows           # keeps nothing alive; rows are copied
    cdef Pick* _pa            # probe buffers (MAX_STAGES picks each)
    cdef Pick* _pb
    cdef Pick* _pc
    cdef Pick* _pd

    swappable = True

    def __cinit__(self, *args, **kwargs):
        self._pa = self._pb = self._pc = self._pd = NULL
        self.p_batch = self.p_st0 = self.p_nst = self.st_g0 = self.st_ng = NULL
        self.st_lat = self.st_net = self.st_next = NULL
        self.g_srv = self.g_link = NULL
        self.g_slot0 = self.g_nslot = NULL
        self.till = NULL
        self.slot_wid = NULL
        self.slot_dead = NULL
        self.nstages = 0

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.st_lat != NULL:
            for i in range(self.nstages):
                PyMem_Free(self.st_lat[i])
                PyMem_Free(self.st_net[i])
        PyMem_Free(self.p_batch)
        PyMem_Free(self.p_st0)
        PyMem_Free(self.p_nst)
        PyMem_Free(self.st_g0)
        PyMem_Free(self.st_ng)
        PyMem_Free(self.st_lat)
        PyMem_Free(self.st_net)
        PyMem_Free(self.st_next)
        PyMem_Free(self.g_srv)
        PyMem_Free(self.g_link)
        PyMem_Free(self.g_slot0)
        PyMem_Free(self.g_nslot)
        PyMem_Free(self.till)
        PyMem_Free(self.slot_wid)
        PyMem_Free(self.slot_dead)
        PyMem_Free(self._pa)
        PyMem_Free(self._pb)
        PyMem_Free(self._pc)
        PyMem_Free(self._pd)

    def __init__(self, model, pipelines, state, *, wake_lead_us=0.0,
                 strict_batch_fraction=None, max_queue=None, work_conserving=False,
                 work_conserving_max_load=0.5, work_conserving_window_us=100_000.0,
                 work_conserving_min_gain=None):
        self.model = model
        self.pipelines = tuple(pipelines)
        self._state = state
        self._uplinks = state.uplinks
        self._downlinks = state.downlinks
        for tl in self._uplinks + self._downlinks:
            if not isinstance(tl, Timeline):
                raise ConfigError("the compiled reservation scheduler needs a cluster state "
                                  "with compiled link timelines (ClusterState(native=True))")
        self._duplex = state.link_model == "duplex"
        self._batch_ids = state.batch_ids
        self.wake_lead_us = float(wake_lead_us)
        self.strict_batch_fraction = strict_batch_fraction
        self.max_queue = max_queue
        self.work_conserving = bool(work_conserving)
        if work_conserving:
            WorkConservingRule(self.pipelines, work_conserving_max_load,
                               work_conserving_window_us,
                               work_conserving_min_gain)   # its checks and errors
            self._early = NativeWorkConservingRule(self.pipelines, work_conserving_max_load,
                                                   work_conserving_window_us,
                                                   work_conserving_min_gain)
        else:
            self._early = None
        self._queue = deque()
        self._batches = {}
        self._dead = set()
        self._retried = set()
        self._wake_at = None
        self._last_now = -INF
        self._build(state.worker_uplink)

    cdef _build(self, worker_uplink):
        # groups as the reference builds them: per stage, the workers sharing a server and an
        # uplink, in placement order; one slot per worker
        groups = []       # (stage flat index, srv, link, [wid, ...])
        stage_groups = []
        for pt in self.pipelines:
            if len(pt.stages) > MAX_STAGES:
                raise ConfigError(f"{self.model}: pipeline {pt.index} has {len(pt.stages)} "
                                  f"stages; the compiled scheduler takes up to {MAX_STAGES}")
            for st in pt.stages:
                by_link = {}
                for wid, srv in zip(st.worker_ids, st.server_ids):
                    link = worker_uplink[wid]
                    by_link.setdefault((srv, link), [srv, link, []])[2].append(wid)
                stage_groups.append(list(by_link.values()))
        cdef Py_ssize_t npipes = len(self.pipelines)
        cdef Py_ssize_t nstages = len(stage_groups)
        cdef Py_ssize_t ngroups = sum(len(g) for g in stage_groups)
        cdef Py_ssize_t nslots = sum(len(gr[2]) for g in stage_groups for gr in g)
        self.npipes = npipes
        self.p_batch = <int*>_alloc(max(1, npipes) * sizeof(int))
        self.p_st0 = <int*>_alloc(max(1, npipes) * sizeof(int))
        self.p_nst = <int*>_alloc(max(1, npipes) * sizeof(int))
        self.st_g0 = <int*>_alloc(max(1, nstages) * sizeof(int))
        self.st_ng = <int*>_alloc(max(1, nstages) * sizeof(int))
        self.st_lat = <double**>_alloc(max(1, nstages) * sizeof(double*))
        self.st_net = <double**>_alloc(max(1, nstages) * sizeof(double*))
        self.st_next = <double**>_alloc(max(1, nstages) * sizeof(double*))
        for i in range(nstages):
            self.st_lat[i] = self.st_net[i] = self.st_next[i] = NULL
        self.nstages = nstages
        self.g_srv = <Py_ssize_t*>_alloc(max(1, ngroups) * sizeof(Py_ssize_t))
        self.g_link = <Py_ssize_t*>_alloc(max(1, ngroups) * sizeof(Py_ssize_t))
        self.g_slot0 = <int*>_alloc(max(1, ngroups) * sizeof(int))
        self.g_nslot = <int*>_alloc(max(1, ngroups) * sizeof(int))
        self.till = <double*>_alloc(max(1, nslots) * sizeof(double))
        self.slot_wid = <long*>_alloc(max(1, nslots) * sizeof(long))
        self.slot_dead = <char*>_alloc(max(1, nslots) * sizeof(char))
        self._pa = <Pick*>_alloc(MAX_STAGES * sizeof(Pick))
        self._pb = <Pick*>_alloc(MAX_STAGES * sizeof(Pick))
        self._pc = <Pick*>_alloc(MAX_STAGES * sizeof(Pick))
        self._pd = <Pick*>_alloc(MAX_STAGES * sizeof(Pick))
        self.ngroups, self.nslots = ngroups, nslots
        self._loc = {}
        cdef Py_ssize_t si = 0, gi = 0, k = 0
        for p, pt in enumerate(self.pipelines):
            self.p_batch[p] = pt.planned_batch
            self.p_st0[p] = si
            self.p_nst[p] = len(pt.stages)
            for s, st in enumerate(pt.stages):
                self.st_lat[si] = _row(st.latency_us)
                self.st_net[si] = _row(st.transfer_in_us)
                self.st_g0[si] = gi
                self.st_ng[si] = len(stage_groups[si])
                for srv, link, wids in stage_groups[si]:
                    self.g_srv[gi] = srv
                    self.g_link[gi] = link
                    self.g_slot0[gi] = k
                    self.g_nslot[gi] = len(wids)
                    for wid in wids:
                        self._loc[wid] = k
                        self.till[k] = 0.0
                        self.slot_wid[k] = wid
                        self.slot_dead[k] = 0
                        k += 1
                    gi += 1
                si += 1
            for s in range(len(pt.stages) - 1):
                self.st_next[self.p_st0[p] + s] = self.st_net[self.p_st0[p] + s + 1]

    # ---- calibration (ppipe_trt.scheduler.calibration) ------------------------------------

    calibratable = True

    def set_stage_latency(self, int pipeline, int stage, latency_us) -> None:
        """As the reference's: plan the stage with ``latency_us`` from now on."""
        self.pipelines = with_stage_latency(self.pipelines, pipeline, stage, latency_us)
        cdef double* row = self.st_lat[self.p_st0[pipeline] + stage]
        new = self.pipelines[pipeline].stages[stage].latency_us
        cdef Py_ssize_t i
        for i in range(len(new)):
            row[i] = new[i]
        if self._early is not None:
            (<NativeWorkConservingRule>self._early).set_pipelines(self.pipelines)

    # ---- inspection (tests, metrics) ------------------------------------------------------

    def reserved_until(self, worker_id) -> float:
        """The time (us) until which ``worker_id`` is reserved (INF when removed)."""
        return self.till[self._worker(worker_id)]

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def wake_at_us(self):
        return self._wake_at

    @property
    def batches_in_flight(self) -> int:
        return len(self._batches)

    # ---- events ---------------------------------------------------------------------------

    def on_arrival(self, request, double now_us):
        return self.on_arrivals((request,), now_us)

    def on_arrivals(self, requests, double now_us):
        self._tick(now_us)
        q = self._queue
        dec = Decisions([], [], None)
        cdef NativeWorkConservingRule early = self._early
        if early is not None:
            for request in requests:
                early._observe(min(<double>request.arrival_us, now_us))
        cdef Py_ssize_t i
        cdef double dl
        for request in requests:
            if self.max_queue is not None and len(q) >= self.max_queue:
                self._schedule(now_us, dec)
                if len(q) >= self.max_queue:
                    dec.drops.append(Drop(request, _QUEUE_FULL,
                                          f"queue holds {len(q)} requests (max "
                                          f"{self.max_queue})"))
                    continue
            dl = request.deadline_us
            if not q or dl >= <double>q[len(q) - 1].deadline_us:
                q.append(request)
            else:  # an earlier deadline than the tail: keep the queue sorted
                i = len(q) - 1
                while i > 0 and <double>q[i - 1].deadline_us > dl:
                    i -= 1
                q.insert(i, request)
        self._schedule(now_us, dec)
        return dec

    def on_wake(self, double now_us):
        self._tick(now_us)
        dec = Decisions([], [], None)
        self._schedule(now_us, dec)
        return dec

    def on_stage_finished(self, batch_id, int stage, double finish_us, double now_us):
        self._tick(now_us)
        cdef _Batch rec = self._batches.get(batch_id)
        if rec is None:
            raise SchedulerError(f"{self.model}: finish reported for unknown batch {batch_id} "
                                 "(never dispatched, already finished, or dropped)")
        if not 0 <= stage < rec.nst:
            raise SchedulerError(f"{self.model}: batch {batch_id} has stages 0..{rec.nst - 1}, "
                                 f"finish reported for stage {stage}")
        cdef bint late = finish_us > rec.ends[stage]
        self._take_finish(rec, batch_id, stage, finish_us)
        dec = Decisions([], [], None)
        if (late or self._early is not None) and self._queue:
            self._schedule(now_us, dec)
        else:
            dec.wake_at_us = self._wake_at
        return dec

    cdef int _take_finish(self, _Batch rec, batch_id, int stage, double finish_us) except -1:
        """What a stage finish changes before any decision pass (the reference's
        ``on_stage_finished`` up to its ``Decisions``)."""
        cdef double reserved = rec.ends[stage]
        cdef bint late = finish_us > reserved
        cdef Py_ssize_t slot
        if finish_us != reserved and not self.slot_dead[rec.slots[stage]]:
            slot = rec.slots[stage]
            if self.till[slot] == reserved:   # nothing reserved after this batch: the truth
                self.till[slot] = finish_us
            elif late:                        # later reservations on it pushed back as much
                self.till[slot] += finish_us - reserved
            elif stage == 0:                  # early: its later batches start when it is free
                self._pull_forward(rec, slot, reserved - finish_us)
            rec.ends[stage] = finish_us
        rec.next = stage + 1
        if stage == rec.nst - 1:
            del self._batches[batch_id]
        return 0

    cdef int _pull_forward(self, _Batch rec, Py_ssize_t slot, double gain_us) except -1:
        """As the reference's: the batches reserved after ``rec`` on its first-stage worker
        (and the worker's reserved-until) move ``gain_us`` earlier."""
        cdef _Batch other
        self.till[slot] -= gain_us
        for other in self._batches.values():
            if other is not rec and other.next == 0 and other.slots[0] == slot:
                other.ends[0] -= gain_us
        return 0

    cdef int _finish_quiet(self, batch_id, int stage, double finish_us,
                           double now_us) except -1:
        """:meth:`on_stage_finished` when it would make no decision pass (nothing queued,
        or nothing that could move): applied, 1; otherwise (or an error to raise) nothing
        is changed, 0, and the caller calls :meth:`on_stage_finished`."""
        if now_us < self._last_now:
            return 0
        cdef _Batch rec = self._batches.get(batch_id)
        if rec is None or not 0 <= stage < rec.nst:
            return 0
        if (finish_us > rec.ends[stage] or self._early is not None) and self._queue:
            return 0
        self._last_now = now_us
        self._take_finish(rec, batch_id, stage, finish_us)
        return 1

    def remove_worker(self, worker_id, double now_us):
        self._tick(now_us)
        cdef Py_ssize_t slot = self._worker(worker_id)
        self.till[slot] = INF
        self.slot_dead[slot] = 1
        self._dead.add(worker_id)
        dec = Decisions([], [], None)
        cdef _Batch rec
        cdef int s
        hit = []
        for bid, rec in self._batches.items():
            for s in range(rec.next, rec.nst):
                if rec.wids[s] == worker_id:
                    hit.append(bid)
                    break
        for bid in hit:
            rec = self._batches.pop(bid)
            for r in rec.reqs:
                dec.drops.append(Drop(r, _WORKER_FAILED,
                                      f"worker {worker_id} failed under batch {bid}"))
        self._schedule(now_us, dec)
        return dec

    def add_worker(self, worker_id, double now_us):
        self._tick(now_us)
        cdef Py_ssize_t slot = self._worker(worker_id)
        self._dead.discard(worker_id)
        self.slot_dead[slot] = 0
        self.till[slot] = now_us
        dec = Decisions([], [], None)
        self._schedule(now_us, dec)
        return dec

    def drain(self, now_us):
        dec = Decisions([], [], None)
        while self._queue:
            dec.drops.append(Drop(self._queue.popleft(), _SHUTDOWN, "server stopping"))
        self._wake_at = None
        return dec

    # ---- plan swap ----------------------------------------------------------------------

    def take_queued(self, double now_us) -> list:
        self._tick(now_us)
        taken = list(self._queue)
        self._queue.clear()
        self._retried.clear()
        self._wake_at = None
        return taken

    def hold_worker(self, worker_id, double until_us) -> None:
        cdef Py_ssize_t slot = self._worker(worker_id)
        if until_us > self.till[slot]:
            self.till[slot] = until_us

    # ---- internals ------------------------------------------------------------------------

    cdef Py_ssize_t _worker(self, worker_id) except -1:
        try:
            return self._loc[worker_id]
        except KeyError:
            raise SchedulerError(f"{self.model}: worker {worker_id} does not serve this model; "
                                 f"its workers are {sorted(self._loc)}") from None

    cdef int _tick(self, double now_us) except -1:
        if now_us < self._last_now:
            raise SchedulerError(f"{self.model}: time went backwards from {self._last_now} us "
                                 f"to {now_us} us")
        self._last_now = now_us
        return 0

    cdef inline double _group_min(self, Py_ssize_t gi) noexcept:
        """The earliest reserved-until time among group ``gi``'s workers."""
        cdef Py_ssize_t k = self.g_slot0[gi], k_end = k + self.g_nslot[gi]
        cdef double m = self.till[k], x
        k += 1
        while k < k_end:
            x = self.till[k]
            if x < m:
                m = x
            k += 1
        return m

    cdef double _probe(self, int p, int b, double now, Pick* picks, double* work_out) noexcept:
        """The reference's ``_probe``: the earliest route of a batch of ``b`` on pipeline
        ``p``; its finish (INF when a stage has no live worker), the route's compute and
        network time in ``work_out``, per stage its pick in ``picks``."""
        cdef list uplinks = self._uplinks
        cdef list downlinks = self._downlinks
        cdef Py_ssize_t st0 = self.p_st0[p], si, gi, g_end
        cdef int s, nst = self.p_nst[p]
        cdef double t = now, work = 0.0, lat, best, next_net, floor, m, start, end, key
        cdef double net = 0.0, u0 = 0.0, lb, ts, te
        cdef Py_ssize_t prev_srv = -1, prev_link = -1, srv
        cdef bint found, first
        cdef double* next_row
        cdef Timeline up, dn
        cdef Pick* pk
        for s in range(nst):
            si = st0 + s
            lat = self.st_lat[si][b]
            best = INF
            found = False
            pk = &picks[s]
            next_row = self.st_next[si]
            next_net = next_row[b] if next_row != NULL else 0.0
            # No group of a stage can finish before t + lat (it starts at t at the earliest):
            # once one does, later groups can only tie, and a tie never replaces the pick.
            floor = t + lat
            first = s == 0          # no transfer into stage 0 (the reference's s == 0 branch)
            if not first:
                net = self.st_net[si][b]
                up = <Timeline>uplinks[prev_link]
                u0 = tl_first_free(up, t, net)   # earliest the sender's uplink can carry it
            gi = self.st_g0[si]
            g_end = gi + self.st_ng[si]
            while gi < g_end:
                m = self._group_min(gi)
                srv = self.g_srv[gi]
                if first or srv == prev_srv:
                    ts = t
                    te = t
                else:
                    lb = u0 + net
                    if (m if m > lb else lb) + lat >= best:
                        gi += 1
                        continue
                    dn = <Timeline>downlinks[srv]
                    ts = u0 if tl_is_free(dn, u0, net) else tl_common_free(up, dn, u0, net)
                    te = ts + net
                start = m if m > te else te
                end = start + lat
                if end >= best:
                    gi += 1
                    continue
                key = end
                if next_row != NULL:  # its output must also get onto the uplink
                    key = tl_first_free(<Timeline>uplinks[self.g_link[gi]], end, next_net)
                if key < best:
                    best = key
                    found = True
                    pk.g = gi
                    pk.m = m
                    pk.ts = ts
                    pk.te = te
                    pk.start = start
                    pk.end = end
                    pk.srv = srv
                    pk.prev_link = prev_link
                    pk.link = self.g_link[gi]
                    if best <= floor:
                        break
                gi += 1
            if not found or pk.m == INF:
                work_out[0] = 0.0
                return INF
            work += lat + (pk.te - pk.ts)
            t = pk.end
            prev_srv = pk.srv
            prev_link = pk.link
        work_out[0] = work
        return t

    cdef int _schedule(self, double now, dec) except -1:
        q = self._queue
        self._wake_at = None
        cdef Py_ssize_t npipes = self.npipes
        cdef Pick* cur = self._pa
        cdef Pick* best = self._pb
        cdef Pick* chosen = self._pc
        cdef Pick* tmp
        cdef int p, b, best_p, best_b, n, nq, cb, i
        cdef double deadline, best_key, fin, work, key, best_fin, fin_n, work_n, best_fin_n
        cdef double early_at, slack, wake, lo, hi, mid, w2
        cdef bint have_best, light, have_chosen
        while q:
            head = q[0]
            deadline = head.deadline_us
            best_p = -1
            best_key = INF
            have_best = False
            best_b = 0
            best_fin = INF
            # light traffic (work-conserving): among the pipelines that can start now, the
            # one that answers the queued requests soonest, not the first in plan order
            light = self._early is not None and \
                (<NativeWorkConservingRule>self._early)._allows(len(q), now)
            best_fin_n = INF
            for p in range(npipes):
                b = self.p_batch[p]
                fin = self._probe(p, b, now, cur, &work)
                if fin == INF:
                    continue
                key = fin - now - work
                if light:
                    key = key if key > IDLE_TIE_US else 0.0
                    nq = len(q)
                    n = nq if nq < b else b
                    fin_n = fin if n == b else self._probe(p, n, now, self._pd, &w2)
                    if key < best_key or (key == best_key and fin_n < best_fin_n):
                        best_key, best_fin_n, best_p = key, fin_n, p
                        best_b, best_fin, have_best = b, fin, True
                        tmp = best
                        best = cur
                        cur = tmp
                    continue
                if key < best_key:
                    best_key, best_p = key, p
                    best_b, best_fin, have_best = b, fin, True
                    tmp = best
                    best = cur
                    cur = tmp
            if not have_best:
                while q:
                    dec.drops.append(Drop(q.popleft(), _NO_WORKERS,
                                          f"{self.model}: some stage of every pipeline has no "
                                          "live worker"))
                break
            head_id = head.request_id
            cb = self._fit(best_p, True, best_b, best_fin, best, deadline, now, head_id,
                           chosen, &fin)
            if cb == 0 and not self._is_strict(head_id):
                for p in self._by_waiting(now, best_p):
                    cb = self._fit(p, False, 0, INF, NULL, deadline, now, head_id, chosen,
                                   &fin)
                    if cb != 0:
                        best_p = p
                        break
            if cb == 0 and <double>head.grace_us > 0.0:
                # Late (a stalled wake-up): dispatch what still makes the real deadline.
                cb = self._fit(best_p, False, 0, INF, NULL,
                               deadline + <double>head.grace_us, now, head_id, chosen, &fin)
                if cb != 0:
                    nq = len(q)
                    n = cb if cb < nq else nq
                    if n != cb:
                        self._probe(best_p, n, now, chosen, &w2)
                    self._dispatch(best_p, n, chosen, dec)
                    continue
            if cb == 0:
                self._drop_unreachable(now, dec)
                continue
            b = cb
            if len(q) >= b:
                self._dispatch(best_p, b, chosen, dec)
                continue
            n = len(q)
            fin_n = self._probe(best_p, n, now, cur, &work_n)
            early_at = INF
            if self._early is not None:
                # nothing of this model in flight: no batch is running that arrivals could
                # join the queue behind, and holding only idles its pools (a closed-loop
                # client, a lull); else the rate rule decides
                if not self._batches or \
                        (<NativeWorkConservingRule>self._early)._allows(n, now):
                    early_at = fin_n - work_n   # the route is free for the batch from then on
                    if early_at <= now + WAKE_GUARD_US and fin_n <= deadline:
                        self._dispatch(best_p, n, cur, dec)
                        continue
                else:  # look again when the decaying rate estimate would allow it
                    early_at = (<NativeWorkConservingRule>self._early)._allowed_at(n, now)
            slack = deadline - fin_n
            if slack <= WAKE_GUARD_US + self.wake_lead_us:
                self._dispatch(best_p, n, cur, dec)
                continue
            wake = now + slack - WAKE_GUARD_US - self.wake_lead_us
            if self.p_nst[best_p] > 1 and \
                    self._probe(best_p, n, wake, self._pd, &w2) > deadline:
                lo = now            # dispatching at lo meets the deadline
                hi = wake
                for i in range(8):
                    mid = 0.5 * (lo + hi)
                    if self._probe(best_p, n, mid, self._pd, &w2) <= deadline:
                        lo = mid
                    else:
                        hi = mid
                wake = lo
                if wake - now <= WAKE_GUARD_US:
                    self._dispatch(best_p, n, cur, dec)
                    continue
            if early_at < wake:
                wake = early_at
            self._wake_at = wake
            break
        dec.wake_at_us = self._wake_at
        return 0

    cdef bint _is_strict(self, request_id):
        return self.strict_batch_fraction is not None and request_id not in self._retried

    cdef int _fit(self, int p, bint has_planned, int planned_b, double planned_fin,
                  Pick* planned, double deadline, double now, head_id, Pick* out,
                  double* fin_out) except -1:
        """The reference's ``_fit``: the largest batch (planned downwards) on pipeline ``p``
        finishing by ``deadline``, its picks in ``out``, its finish in ``fin_out``; 0 when
        none does."""
        cdef int b_max = self.p_batch[p], b_min = 1, b, b_top
        cdef double fin, work
        if self._is_strict(head_id):
            b_min = max(1, round(b_max * self.strict_batch_fraction))
        if has_planned and planned_fin <= deadline:
            if self.strict_batch_fraction is not None:
                self._retried.add(head_id)
            memcpy(out, planned, self.p_nst[p] * sizeof(Pick))
            fin_out[0] = planned_fin
            return planned_b
        b_top = b_max - 1 if has_planned else b_max
        b = b_top
        while b > b_min - 1:
            fin = self._probe(p, b, now, out, &work)
            if fin <= deadline:
                if self.strict_batch_fraction is not None:
                    self._retried.add(head_id)
                fin_out[0] = fin
                return b
            b -= 1
        return 0

    cdef list _by_waiting(self, double now, int exclude):
        cdef double fin, work
        keyed = []
        for p in range(self.npipes):
            if p != exclude:
                fin = self._probe(p, self.p_batch[p], now, self._pd, &work)
                if fin != INF:
                    keyed.append((fin - now - work, p))
        keyed.sort()
        return [p for _, p in keyed]

    cdef int _drop_unreachable(self, double now, dec) except -1:
        """Drop the head, and every request behind it that no pipeline can finish in time."""
        q = self._queue
        head = q.popleft()
        self._retried.discard(head.request_id)
        cdef double earliest = INF, fin, work
        cdef Py_ssize_t p
        for p in range(self.npipes):
            fin = self._probe(p, 1, now, self._pd, &work)
            if p == 0 or fin < earliest:
                earliest = fin
        detail = f"earliest batch-1 finish {earliest:.0f} us > deadline"
        dec.drops.append(Drop(head, _UNREACHABLE, detail))
        while q and <double>q[0].deadline_us < earliest:
            r = q.popleft()
            self._retried.discard(r.request_id)
            dec.drops.append(Drop(r, _UNREACHABLE, detail))
        return 0

    cdef int _dispatch(self, int p, int b, Pick* picks, dec) except -1:
        q = self._queue
        reqs = tuple([q.popleft() for _ in range(b)])
        if self.strict_batch_fraction is not None:
            for r in reqs:
                self._retried.discard(r.request_id)
        cdef _Batch rec = _Batch.__new__(_Batch)
        cdef int s, nst = self.p_nst[p]
        cdef Py_ssize_t k, k_end, pos
        cdef double ts, te
        cdef Pick* pk
        cdef Timeline up, dn
        route = []
        for s in range(nst):
            pk = &picks[s]
            k = self.g_slot0[pk.g]
            k_end = k + self.g_nslot[pk.g]
            pos = k
            while pos < k_end and self.till[pos] != pk.m:
                pos += 1
            self.till[pos] = pk.end
            ts = pk.ts
            te = pk.te
            if te != ts:
                up = <Timeline>self._uplinks[pk.prev_link]
                tl_reserve(up, ts, te)
                if self._duplex:
                    dn = <Timeline>self._downlinks[pk.srv]
                    tl_reserve(dn, ts, te)
                    if up.n > PRUNE_AT:
                        tl_prune(up, self._last_now)
                    if dn.n > PRUNE_AT:
                        tl_prune(dn, self._last_now)
                elif up.n > PRUNE_AT:
                    tl_prune(up, self._last_now)
            else:
                ts = te = pk.start
            rec.slots[s] = pos
            rec.wids[s] = self.slot_wid[pos]
            rec.ends[s] = pk.end
            route.append(_reservation(s, self.slot_wid[pos], pk.start, pk.end, ts, te))
        bid = next(self._batch_ids)
        rec.p = p
        rec.nst = nst
        rec.next = 0
        rec.reqs = reqs
        self._batches[bid] = rec
        dec.dispatches.append(_dispatch(bid, self.model, p, reqs, tuple(route)))
        return 0


# The interface's frozen dataclasses, filled in without their generated ``__init__`` (a
# Python frame and an ``object.__setattr__`` per field: ~0.7 us each, most of a one-request
# decision pass): the same fields, values and type; ``__eq__`` and ``__hash__`` are theirs.
cdef object _new_object = object.__new__


cdef object _reservation(int stage, long worker_id, double start_us, double finish_us,
                         double transfer_start_us, double transfer_finish_us):
    """``StageReservation(stage, worker_id, start_us, finish_us, transfer_start_us,
    transfer_finish_us)``."""
    o = _new_object(StageReservation)
    PyObject_GenericSetAttr(o, "stage", stage)
    PyObject_GenericSetAttr(o, "worker_id", worker_id)
    PyObject_GenericSetAttr(o, "start_us", start_us)
    PyObject_GenericSetAttr(o, "finish_us", finish_us)
    PyObject_GenericSetAttr(o, "transfer_start_us", transfer_start_us)
    PyObject_GenericSetAttr(o, "transfer_finish_us", transfer_finish_us)
    return o


cdef object _dispatch(batch_id, model, int pipeline, tuple requests, tuple route):
    """``Dispatch(batch_id, model, pipeline, requests, route)``."""
    o = _new_object(Dispatch)
    PyObject_GenericSetAttr(o, "batch_id", batch_id)
    PyObject_GenericSetAttr(o, "model", model)
    PyObject_GenericSetAttr(o, "pipeline", pipeline)
    PyObject_GenericSetAttr(o, "requests", requests)
    PyObject_GenericSetAttr(o, "route", route)
    return o


cdef void* _alloc(size_t n) except NULL:
    cdef void* ptr = PyMem_Malloc(n)
    if ptr == NULL:
        raise MemoryError()
    return ptr


cdef double* _row(values) except NULL:
    cdef Py_ssize_t i, n = len(values)
    cdef double* row = <double*>_alloc(max(1, n) * sizeof(double))
    for i in range(n):
        v = values[i]
        row[i] = float("nan") if v is None else v
    return row


cdef class FinishRouter:
    """A stage finish of a thread-less timing-only worker, told to its scheduler without a
    Python call layer: what ``DecisionLoop.stage_finished`` does when the finish needs no
    decision pass (the compiled scheduler's ``_finish_quiet``), so that the compiled
    timing-only workers (``ppipe_trt._native.timed.TimedPool``) call it first and the loop
    only for the rest.  The loop keeps it current: ``schedulers`` (its current plan's, by
    model), ``first_batch_id`` (older batches go the loop's way) and ``stopping`` (after
    its Stop a finish is dropped: the loop's way too); ``wake`` is the loop's wake-up
    times by model, which it sets as the loop would (unchanged by such a finish)."""

    cdef public dict schedulers
    cdef public object first_batch_id
    cdef public bint stopping
    cdef dict wake

    def __init__(self, dict schedulers, dict wake):
        self.schedulers = schedulers
        self.first_batch_id = 0
        self.stopping = False
        self.wake = wake

    def finish(self, model, batch_id, int stage, double finish_us, double now_us) -> bool:
        """Tell ``model``'s scheduler of the finish if that is all it takes (True);
        False: nothing done, the loop's way is needed."""
        if self.stopping or batch_id < self.first_batch_id:
            return False
        sched = self.schedulers.get(model)
        if type(sched) is not NativeReservationScheduler:
            return False
        cdef NativeReservationScheduler s = <NativeReservationScheduler>sched
        if not s._finish_quiet(batch_id, stage, finish_us, now_us):
            return False
        self.wake[model] = s._wake_at
        return True


cdef class NativeWorkConservingRule:
    """:class:`ppipe_trt.scheduler.work_conserving.WorkConservingRule` compiled (that class is
    the specification and the reference): the same estimate and test, the same
    floating-point expressions in the same order (``exp`` and ``log`` are the C library's,
    which Python's ``math`` calls), its methods and state readable as the reference's."""

    cdef readonly double max_load
    cdef readonly double window_us
    cdef readonly object min_gain
    cdef double _gain      # 1 + min_gain, or -1 without it
    cdef double* _caps
    cdef Py_ssize_t _ncaps
    cdef public double _level
    cdef public double _level_at_us

    def __cinit__(self, *args, **kwargs):
        self._caps = NULL

    def __dealloc__(self):
        PyMem_Free(self._caps)

    def __init__(self, pipelines, max_load=0.5, window_us=100_000.0, min_gain=None):
        self.max_load = float(max_load)
        self.window_us = float(window_us)
        self.min_gain = None if min_gain is None else float(min_gain)
        self._gain = -1.0 if min_gain is None else 1.0 + float(min_gain)
        caps = capacity_by_batch_rps(pipelines)
        self._ncaps = len(caps)
        self._caps = _row(caps)
        self._level = 0.0
        self._level_at_us = -INF

    def set_pipelines(self, pipelines) -> None:
        caps = capacity_by_batch_rps(pipelines)
        if len(caps) != self._ncaps:
            raise ConfigError(f"{len(caps)} capacities for a rule of {self._ncaps}")
        cdef Py_ssize_t i
        for i in range(self._ncaps):
            self._caps[i] = caps[i]

    @property
    def _capacity_rps(self) -> list:
        return [self._caps[i] for i in range(self._ncaps)]

    def observe(self, double arrival_us) -> None:
        self._observe(arrival_us)

    def rate_rps(self, double now_us) -> float:
        return self._rate_rps(now_us)

    def capacity_rps(self, Py_ssize_t n) -> float:
        return self._capacity(n)

    def allows(self, Py_ssize_t queued, double now_us) -> bool:
        return self._allows(queued, now_us)

    def batching_gains_little(self, Py_ssize_t queued) -> bool:
        return self._gains_little(queued)

    def allowed_at(self, Py_ssize_t queued, double now_us) -> float:
        return self._allowed_at(queued, now_us)

    cdef inline void _observe(self, double arrival_us) noexcept:
        if arrival_us > self._level_at_us:
            if self._level:
                self._level *= exp((self._level_at_us - arrival_us) / self.window_us)
            self._level_at_us = arrival_us
        self._level += 1.0

    cdef inline double _rate_rps(self, double now_us) noexcept:
        cdef double level = self._level
        if level and now_us > self._level_at_us:
            level *= exp((self._level_at_us - now_us) / self.window_us)
        return level * 1e6 / self.window_us

    cdef inline double _capacity(self, Py_ssize_t n) noexcept:
        if n <= 0:
            return 0.0
        return self._caps[n if n < self._ncaps - 1 else self._ncaps - 1]

    cdef inline bint _gains_little(self, Py_ssize_t queued) noexcept:
        if self._gain < 0.0 or queued <= 0:
            return False
        return self._caps[self._ncaps - 1] <= self._gain * self._capacity(queued)

    cdef inline bint _allows(self, Py_ssize_t queued, double now_us) noexcept:
        return (self._rate_rps(now_us) <= self.max_load * self._capacity(queued)
                or self._gains_little(queued))

    cdef double _allowed_at(self, Py_ssize_t queued, double now_us) noexcept:
        cdef double threshold = self.max_load * self._capacity(queued)
        cdef double rate = self._rate_rps(now_us)
        if rate <= threshold or self._gains_little(queued):
            return now_us
        if threshold <= 0.0:
            return INF
        # rate x exp(-dt / window) <= threshold; 1 us later, so that allows() holds then
        return now_us + self.window_us * log(rate / threshold) + 1.0
