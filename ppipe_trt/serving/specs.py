"""What each worker of a plan runs: one :class:`WorkerSpec` per placement slot.

Both assemblies decide a worker's make-up here and nowhere else:

* a model with built engines (``built_models``) runs its block range's real sub-graph:
  TensorRT on the worker's GPU when the engines were built with TensorRT for the worker's
  own class, else ONNX Runtime on the host's CPU; when the worker's GPU class is not the
  class the engines were built for (e.g. the plan puts it on a T4 while this host is a CPU),
  the worker also *emulates* its class from the profiles (it holds each batch until the
  profiled latency has elapsed);
* a model known only from profiles runs *timing-only*: no compute, each batch is released
  after the profiled latency of the worker's class, block range, batch and MPS share.

The local assembly turns each spec into a :class:`~ppipe_trt.serving.worker.StageWorker` with
:func:`build_worker`; the Ray assembly sends the spec to a Ray actor, which calls the same
function in its own process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ppipe_trt.errors import ConfigError
from ppipe_trt.plan import Plan
from ppipe_trt.profiles.types import ProfileSet
from ppipe_trt.scheduler.placement import Placement, WorkerSlot
from ppipe_trt.serving.clock import monotonic_us
from ppipe_trt.serving.emulation import EmulatedTiming
from ppipe_trt.serving.executors import BackendExecutor, StageExecutor
from ppipe_trt.serving.faults import FaultPolicy, StageWatchdog
from ppipe_trt.serving.options import RuntimeOptions
from ppipe_trt.serving.transport import Transport
from ppipe_trt.serving.worker import StageWorker, WorkerSink


@dataclass(frozen=True, slots=True)
class ExecutorSpec:
    """How a worker opens the engine of its block range.

    ``backend``: ``"tensorrt"`` (on ``device`` ``"cuda:<gpu_index>"``) or ``"onnxruntime"``
    (``device`` ``"cpu"``).  ``build_dir``: the built model's store folder (a string: it
    travels to other processes as it is).  ``max_batch``: the batch the engine's buffers are
    allocated for (the built model's).  ``intra_op_threads``: ONNX Runtime threads.
    ``stage_onnx``: the block range's sub-graph as bytes, for a process that cannot read the
    store (a Ray actor on another node); ``None``: read from the store.
    """

    backend: str
    device: str
    build_dir: str
    max_batch: int
    intra_op_threads: int | None = 1
    stage_onnx: bytes | None = None


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything needed to build one stage worker, in this process or another.

    ``slot``: where it sits (plan and cluster).  ``executor``: its engine, ``None`` for a
    timing-only worker.  ``emulation``: the profiled timing it holds batches to, ``None``
    when it runs on its own class.  ``warm_up_batch``: the largest batch of the model's
    pipelines (the engine runs zeros at batch 1 and this once before serving).  ``cut_dtype``:
    the dtype of float activations it forwards (``None``: as computed).  ``emulate_links``:
    whether its hand-offs pay the reserved link time (a Ray actor's own transport reads it;
    in-process workers share the runtime's transport, built with the same option).
    ``nice``: how much lower than its process's the worker thread's CPU priority is (a real
    CPU worker's: ``RuntimeOptions.cpu_worker_nice``; 0 elsewhere).
    """

    slot: WorkerSlot
    executor: ExecutorSpec | None
    emulation: EmulatedTiming | None
    warm_up_batch: int
    cut_dtype: str | None = None
    emulate_links: bool = True
    nice: int = 0

    @property
    def worker_id(self) -> int:
        return self.slot.worker_id


def worker_specs(plan: Plan, profiles: ProfileSet, built_models: Mapping[str, Any],
                 options: RuntimeOptions, placement: Placement,
                 only: Iterable[int] | None = None) -> tuple[WorkerSpec, ...]:
    """One spec per worker of ``placement`` (placement order), or of the workers ``only``
    names (a plan swap's added workers).

    ``built_models``: :class:`~ppipe_trt.engines.BuiltModel` by model for models with engines;
    the others must be in ``profiles``.  Raises :class:`ConfigError` when a worker has to
    emulate a class the profiles lack.
    """
    plan_cut_dtype = options.cut_dtype or plan.params.get("cut_dtype") or None
    specs = []
    wanted = None if only is None else set(only)
    for slot in placement.workers:
        if wanted is not None and slot.worker_id not in wanted:
            continue
        mp = plan.model(slot.model)
        built = built_models.get(slot.model)
        executor = emulation = None
        if built is not None:
            executor = _executor_spec(built, slot, options)
            if slot.gpu_class != built.gpu_class:
                emulation = emulated_timing(profiles, slot)
        else:
            emulation = emulated_timing(profiles, slot)
        cut_dtype = plan_cut_dtype
        if cut_dtype is None and built is not None and \
                built.manifest.get("partition", {}).get("fp16_cuts"):
            cut_dtype = "float16"  # its profile counts cut bytes as fp16: send them so
        nice = (options.cpu_worker_nice if executor is not None and emulation is None
                and executor.device == "cpu" else 0)
        specs.append(WorkerSpec(slot, executor, emulation,
                                max(p.batch_size for p in mp.pipelines), cut_dtype,
                                options.emulate_links, nice))
    return tuple(specs)


def _executor_spec(built, slot: WorkerSlot, options: RuntimeOptions) -> ExecutorSpec:
    """TensorRT on the worker's GPU when the engines were built with TensorRT for the
    worker's own class, else ONNX Runtime on the host's CPU."""
    if built.backend == "tensorrt" and slot.gpu_class == built.gpu_class:
        return ExecutorSpec("tensorrt", f"cuda:{slot.gpu_index}", str(built.build_dir),
                            built.max_batch, None)
    return ExecutorSpec("onnxruntime", "cpu", str(built.build_dir), built.max_batch,
                        options.intra_op_threads)


def emulated_timing(profiles: ProfileSet, slot: WorkerSlot) -> EmulatedTiming:
    """The profiled timing of ``slot``'s class, MPS share and block range."""
    if slot.model not in profiles:
        raise ConfigError(f"cannot emulate {slot.gpu_class} for {slot.model!r}: no profiles")
    return EmulatedTiming.from_profile(profiles[slot.model], slot.gpu_class, slot.mps_share,
                                       slot.first_block, slot.last_block)


def open_executor(spec: WorkerSpec, built=None,
                  scratch_dir: Path | None = None) -> BackendExecutor | None:
    """Open and warm up ``spec``'s engine (``None`` for a timing-only worker).

    ``built``: the :class:`~ppipe_trt.engines.BuiltModel` when the caller holds it already
    (else it is read from ``spec.executor.build_dir``); ``scratch_dir``: where
    ``stage_onnx`` bytes are written (required with them).  The caller owns the executor
    (the worker closes it when it stops).
    """
    e = spec.executor
    if e is None:
        return None
    first, last = spec.slot.first_block, spec.slot.last_block
    kw = {} if e.backend == "tensorrt" else {"intra_op_threads": e.intra_op_threads}
    if e.stage_onnx is not None:
        from ppipe_trt.engines.backends.onnxruntime_backend import OnnxRuntimeBackend

        if scratch_dir is None:
            raise ConfigError(f"worker {spec.worker_id}: stage ONNX bytes need a scratch folder")
        path = Path(scratch_dir) / f"blocks_{first}_{last}.onnx"
        path.write_bytes(e.stage_onnx)
        backend = OnnxRuntimeBackend(path, e.device, max_batch=e.max_batch, **kw)
    else:
        if built is None:
            from ppipe_trt.engines.store import BuiltModel

            built = BuiltModel.from_manifest(Path(e.build_dir))
        backend = built.open_backend(first, last, e.backend, e.device, **kw)
    executor = BackendExecutor(backend, label=f"{backend.name} {e.device} blocks {first}..{last}")
    executor.warm_up(spec.warm_up_batch)
    return executor


def build_worker(spec: WorkerSpec, transport: Transport, sink: WorkerSink,
                 clock: Callable[[], float] = monotonic_us, built=None,
                 scratch_dir: Path | None = None, timers=None,
                 faults: FaultPolicy | None = None, watchdog: StageWatchdog | None = None,
                 executor: StageExecutor | None = None):
    """The worker ``spec`` describes (not started): its engine opened and warmed up (see
    :func:`open_executor`), forwarding through ``transport``, reporting to ``sink``.

    ``timers`` (the runtime loop's ``call_at``, local runtime): a timing-only spec becomes a
    thread-less :class:`~ppipe_trt.serving.timed_worker.TimedWorker` driven by them (or its
    compiled form, a worker of the loop's ``ppipe_trt._native.timed.TimedPool``, see
    :mod:`ppipe_trt.scheduler.native`); without
    (e.g. inside a Ray actor) every worker is a :class:`StageWorker` thread.  ``faults`` and
    ``watchdog`` (local runtime): how the worker judges its executor's faults (see
    :mod:`ppipe_trt.serving.faults`).  ``executor``: an executor already opened, used
    instead of ``spec.executor``'s (the worker owns it from then on; tests plug fakes in)."""
    if spec.executor is None and executor is None and timers is not None:
        from ppipe_trt.scheduler.native import native_module

        timed = native_module("timed")
        pool_of = getattr(timers, "timed_pool", None)
        if timed is not None and pool_of is not None:
            # the compiled workers: one pool (one timer heap) per runtime loop
            pool = pool_of(lambda: timed.TimedPool(transport, sink, timers, clock))
            if pool.transport is transport and pool.sink is sink and pool.clock is clock:
                return pool.add(spec.slot, spec.emulation)
        from ppipe_trt.serving.timed_worker import TimedWorker

        return TimedWorker(spec.slot, spec.emulation, transport, sink, timers, clock=clock)
    if executor is None:
        executor = open_executor(spec, built, scratch_dir)
    return StageWorker(spec.slot, executor, spec.emulation, transport, sink, clock=clock,
                       cut_dtype=spec.cut_dtype, faults=faults, watchdog=watchdog,
                       nice=spec.nice)
