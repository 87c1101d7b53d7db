# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Thread-less timing-only workers compiled: one pool per runtime loop, one C timer heap.

The same workers as :class:`ppipe_trt.serving.timed_worker.TimedWorker` -- that module's
docstring is the specification and its code the reference -- with their state in C fields
and their batches' finishes on one heap the runtime loop drains
(:meth:`TimedPool.run_due`, :meth:`TimedPool.next_due_us`; see
``DecisionLoop.timed_pool``) instead of one Python timer and callback per batch; a hand-off
to a worker of the same pool through the in-process transport is done here, with the
transport's own rules (its link delay), instead of through ``Transport.send``.  What the
runtime hears is unchanged: ``stage_finished``, ``batch_completed`` and ``batch_failed`` with
the same :class:`~ppipe_trt.serving.transport.StageJob` objects and times.

Rules kept exactly: one batch at a time per worker; the ready job with the earliest reserved
start first; a job never before its reserved start, its emulated link's delivery or its
dispatch; a batch is committed on the emulated GPU's own timeline once its start is known,
and taken back if a job queued before that start would have been chosen instead.
``tests/serving/test_timed_pool.py`` drives the pool and the reference side by side.
"""

from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

cdef extern from "Python.h":
    unsigned long PyThread_get_thread_ident() nogil

from ppipe_trt.errors import PPipeError
from ppipe_trt.serving.clock import monotonic_us
from ppipe_trt.serving.handle import WorkerStats
from ppipe_trt.serving.transport import InProcessTransport, StageJob

#: SHA-256 of this file when it was compiled (see ``setup.py``; a stale build is not used).
SOURCE_SHA256 = PPIPE_SOURCE_SHA256

cdef double INF = float("inf")
cdef object _NO_ID = object()


cdef inline double c_monotonic_us() noexcept:
    """``time.monotonic_ns() / 1000`` (CPython reads CLOCK_MONOTONIC too; the same double)."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>(<long long>ts.tv_sec * 1000000000 + ts.tv_nsec) / 1000.0


cdef class _Job:
    """A queued job and what the rules read of it, read once."""
    cdef object job          # the StageJob
    cdef double ready        # when it may start (reference: ``_ready_at``)
    cdef double res_start    # its reserved start
    cdef int batch
    cdef bint last           # the route's last stage


cdef struct Entry:
    double t
    long long seq
    int w
    long long tok


cdef class PooledWorker:
    """A :class:`~ppipe_trt.serving.handle.WorkerHandle` for timing-only emulation, one of a
    :class:`TimedPool`'s.  The transport delivers to it (it is callable with a job)."""

    cdef public object info      # (a plan swap that keeps the worker gives it its new slot)
    cdef readonly TimedPool pool
    cdef int idx                 # its place in the pool (-1: released, see TimedPool._release)
    cdef double _shortest        # its shortest hold (any batch)
    cdef object _emulation
    cdef double* _hold
    cdef int _max_batch
    cdef list _jobs
    cdef _Job _run               # the batch committed on the emulated GPU, or None
    cdef double _run_start, _run_finish, _run_free_before
    cdef long long _token        # the committed batch's; other heap entries are stale
    cdef double _free_us
    cdef bint _stopping
    cdef long long _batches, _samples
    cdef double _busy_us, _lag_total_us, _lag_max_us, _started_us

    #: No thread of its own (see ``ServingRuntime.threadless``).
    threadless = True

    def __cinit__(self):
        self._hold = NULL

    def __dealloc__(self):
        PyMem_Free(self._hold)

    @property
    def worker_id(self) -> int:
        return self.info.worker_id

    @property
    def alive(self) -> bool:
        return not self._stopping

    @property
    def mode(self) -> str:
        return f"timing-only, {self._emulation.label}"

    def start(self) -> None:
        self.pool.transport.register(self.info.worker_id, self)
        self._started_us = self.pool.now()

    def stop(self, timeout_s=5.0) -> list:
        """Stop taking jobs; returns those that never started (the runtime fails them).
        The pool lets go of the worker once it has no batch left (at once, or when the one
        it runs finishes)."""
        self._stopping = True
        left = [(<_Job>j).job for j in self._jobs]
        self._jobs = []
        if self._run is not None and self._run_start > self.pool.now():
            left.append(self._run.job)  # committed, not started yet: never started
            self._run = None
            self._token = self.pool._new_token()
        if self._run is None:
            self.pool._release(self)
        return left

    def submit(self, job) -> None:
        self._submit(job)

    def __call__(self, job) -> None:
        self._submit(job)

    def stats(self) -> WorkerStats:
        info = self.info
        return WorkerStats(info.worker_id, info.model, info.stage, info.gpu_class, self.mode,
                           self._batches, self._samples, self._busy_us, len(self._jobs), 0, 0,
                           self._started_us, self._lag_total_us, self._lag_max_us)

    def __repr__(self):
        return f"PooledWorker({self.info.worker_id}, {self.mode!r})"

    # ---- the rules ----------------------------------------------------------------------

    cdef int _submit(self, job) except -1:
        if self._stopping:
            raise PPipeError(f"worker {self.info.worker_id} is stopping")
        cdef _Job j = _Job.__new__(_Job)
        d = job.dispatch
        route = d.route
        cdef int stage = job.stage
        cdef double start = route[stage].start_us
        cdef double nb = job.not_before_us
        cdef double sent = job.sent_us
        cdef double elig = start if start > nb else nb
        j.job = job
        j.ready = elig if elig > sent else sent
        j.res_start = start
        j.batch = len(d.requests)
        j.last = stage == len(route) - 1
        self._jobs.append(j)
        if self.pool._on_loop_thread():
            self._consider(j)
        else:  # from another thread: the loop thread considers it
            self.pool.timers.call_at(0.0, _Later(self, j))
        return 0

    cdef int _consider(self, _Job j) except -1:
        """A job was queued.  If the batch committed next would not have been chosen had
        this job been there (it is ready no later than that batch's start), the commitment
        is taken back; then the next batch is planned."""
        cdef double at
        if self._run is not None:
            at = j.ready
            if at < self._run_start or (at == self._run_start
                                        and j.res_start < self._run.res_start):
                self._jobs.append(self._run)   # its heap entry is stale from now on
                self._free_us = self._run_free_before
                self._run = None
                self._token = self.pool._new_token()
        return self._plan()

    cdef int _plan(self) except -1:
        """Commit the next batch on the emulated GPU's own timeline."""
        if self._run is not None or not self._jobs:
            return 0
        cdef list jobs = self._jobs
        cdef _Job j, best
        cdef double first, at
        cdef Py_ssize_t i, n = len(jobs), k
        if n == 1:   # the common case
            best = <_Job>jobs.pop()
            first = best.ready
            at = first if first > self._free_us else self._free_us
        else:
            first = (<_Job>jobs[0]).ready
            for i in range(1, n):
                j = <_Job>jobs[i]
                if j.ready < first:
                    first = j.ready
            at = first if first > self._free_us else self._free_us
            best = None
            k = -1
            for i in range(n):
                j = <_Job>jobs[i]
                if j.ready <= at and (best is None or j.res_start < best.res_start):
                    best = j
                    k = i
            del jobs[k]
        cdef double finish = at + self._hold_us(best.batch)
        self._run = best
        self._run_start = at
        self._run_finish = finish
        self._run_free_before = self._free_us
        self._free_us = finish
        self._token = self.pool._new_token()
        self.pool._push(finish, self._latest(best, finish), self.idx, self._token)
        return 0

    cdef double _latest(self, _Job j, double finish) except? -1.0:
        """How late the finish of ``j`` at ``finish`` may be handled without changing what
        follows from it (see :meth:`TimedPool.next_wake_us`): a route's last stage answers,
        so at its time; an earlier stage hands its batch to a worker of this pool, whose
        emulated finish is at least the pool's shortest hold later, so up to that."""
        if j.last or not self.pool._inproc:
            return finish
        d = j.job.dispatch
        if d.route[j.job.stage + 1].worker_id not in self.pool._wids:
            return finish
        return finish + self.pool._min_hold

    cdef double _hold_us(self, int batch) except? -1.0:
        if 1 <= batch <= self._max_batch:
            return self._hold[batch - 1]
        return self._emulation.hold_us(batch)   # raises the reference's ConfigError

    cdef int _finish(self) except -1:
        """The committed batch's emulated finish has come: account it, hand it on (or
        answer it), tell the runtime, plan the next."""
        cdef _Job j = self._run
        cdef double start_us = self._run_start, finish_us = self._run_finish
        self._run = None
        cdef TimedPool pool = self.pool
        cdef double lag = pool.now() - finish_us   # how late it heard of its emulated finish
        self._lag_total_us += lag
        if lag > self._lag_max_us:
            self._lag_max_us = lag
        self._batches += 1
        self._samples += j.batch
        self._busy_us += finish_us - start_us
        cdef double answered
        job = j.job
        sink = pool.sink
        if j.last:
            answered = pool.now()
            sink.batch_completed(job, {}, finish_us if finish_us >= answered else answered)
            pool._report(job, start_us, finish_us)
        else:
            nxt = StageJob(job.dispatch, job.stage + 1, {})
            try:
                pool._send(nxt, finish_us)
            except PPipeError as exc:
                pool._report(job, start_us, finish_us)
                sink.batch_failed(nxt, exc, finish_us)
                return self._next()
            pool._report(job, start_us, finish_us)
        return self._next()

    cdef int _next(self) except -1:
        """After a finish: plan the next batch; a stopped worker is let go of (it has none)."""
        self._plan()
        if self._stopping and self._run is None:
            self.pool._release(self)
        return 0


cdef class _Later:
    """A job submitted from another thread, considered on the loop thread."""
    cdef PooledWorker w
    cdef _Job j

    def __cinit__(self, PooledWorker w, _Job j):
        self.w = w
        self.j = j

    def __call__(self):
        self.w._consider(self.j)


cdef class TimedPool:
    """The compiled timing-only workers of one runtime loop and the heap of their batches'
    finishes.  ``transport``, ``sink`` and ``timers`` (the loop: ``on_loop_thread``,
    ``call_at``) as the reference worker's; the loop drains the heap with :meth:`run_due`
    and arms its timer at :meth:`next_due_us`."""

    cdef readonly object transport
    cdef readonly object sink
    cdef readonly object timers
    cdef readonly object clock
    cdef bint _c_clock
    cdef bint _inproc
    cdef bint _emulate_links
    cdef list _workers
    cdef Entry* _heap            # committed batches' finishes, by time
    cdef Py_ssize_t _n, _cap
    cdef Entry* _heap2           # the same, by how late each may be handled (next_wake_us)
    cdef Py_ssize_t _n2, _cap2
    cdef long long _seq
    cdef object _fast            # see set_fast_finish
    cdef set _wids               # this pool's worker ids
    cdef double _min_hold        # the shortest hold of any worker (any batch)
    cdef list _free              # places in _workers of workers let go of, to reuse
    cdef long long _tokens       # the last token given (unique in the pool: see _new_token)

    def __cinit__(self):
        self._heap = NULL
        self._heap2 = NULL

    def __dealloc__(self):
        PyMem_Free(self._heap)
        PyMem_Free(self._heap2)

    def __init__(self, transport, sink, timers, clock=monotonic_us):
        self.transport = transport
        self.sink = sink
        self.timers = timers
        self.clock = clock
        self._c_clock = clock is monotonic_us
        self._inproc = type(transport) is InProcessTransport
        self._emulate_links = bool(getattr(transport, "emulate_links", False))
        self._workers = []
        self._wids = set()
        self._min_hold = 0.0
        self._free = []
        self._tokens = 0
        self._cap = self._cap2 = 64
        self._n = self._n2 = 0
        self._seq = 0
        self._heap = <Entry*>PyMem_Malloc(self._cap * sizeof(Entry))
        self._heap2 = <Entry*>PyMem_Malloc(self._cap2 * sizeof(Entry))
        if self._heap == NULL or self._heap2 == NULL:
            raise MemoryError()

    def add(self, info, emulation) -> PooledWorker:
        """A new worker of the pool (not started)."""
        cdef PooledWorker w = PooledWorker.__new__(PooledWorker)
        w.info = info
        w.pool = self
        w._emulation = emulation
        table = emulation.latency_us
        w._max_batch = len(table)
        w._hold = <double*>PyMem_Malloc(max(1, len(table)) * sizeof(double))
        if w._hold == NULL:
            raise MemoryError()
        for i, v in enumerate(table):
            w._hold[i] = v
        holds = [float(v) for v in table]
        w._shortest = max(0.0, min(holds)) if holds else 0.0
        if not self._wids or w._shortest < self._min_hold:
            self._min_hold = w._shortest
        self._wids.add(info.worker_id)
        w._jobs = []
        w._run = None
        w._token = self._new_token()
        w._free_us = 0.0
        w._stopping = False
        if self._free:
            w.idx = self._free.pop()
            self._workers[w.idx] = w
        else:
            w.idx = len(self._workers)
            self._workers.append(w)
        return w

    @property
    def workers(self) -> tuple:
        """The pool's workers, those stopped and let go of left out."""
        return tuple(w for w in self._workers if w is not None)

    def set_fast_finish(self, fast) -> None:
        """``fast(model, batch_id, stage, finish_us, now_us) -> bool`` is offered every stage
        finish first (the loop's ``ppipe_trt._native.reservation.FinishRouter.finish``);
        when it returns False, or without one, ``sink.stage_finished`` is called as
        always."""
        self._fast = fast

    cpdef double now(self):
        if self._c_clock:
            return c_monotonic_us()
        return self.clock()

    cpdef double next_due_us(self):
        """When the earliest committed batch finishes (INF: none)."""
        return self._top(self._heap, &self._n)

    cpdef double next_wake_us(self):
        """By when the loop must run :meth:`run_due` so that nothing that follows from a
        finish is late (INF: nothing committed): the earliest of the last stages' finishes
        and, for a batch that goes on to another stage of this pool, its finish plus the
        pool's shortest hold (the next stage cannot finish sooner).  The loop wakes up then
        when no scheduler waits for a finish (nothing queued); it runs what is due whenever
        it wakes up anyway."""
        return self._top(self._heap2, &self._n2)

    cdef double _top(self, Entry* heap, Py_ssize_t* n) noexcept:
        """The time of the first entry of ``heap`` whose batch is still committed, those
        before it dropped (finished, taken back, or their worker stopped); INF: none."""
        cdef PooledWorker w
        cdef object o
        while n[0]:
            o = self._workers[heap[0].w]
            if o is not None:
                w = <PooledWorker>o
                if heap[0].tok == w._token and w._run is not None:
                    return heap[0].t
            _heap_pop(heap, n)
        return INF

    cpdef int drain(self, double now) except -1:
        """:meth:`run_due` at ``now``; then, while the next finish has come due meanwhile
        (the clock read again), that too: the loop's rule for its own timers.  Returns how
        many ran."""
        cdef int total = 0, n
        cdef double nxt
        while True:
            n = self.run_due(now)
            total += n
            if n == 0:
                return total
            nxt = self.next_due_us()
            if nxt == INF:
                return total
            now = self.now()
            if nxt > now:
                return total

    cpdef int run_due(self, double now) except -1:
        """Finish every committed batch due by ``now``, in time order (those the finishes
        commit in turn included, when due); returns how many."""
        cdef int count = 0
        cdef PooledWorker w
        while self.next_due_us() <= now:
            w = <PooledWorker>self._workers[self._heap[0].w]
            self._pop()
            count += 1
            w._finish()
        return count

    # ---- internals ----------------------------------------------------------------------

    cdef long long _new_token(self) noexcept:
        """A token no worker of the pool had before: a heap entry of a worker let go of
        can never match the worker that takes its place."""
        self._tokens += 1
        return self._tokens

    cdef int _release(self, PooledWorker w) except -1:
        """Let go of a stopped worker that has no batch: its place is reused by the next
        :meth:`add` (a re-plan retires and adds workers; the pool does not grow with them),
        its heap entries are dropped when they come up, its id and hold no longer count."""
        if w.idx < 0 or self._workers[w.idx] is not w:
            return 0
        self._workers[w.idx] = None
        self._free.append(w.idx)
        w.idx = -1
        cdef PooledWorker x
        self._wids = set()
        self._min_hold = 0.0
        for o in self._workers:
            if o is not None:
                x = <PooledWorker>o
                if not self._wids or x._shortest < self._min_hold:
                    self._min_hold = x._shortest
                self._wids.add(x.info.worker_id)
        return 0

    cdef bint _on_loop_thread(self) except -1:
        """``timers.on_loop_thread()``; the runtime loop's ``thread_id`` read instead where it
        has one (no Python call)."""
        tid = getattr(self.timers, "thread_id", _NO_ID)
        if tid is _NO_ID:
            return self.timers.on_loop_thread()
        return tid is not None and PyThread_get_thread_ident() == <unsigned long>tid

    cdef int _report(self, job, double start_us, double finish_us) except -1:
        """``sink.stage_finished(job, start_us, finish_us)``, unless the fast finish took it."""
        if self._fast is not None:
            d = job.dispatch
            if self._fast(d.model, d.batch_id, d.route[job.stage].stage, finish_us,
                          self.now()):
                return 0
        self.sink.stage_finished(job, start_us, finish_us)
        return 0

    cdef int _send(self, nxt, double now_us) except -1:
        """``transport.send(route worker, nxt, now_us)``; to a worker of this pool through
        the in-process transport, done here with the transport's rules."""
        d = nxt.dispatch
        cdef int stage = nxt.stage
        res = d.route[stage]
        wid = res.worker_id
        cdef double nb, arrive
        if self._inproc:
            deliver = self.transport.receiver(wid)
            if type(deliver) is PooledWorker and (<PooledWorker>deliver).pool is self:
                nxt.sent_us = now_us
                if self._emulate_links and stage > 0:
                    nb = nxt.not_before_us
                    arrive = now_us + (<double>res.transfer_finish_us
                                       - <double>res.transfer_start_us)
                    nxt.not_before_us = arrive if arrive > nb else nb
                return (<PooledWorker>deliver)._submit(nxt)
        self.transport.send(wid, nxt, now_us)
        return 0

    cdef int _push(self, double t, double latest, int w, long long tok) except -1:
        cdef Entry e
        e.seq = self._seq
        e.w = w
        e.tok = tok
        self._seq += 1
        e.t = t
        _heap_push(&self._heap, &self._n, &self._cap, e)
        e.t = latest
        _heap_push(&self._heap2, &self._n2, &self._cap2, e)
        return 0

    cdef void _pop(self) noexcept:
        _heap_pop(self._heap, &self._n)


cdef int _heap_push(Entry** hp, Py_ssize_t* n, Py_ssize_t* cap, Entry e) except -1:
    """Push ``e`` on the binary heap ``hp[0]`` of ``n[0]`` entries (grown as needed)."""
    cdef Py_ssize_t i, parent
    cdef Entry* grown
    cdef Entry* heap = hp[0]
    if n[0] == cap[0]:
        grown = <Entry*>PyMem_Realloc(heap, 2 * cap[0] * sizeof(Entry))
        if grown == NULL:
            raise MemoryError()
        hp[0] = heap = grown
        cap[0] *= 2
    i = n[0]
    n[0] += 1
    while i > 0:
        parent = (i - 1) >> 1
        if _less(&e, &heap[parent]):
            heap[i] = heap[parent]
            i = parent
        else:
            break
    heap[i] = e
    return 0


cdef void _heap_pop(Entry* heap, Py_ssize_t* np) noexcept:
    """Remove the top of a binary heap of ``np[0]`` entries."""
    cdef Py_ssize_t i = 0, c, n
    np[0] -= 1
    n = np[0]
    if n == 0:
        return
    cdef Entry last = heap[n]
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and _less(&heap[c + 1], &heap[c]):
            c += 1
        if _less(&heap[c], &last):
            heap[i] = heap[c]
            i = c
        else:
            break
    heap[i] = last


cdef inline bint _less(Entry* a, Entry* b) noexcept:
    return a.t < b.t or (a.t == b.t and a.seq < b.seq)
