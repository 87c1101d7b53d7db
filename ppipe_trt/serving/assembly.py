"""Assemble a :class:`ServingRuntime` from a plan: placement, schedulers, workers, engines.

For each model of the plan, a worker per placement slot:

* a model with built engines (``built_models``) runs its real block-range sub-graph with ONNX
  Runtime on this machine; when the worker's GPU class is not the class the engines were
  built for (e.g. the plan puts it on a T4 while this host is a CPU), and the profiles hold
  that class, the worker also *emulates* it: it holds each batch until the profiled latency
  has elapsed;
* a model known only from profiles runs *timing-only*: no compute, the batch is released
  after the profiled latency of the worker's class, block range, batch and MPS share.

Either way the workers of an emulated cluster are labelled ``emulated``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

from ppipe_trt.engines.backends.base import TensorSpec
from ppipe_trt.errors import ConfigError
from ppipe_trt.plan import Plan
from ppipe_trt.profiles.types import ProfileSet
from ppipe_trt.serving.emulation import EmulatedTiming
from ppipe_trt.serving.executors import BackendExecutor
from ppipe_trt.repository.types import ModelEntry, Postprocess
from ppipe_trt.serving.runtime import ServedModel, ServingRuntime, measure_hop_overhead_us
from ppipe_trt.serving.transport import InProcessTransport
from ppipe_trt.serving.worker import StageWorker, WorkerInfo

log = logging.getLogger("ppipe.serving")

#: I/O of a timing-only model (it has no engine, so no real tensors): one dummy element.
TIMING_ONLY_INPUTS = (TensorSpec("INPUT__0", "float32", (-1, 1)),)
TIMING_ONLY_OUTPUTS = (TensorSpec("OUTPUT__0", "float32", (-1, 1)),)


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """Knobs of the live runtime.

    ``hop_overhead_us``: per-hop hand-off cost given to the scheduler (``None``: measured at
    start-up).  ``deadline_margin_us`` (+ ``deadline_margin_fraction`` of the SLO when a model
    runs real compute, whose latency varies around its profile): the scheduler plans each
    request against its deadline minus this (dispatch and answer costs it does not see).
    The 30 % default was measured on a 2-core host that also runs the load generator
    (docs/benchmarks/vs_rayserve.md): at 10 % stalls of a few ms already made answers late.
    ``wake_lead_us``: wake the scheduler this much before the last moment (the loop may
    oversleep on a busy host).  ``emulate_links``: delay hand-offs between servers by the
    reserved link time.  ``intra_op_threads``: ONNX Runtime threads per CPU worker (1: idle
    ONNX Runtime pool threads spin, which starves the front end on a small host; ``None``
    for ONNX Runtime's default).  ``cut_dtype``: e.g. ``"float16"`` to halve activations at
    cuts (default: the plan's ``params["cut_dtype"]``, else ``float16`` for models whose
    engines were built with ``fp16_cuts``).  ``switch_interval_s``: Python's thread switch
    interval while the runtime runs (process-wide; ``None`` leaves Python's 5 ms): measured
    on a 2-core host under a 3x overload burst, 0.5 ms cut the median lag of a reserved
    start from ~2-4 ms to ~0.6-2 ms (docs/serving.md).
    """

    policy: str = "reservation"
    hop_overhead_us: float | None = None
    deadline_margin_us: float = 1000.0
    deadline_margin_fraction: float = 0.3
    wake_lead_us: float = 1000.0
    emulate_links: bool = True
    intra_op_threads: int | None = 1
    cut_dtype: str | None = None
    max_pending: int = 10_000
    switch_interval_s: float | None = 0.0005
    scheduler_kwargs: Mapping[str, Any] | None = None


def model_entry_for(built) -> ModelEntry | None:
    """The repository configuration of a built model: the copy kept with its builds, else
    (a built-in demo model built by name) the example repository's entry, else None (a model
    built from a bare ONNX file: raw tensors only)."""
    from ppipe_trt.models import BUILTIN_MODELS
    from ppipe_trt.repository import EXAMPLE_REPOSITORY, load_model_entry
    from ppipe_trt.repository.engines import stored_entry

    entry = stored_entry(built.build_dir.parent.parent.parent, built.gpu_class,
                         built.model_name)
    if entry is None and built.model_name in BUILTIN_MODELS and \
            (EXAMPLE_REPOSITORY / built.model_name).is_dir():
        entry = load_model_entry(EXAMPLE_REPOSITORY / built.model_name)
    return entry


def served_models(plan: Plan, profiles: ProfileSet, built_models: Mapping[str, Any],
                  mode_suffix: str = "",
                  entries: Mapping[str, ModelEntry] | None = None) -> dict[str, ServedModel]:
    """What the front end serves for each model of ``plan``: real engines when built here
    (possibly emulating other GPU classes), else timing-only from ``profiles``.
    ``mode_suffix`` is appended to each model's mode label (e.g. ", ray actors").
    ``entries``: repository configurations by model (frames preprocessing, postprocessing,
    served outputs); a built model without one uses :func:`model_entry_for`."""
    models: dict[str, ServedModel] = {}
    entries = dict(entries or {})
    for mp in plan.models:
        max_batch = max(p.batch_size for p in mp.pipelines)
        classes = {s.gpu_class for p in mp.pipelines for s in p.stages}
        built = built_models.get(mp.model)
        if built is not None:
            emulated = any(c != built.gpu_class for c in classes)
            engine = "tensorrt" if built.backend == "tensorrt" else "onnxruntime"
            mode = (f"{engine} {built.gpu_class}" + (", emulated GPU classes" if emulated else "")
                    + mode_suffix)
            entry = entries.get(mp.model) or model_entry_for(built)
            outputs = tuple(built.outputs)
            if entry is not None and entry.outputs:
                declared = {t.name for t in entry.outputs}
                outputs = tuple(s for s in built.outputs if s.name in declared)
            models[mp.model] = ServedModel(
                mp.model, tuple(built.inputs), outputs, mp.slo_ms * 1000.0,
                max_batch, mode, emulated=emulated, timing_only=False,
                image=entry.image if entry is not None else None,
                postprocess=entry.postprocess if entry is not None else Postprocess())
        else:
            if mp.model not in profiles:
                raise ConfigError(f"model {mp.model!r} has neither built engines nor profiles; "
                                  "build it (ppipe engines build) or pass --profiles")
            models[mp.model] = ServedModel(
                mp.model, TIMING_ONLY_INPUTS, TIMING_ONLY_OUTPUTS, mp.slo_ms * 1000.0,
                max_batch, "timing-only, emulated (profiles only, no engines)" + mode_suffix,
                emulated=True, timing_only=True)
    return models


def build_runtime(plan: Plan, profiles: ProfileSet, built_models: Mapping[str, Any] | None = None,
                  options: RuntimeOptions | None = None,
                  info: Mapping[str, Any] | None = None,
                  entries: Mapping[str, ModelEntry] | None = None) -> ServingRuntime:
    """A runtime (not started) serving every model of ``plan``.

    ``built_models`` maps model names to :class:`~ppipe_trt.engines.BuiltModel` for models
    with engines on this machine; the others must be in ``profiles`` and run timing-only.
    """
    from ppipe_trt.scheduler import build_schedulers, place_workers

    options = options or RuntimeOptions()
    built_models = dict(built_models or {})
    hop = options.hop_overhead_us
    if hop is None:
        hop = measure_hop_overhead_us()
    placement = place_workers(plan)
    kwargs = dict(options.scheduler_kwargs or {})
    if options.policy == "reservation":
        kwargs.setdefault("wake_lead_us", options.wake_lead_us)
    schedulers = build_schedulers(plan, profiles, placement, policy=options.policy,
                                  hop_overhead_us=hop, **kwargs)
    cut_dtype = options.cut_dtype or plan.params.get("cut_dtype") or None

    models = served_models(plan, profiles, built_models, entries=entries)

    transport = InProcessTransport(emulate_links=options.emulate_links)
    margin = options.deadline_margin_us
    real = [m.slo_us for m in models.values() if not m.timing_only]
    if real:
        margin += options.deadline_margin_fraction * min(real)
    runtime = ServingRuntime(plan, models, schedulers, transport, hop_overhead_us=hop,
                             deadline_margin_us=margin,
                             max_pending=options.max_pending,
                             switch_interval_s=options.switch_interval_s,
                             info={"policy": options.policy, "transport": "in-process",
                                   "emulate_links": options.emulate_links, **(info or {})})
    for slot in placement.workers:
        stage = plan.model(slot.model).pipelines[slot.pipeline].stages[slot.stage]
        winfo = WorkerInfo(slot.worker_id, slot.model, slot.pipeline, slot.stage,
                           stage.first_block, stage.last_block, slot.gpu_class, slot.mps_share,
                           slot.server_id, slot.gpu_index)
        built = built_models.get(slot.model)
        executor = emulation = None
        if built is not None:
            executor = _executor(built, slot, stage, options)
            executor.warm_up(max(p.batch_size for p in plan.model(slot.model).pipelines))
            if slot.gpu_class != built.gpu_class:
                emulation = _emulation(profiles, slot, stage)
        else:
            emulation = _emulation(profiles, slot, stage)
        model_cut_dtype = cut_dtype
        if model_cut_dtype is None and built is not None and \
                built.manifest.get("partition", {}).get("fp16_cuts"):
            model_cut_dtype = "float16"  # its profile counts cut bytes as fp16: send them so
        runtime.add_worker(StageWorker(winfo, executor, emulation, transport, runtime,
                                       cut_dtype=model_cut_dtype))
    return runtime


def _executor(built, slot, stage, options: RuntimeOptions) -> BackendExecutor:
    """The worker's engine: TensorRT on its GPU when the engines were built with TensorRT for
    the worker's own class, else ONNX Runtime on this host's CPU."""
    first, last = stage.first_block, stage.last_block
    if built.backend == "tensorrt" and slot.gpu_class == built.gpu_class:
        device = f"cuda:{slot.gpu_index}"
        backend = built.open_backend(first, last, "tensorrt", device)
    else:
        device = "cpu"
        backend = built.open_backend(first, last, "onnxruntime", device,
                                     intra_op_threads=options.intra_op_threads)
    return BackendExecutor(backend, label=f"{backend.name} {device} blocks {first}..{last}")


def _emulation(profiles: ProfileSet, slot, stage) -> EmulatedTiming:
    if slot.model not in profiles:
        raise ConfigError(f"cannot emulate {slot.gpu_class} for {slot.model!r}: no profiles")
    return EmulatedTiming.from_profile(profiles[slot.model], slot.gpu_class, slot.mps_share,
                                       stage.first_block, stage.last_block)
