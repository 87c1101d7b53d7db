"""Offline engines: graph analysis, pre-partitioning, sub-graphs, backends, profiles.

Public API::

    build_model_engines(model, gpu_class=None, *, store_root="engines", num_blocks=10,
                        backend="auto", max_batch=8, progress=True, profile=True) -> BuiltModel
    open_built_model(model_name, gpu_class, store_root="engines") -> BuiltModel
    BUILTIN_MODELS

Importing this package does not import onnx, onnxruntime, torch, tensorrt or cuda.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ppipe_trt.models import BUILTIN_MODELS

if TYPE_CHECKING:  # pragma: no cover
    from ppipe_trt.engines.build import build_model_engines
    from ppipe_trt.engines.store import BuiltModel, open_built_model

_LAZY = {"build_model_engines": "ppipe_trt.engines.build",
         "BuiltModel": "ppipe_trt.engines.store",
         "open_built_model": "ppipe_trt.engines.store"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ppipe_trt.engines' has no attribute {name!r}")


__all__ = ["build_model_engines", "BuiltModel", "open_built_model", "BUILTIN_MODELS"]
