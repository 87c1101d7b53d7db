"""What the front end serves for each model of a plan (both assemblies use it).

A model with built engines serves its real inputs and outputs (the outputs its repository
configuration declares, when it declares some); a model known only from profiles is served
*timing-only*: one dummy input and output, no compute.
"""

from __future__ import annotations

from typing import Any, Mapping

from ppipe_trt.engines.backends.base import TensorSpec
from ppipe_trt.errors import ConfigError
from ppipe_trt.plan import Plan
from ppipe_trt.profiles.types import ProfileSet
from ppipe_trt.repository.types import ModelEntry, Postprocess
from ppipe_trt.serving.local import SLO_RAISED_PARAM
from ppipe_trt.serving.types import ServedModel

#: I/O of a timing-only model (it has no engine, so no real tensors): one dummy element.
TIMING_ONLY_INPUTS = (TensorSpec("INPUT__0", "float32", (-1, 1)),)
TIMING_ONLY_OUTPUTS = (TensorSpec("OUTPUT__0", "float32", (-1, 1)),)


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
    # the models served above the SLO they asked for (see local_plan)
    raised = (plan.params or {}).get(SLO_RAISED_PARAM) or {}
    for mp in plan.models:
        r = raised.get(mp.model)
        slo = ({"configured_slo_us": r["asked_slo_ms"] * 1000.0, "slo_raised_reason": r["reason"]}
               if r else {})
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
                postprocess=entry.postprocess if entry is not None else Postprocess(),
                # the configuration's max_batch_size, within what the engines were built for
                config_max_batch=(min(entry.max_batch, built.max_batch)
                                  if entry is not None and entry.max_batch > 0 else None),
                **slo)
        else:
            if mp.model not in profiles:
                raise ConfigError(f"model {mp.model!r} has neither built engines nor profiles; "
                                  "build it (ppipe engines build) or pass --profiles")
            models[mp.model] = ServedModel(
                mp.model, TIMING_ONLY_INPUTS, TIMING_ONLY_OUTPUTS, mp.slo_ms * 1000.0,
                max_batch, "timing-only, emulated (profiles only, no engines)" + mode_suffix,
                emulated=True, timing_only=True, **slo)
    return models
