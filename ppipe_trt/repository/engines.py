"""Building a repository's models into the engine store, and finding their configs again.

``build_entry`` builds (or reuses) one model's blocks, engines and profile for a GPU class and
keeps a copy of the model's resolved configuration beside its builds
(``<store>/<class>/<model>/model_config.json``), so that ``ppipe serve --model NAME`` serves a
stored model with its preprocessing and postprocessing even without the repository.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from typing import Any

from ppipe_trt.errors import ConfigError, ProfileFormatError
from ppipe_trt.repository.types import ModelEntry

CONFIG_COPY = "model_config.json"


def rebuild_command(entry: ModelEntry, gpu_class: str, store_root: Path | str) -> str:
    repo = entry.config_path.parent.parent
    cmd = (f"ppipe engines build --model-repository {shlex.quote(str(repo))} --model "
           f"{shlex.quote(entry.name)} --gpu-class {gpu_class}")
    return cmd if Path(store_root) == Path("engines") else f"{cmd} --store {store_root}"


def build_entry(entry: ModelEntry, gpu_class: str, store_root: Path | str = "engines",
                **build_kwargs: Any):
    """Build or reuse ``entry``'s engines for ``gpu_class``; returns the BuiltModel.

    The build's maximum batch is the config's; ``build_kwargs`` go to
    :func:`ppipe_trt.engines.build_model_engines` (blocks, backend, progress, ...).  Raises
    :class:`ConfigError` when a declared output's dims differ from the built model's.
    """
    from ppipe_trt.engines import build_model_engines
    from ppipe_trt.engines.store import model_dir, write_json

    built = build_model_engines(entry.onnx_path, gpu_class, store_root=store_root,
                                max_batch=entry.max_batch, name=entry.name,
                                rebuild_command=rebuild_command(entry, gpu_class, store_root),
                                **build_kwargs)
    actual = {s.name: tuple(s.shape[1:]) for s in built.outputs}
    outputs = []
    for t in entry.outputs:
        dims = actual.get(t.name, t.dims)
        if len(dims) != len(t.dims) or any(d not in (-1, a) for d, a in zip(t.dims, dims)):
            raise ConfigError(f"{entry.config_path}: output {t.name!r} has dims {list(t.dims)} "
                              f"but {entry.onnx_path} computes {list(dims)} (per sample, "
                              "batch excluded)")
        outputs.append(dataclasses.replace(t, dims=tuple(dims)))
    entry = dataclasses.replace(entry, outputs=tuple(outputs))  # symbolic dims made concrete
    write_json(model_dir(store_root, gpu_class, entry.name) / CONFIG_COPY, entry.to_json())
    return built


def stored_entry(store_root: Path | str, gpu_class: str, model: str) -> ModelEntry | None:
    """The configuration kept with ``model``'s builds for ``gpu_class``, or None when it was
    built from a bare ONNX file (then it serves raw tensors only)."""
    from ppipe_trt.engines.store import model_dir

    path = model_dir(store_root, gpu_class, model) / CONFIG_COPY
    if not path.exists():
        return None
    try:
        return ModelEntry.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ProfileFormatError(f"{path}: unreadable model configuration ({exc}); rebuild "
                                 f"the model from its repository") from None


__all__ = ["build_entry", "stored_entry", "rebuild_command", "CONFIG_COPY"]
