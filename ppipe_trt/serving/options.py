"""Knobs of the live runtime, its loop and its workers (one record for both assemblies)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ppipe_trt.engines.gpu import CPU_WORKER_THREADS
from ppipe_trt.scheduler.calibration import CalibrationOptions
from ppipe_trt.serving.admission import AdmissionOptions
from ppipe_trt.serving.recalibrate import ReplanOptions


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """Knobs of the live runtime.

    Scheduling:

    * ``policy``: the scheduler policy; ``scheduler_kwargs``: its options.
    * ``hop_overhead_us``: per-hop hand-off cost given to the scheduler (``None``: measured at
      start-up).
    * ``deadline_margin_us`` (+ ``deadline_margin_fraction`` of the SLO when a model runs real
      compute, whose latency varies around its profile): the scheduler plans each request
      against its deadline minus this (dispatch and answer costs it does not see).  The 30 %
      default was measured on a 2-core host that also runs the load generator
      (docs/benchmarks/vs_rayserve.md): at 10 % stalls of a few ms already made answers late.
    * ``wake_lead_us``: wake the scheduler this much before the last moment (the loop may
      oversleep on a busy host).

    * ``calibrate``: measure what every worker of a model with real compute takes per batch
      size and plan with that instead of the offline profile
      (:mod:`ppipe_trt.scheduler.calibration`; ``calibration`` its knobs).  Emulated and
      timing-only workers take exactly their profile and are not calibrated.
      ``replan_on_calibration``: when a calibrated model's measured capacity falls short of
      the planned one, re-plan from the measured latencies and swap the plan in
      (:mod:`ppipe_trt.serving.recalibrate`; ``None``, the default: never;
      ``ppipe serve --replan-on-calibration``).

    * ``admission``: refuse requests at the door when the front end's event loop falls
      behind (:mod:`ppipe_trt.serving.admission`; ``None``: never).  Only a runtime whose
      front end calls ``watch_front_end`` (``ppipe serve``'s) is controlled.

    Workers:

    * ``emulate_links``: delay hand-offs between servers by the reserved link time.
    * ``intra_op_threads``: ONNX Runtime threads per CPU worker (1: idle ONNX Runtime pool
      threads spin, which starves the front end on a small host; ``None`` for ONNX Runtime's
      default).  CPU blocks are profiled with ``CPU_WORKER_THREADS`` (1), the default here:
      another value makes the workers slower or faster than the plan's latency tables.
    * ``cpu_worker_nice``: a CPU worker's thread runs this much nicer than its process
      (Linux niceness; 0: as the process).  Past capacity the cores then go to reading,
      refusing and answering requests first and the workers take what is left (their
      measured latency grows, and calibration plans with it), instead of the front end
      falling behind while every worker stays busy.  Measured on this 2-core host beside the
      load generator at 2 x capacity (docs/benchmarks/vs_triton.md): goodput 57 req/s at
      0, 177 at 10.
    * ``cut_dtype``: e.g. ``"float16"`` to halve activations at cuts (default: the plan's
      ``params["cut_dtype"]``, else ``float16`` for models whose engines were built with
      ``fp16_cuts``).

    Faults of local workers (:mod:`ppipe_trt.serving.faults`; a Ray actor's health is the
    Ray runtime's health monitor's):

    * ``stage_timeout_factor`` / ``stage_timeout_min_s``: a batch that runs longer than
      ``max(stage_timeout_min_s, stage_timeout_factor x`` the latency its stage reserved for
      it (the profiled latency of that batch size on that worker)``)`` is failed (its
      requests get a :class:`~ppipe_trt.serving.faults.StageTimeoutError` naming the worker,
      the stage and the limit) and its worker is quarantined at once; ``None`` turns the
      watchdog off.  The factor leaves room for a real latency well above its profile (a
      busy host); the floor for the watchdog's period and a host's stalls.
    * ``quarantine_after_errors``: a worker whose executor raised on this many batches in a
      row is quarantined (0: never).  One error fails one batch only (it may be the batch's
      fault); an input the executor rejects (``BadInputError``) is not counted.
    * ``check_stage_outputs``: after each batch, check that every declared output is there
      with the batch's rows, the declared static dims and dtype; a mismatch fails the batch
      (:class:`~ppipe_trt.serving.faults.BadStageOutputError`, naming the tensor, expected and
      got) and quarantines the worker at once.

    A quarantined worker stays out of its pool until the server restarts.

    The process and the loop:

    * ``max_pending``: requests waiting or running at once, beyond which new ones are rejected
      at once with reason ``queue_full``.
    * ``switch_interval_s``: Python's thread switch interval while the runtime runs
      (process-wide; ``None`` leaves Python's 5 ms).  A thread that a reservation waits for (a
      worker whose batch starts now, the loop at its wake-up) waits for the GIL up to this
      long behind a thread running Python; measured on a 2-core host under a 3x overload
      burst, 0.5 ms cut the median lag of a reserved start from ~2-4 ms to ~0.6-2 ms
      (docs/serving.md).
    * ``freeze_gc``: at start, collect once and freeze what is alive (:func:`gc.freeze`).  A
      full collection over the objects loaded by then (models, FastAPI, numpy; with Ray's
      driver: 70-113 ms gen-2 pauses measured under load) pauses every thread for tens of
      milliseconds, which a reservation made to the millisecond cannot absorb; frozen objects
      keep later collections small.
    * ``loop_yield_s`` / ``loop_yield_min_drops``: when one decision pass dispatches and drops
      more than ``loop_yield_min_drops`` requests (an overload burst), the loop sleeps
      ``loop_yield_s`` between the two, so that the workers just dispatched to take the GIL
      and start before it spends milliseconds answering the drops.
    * ``stop_timeout_s``: how long :meth:`~ppipe_trt.serving.runtime.ServingRuntime.stop`
      waits for the loop to drain and end.
    """

    policy: str = "reservation"
    hop_overhead_us: float | None = None
    deadline_margin_us: float = 1000.0
    deadline_margin_fraction: float = 0.3
    wake_lead_us: float = 1000.0
    emulate_links: bool = True
    intra_op_threads: int | None = CPU_WORKER_THREADS
    cpu_worker_nice: int = 10
    cut_dtype: str | None = None
    max_pending: int = 10_000
    switch_interval_s: float | None = 0.0005
    scheduler_kwargs: Mapping[str, Any] | None = None
    calibrate: bool = True
    calibration: CalibrationOptions = CalibrationOptions()
    admission: AdmissionOptions | None = AdmissionOptions()
    replan_on_calibration: ReplanOptions | None = None
    freeze_gc: bool = True
    loop_yield_s: float = 50e-6
    loop_yield_min_drops: int = 8
    stop_timeout_s: float = 10.0
    stage_timeout_factor: float | None = 10.0
    stage_timeout_min_s: float = 1.0
    quarantine_after_errors: int = 3
    check_stage_outputs: bool = True
