"""The stage worker as a Ray actor: the same :class:`StageWorker`, hosted in a Ray process.

:class:`StageActor` is a plain class; :func:`stage_actor_class` wraps it with ``ray.remote``
(threaded, so that many ``submit`` calls, health pings and hop probes run side by side).
Inside the actor a :class:`StageWorker` runs batches exactly as it does in one process; only
its transport and its sink differ:

* :class:`PeerTransport` forwards a finished stage's outputs to the reserved next-stage
  worker with a direct actor call (``peer.submit.remote(job)``); Ray moves arguments above
  its inline limit (100 KiB) through the object store, node to node, never through the API
  process.
* :class:`_ReportSink` turns the worker's callbacks into a :class:`StageReport`, the return
  value of the ``submit`` call that brought the job.  The report of a non-final stage carries
  the ``ObjectRef`` of the next stage's ``submit`` call, so the API process follows a batch
  down its route by awaiting one small report per stage.

Times are microseconds on the API process's clock: the actor subtracts ``clock_offset_us``
(zero on the API process's node, where the monotonic clock is shared).
"""

from __future__ import annotations

import logging
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ppipe_trt.serving.clock import monotonic_us
from ppipe_trt.serving.handle import WorkerStats
from ppipe_trt.serving.specs import WorkerSpec, build_worker
from ppipe_trt.serving.transport import StageJob, Transport

log = logging.getLogger("ppipe.serving.ray")


@dataclass(slots=True)
class StageReport:
    """What one stage's ``submit`` call returns (small: no activations unless final).

    ``next_ref``: the ``ObjectRef`` of the next stage's report (non-final stage, forwarded);
    ``outputs``: the model's outputs (final stage; owned by the receiver); ``error``: the
    stage failed (message), the batch goes no further.  Times: API clock, microseconds.
    """

    batch_id: int
    stage: int
    worker_id: int
    start_us: float = 0.0
    finish_us: float = 0.0
    next_ref: Any = None
    outputs: dict[str, np.ndarray] | None = None
    error: str | None = None


@dataclass(slots=True)
class _Waiter:
    report: StageReport
    done: threading.Event = field(default_factory=threading.Event)


class _ReportSink:
    """The worker's sink inside the actor: fills the report each ``submit`` call waits on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[tuple[int, int], _Waiter] = {}

    def expect(self, job: StageJob, worker_id: int) -> _Waiter:
        waiter = _Waiter(StageReport(job.dispatch.batch_id, job.stage, worker_id))
        with self._lock:
            self._waiting[(job.dispatch.batch_id, job.stage)] = waiter
        return waiter

    def _get(self, batch_id: int, stage: int) -> _Waiter | None:
        with self._lock:
            return self._waiting.get((batch_id, stage))

    def _finish(self, batch_id: int, stage: int) -> None:
        with self._lock:
            waiter = self._waiting.pop((batch_id, stage), None)
        if waiter is not None:
            waiter.done.set()

    def attach_next(self, batch_id: int, stage: int, ref: Any = None, error: str | None = None):
        waiter = self._get(batch_id, stage)
        if waiter is not None:
            waiter.report.next_ref = ref
            if error:
                waiter.report.error = error

    # -- WorkerSink ---------------------------------------------------------------------------
    def stage_finished(self, job: StageJob, start_us: float, finish_us: float) -> None:
        waiter = self._get(job.dispatch.batch_id, job.stage)
        if waiter is not None:
            waiter.report.start_us, waiter.report.finish_us = start_us, finish_us
        self._finish(job.dispatch.batch_id, job.stage)

    def batch_completed(self, job: StageJob, outputs: dict[str, np.ndarray],
                        finish_us: float) -> None:
        waiter = self._get(job.dispatch.batch_id, job.stage)
        if waiter is not None:
            waiter.report.outputs = outputs

    def batch_failed(self, job: StageJob, error: BaseException, now_us: float) -> None:
        waiter = self._get(job.dispatch.batch_id, job.stage)
        if waiter is not None:
            waiter.report.error = f"{type(error).__name__}: {error}"
            waiter.report.finish_us = now_us
        self._finish(job.dispatch.batch_id, job.stage)

    def fail_all(self, why: str) -> None:
        with self._lock:
            waiting, self._waiting = list(self._waiting.values()), {}
        for w in waiting:
            w.report.error = why
            w.done.set()


class PeerTransport(Transport):
    """Forwards jobs to peer actors by worker id (inside an actor).  Never raises on send:
    a failure is written into the sending stage's report, so the API process hears of it."""

    def __init__(self, sink: _ReportSink, emulate_links: bool):
        self._sink = sink
        self.emulate_links = emulate_links
        self.peers: dict[int, Any] = {}

    def register(self, worker_id: int, deliver) -> None:
        """The local worker registers itself; it is reached through its own actor handle."""

    def send(self, worker_id: int, job: StageJob, now_us: float) -> None:
        job.sent_us = now_us
        if self.emulate_links and job.stage > 0:
            res = job.reservation
            job.not_before_us = max(job.not_before_us,
                                    now_us + (res.transfer_finish_us - res.transfer_start_us))
        peer = self.peers.get(worker_id)
        if peer is None:
            self._sink.attach_next(job.dispatch.batch_id, job.stage - 1,
                                   error=f"no peer actor for worker {worker_id}; have "
                                         f"{sorted(self.peers)}")
            return
        self._sink.attach_next(job.dispatch.batch_id, job.stage - 1, peer.submit.remote(job))


class StageActor:
    """One stage worker in a Ray actor, built from its :class:`~ppipe_trt.serving.specs.
    WorkerSpec` exactly as the local assembly builds it (:func:`~ppipe_trt.serving.specs.
    build_worker`); only its transport and sink are the actor's.  Methods are called through
    the actor handle."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self._offset_us = 0.0
        self._crash_armed = False
        self._hang_s = 0.0
        self._sink = _ReportSink()
        self._transport = PeerTransport(self._sink, spec.emulate_links)
        # the stage's ONNX bytes (when sent) are written here: no shared file system needed
        self._tmp = tempfile.TemporaryDirectory(prefix=f"ppipe-w{spec.worker_id}-")
        self._worker = build_worker(spec, self._transport, self._sink, clock=self._now,
                                    scratch_dir=Path(self._tmp.name))
        self._worker.start()

    def _now(self) -> float:
        return monotonic_us() - self._offset_us

    # ---- set-up ---------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Node id, pid and the worker's mode (called once after creation)."""
        import os

        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "mode": self._worker.mode + " [ray actor]"}

    def local_clock_us(self) -> float:
        return monotonic_us()

    def set_clock_offset(self, offset_us: float) -> None:
        self._offset_us = float(offset_us)

    def set_peers(self, peers: dict[int, Any]) -> None:
        """Actor handles of the workers this one may forward to (replaced as a whole)."""
        self._transport.peers = dict(peers)

    # ---- data path ------------------------------------------------------------------------
    def submit(self, job: StageJob) -> StageReport:
        """Run ``job`` on this worker (in reserved-start order) and return its report once
        the stage has finished and its outputs are on their way to the next stage."""
        if self._crash_armed:
            import os

            os._exit(1)
        if self._hang_s:
            import time

            time.sleep(self._hang_s)
        waiter = self._sink.expect(job, self.spec.worker_id)
        try:
            self._worker.submit(job)
        except Exception as exc:  # the worker is stopping
            self._sink.batch_failed(job, exc, self._now())
        waiter.done.wait()
        return waiter.report

    # ---- health and measurement -----------------------------------------------------------
    def ping(self) -> WorkerStats:
        """The worker's counters; answering at all is the health signal."""
        if self._hang_s:
            import time

            time.sleep(self._hang_s)
        return self._worker.stats()

    def echo_delay_us(self, sent_us: float) -> float:
        """One-way delay of the call that brought ``sent_us`` (API clock)."""
        return self._now() - sent_us

    def probe_hop_us(self, peer_id: int, samples: int = 40) -> list[float]:
        """One-way delays of ``samples`` actor calls from this worker to ``peer_id``."""
        import ray

        peer = self._transport.peers[peer_id]
        return [ray.get(peer.echo_delay_us.remote(self._now())) for _ in range(samples)]

    # ---- fault injection (tests, chaos drills) -----------------------------------------------
    def inject_crash(self) -> None:
        """The actor's process exits as soon as the next batch reaches it (a node lost with
        work in hand)."""
        self._crash_armed = True

    def inject_hang(self, seconds: float) -> None:
        """From now on every call (health pings included) stalls ``seconds`` before it is
        served (a worker that stops answering)."""
        self._hang_s = float(seconds)

    def stop(self) -> None:
        self._worker.stop()
        self._sink.fail_all(f"worker {self.spec.worker_id} stopped")


def stage_actor_class(max_concurrency: int = 256):
    """``ray.remote`` version of :class:`StageActor` (Ray imported here, lazily)."""
    import ray

    return ray.remote(max_concurrency=max_concurrency)(StageActor)
