"""The data plane: stage workers and the live runtime that drives the scheduler on the wall clock.

Public API::

    build_runtime(plan, profiles, built_models=None, options=RuntimeOptions(), info=None)
        -> ServingRuntime                      (not started; .start() / .stop() or ``with``)
    ServingRuntime.submit(model, inputs, timeout_us=None) -> Future[InferenceResult]
    worker_specs(plan, profiles, built_models, options, placement) -> tuple[WorkerSpec, ...]
    build_worker(spec, transport, sink) -> StageWorker   (a WorkerHandle; ppipe_trt.serving.specs)
    local_plan / emulated_plan / pipeline_plan  (ppipe_trt.serving.local)
    Transport, InProcessTransport, StageJob     (ppipe_trt.serving.transport)

Importing this package imports nothing heavy; the names above load on first use.
"""

from __future__ import annotations

_LAZY = {
    "build_runtime": "ppipe_trt.serving.assembly",
    "RuntimeOptions": "ppipe_trt.serving.options",
    "ServingRuntime": "ppipe_trt.serving.runtime",
    "ServedModel": "ppipe_trt.serving.types",
    "InferenceResult": "ppipe_trt.serving.types",
    "ImageSpec": "ppipe_trt.serving.types",
    "StageFailedError": "ppipe_trt.serving.types",
    "WorkerHandle": "ppipe_trt.serving.handle",
    "WorkerStats": "ppipe_trt.serving.handle",
    "WorkerSpec": "ppipe_trt.serving.specs",
    "worker_specs": "ppipe_trt.serving.specs",
    "build_worker": "ppipe_trt.serving.specs",
    "StageWorker": "ppipe_trt.serving.worker",
    "WorkerInfo": "ppipe_trt.serving.worker",
    "Transport": "ppipe_trt.serving.transport",
    "InProcessTransport": "ppipe_trt.serving.transport",
    "StageJob": "ppipe_trt.serving.transport",
    "EmulatedTiming": "ppipe_trt.serving.emulation",
    "local_plan": "ppipe_trt.serving.local",
    "emulated_plan": "ppipe_trt.serving.local",
    "pipeline_plan": "ppipe_trt.serving.local",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ppipe_trt.serving' has no attribute {name!r}")


__all__ = sorted(_LAZY)
