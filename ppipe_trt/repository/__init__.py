"""Model repositories in Triton's layout: ``<repo>/<name>/config.pbtxt`` (or ``config.yaml``)
and ``<repo>/<name>/<version>/model.onnx``.

Public API::

    load_repository(root) -> dict[str, ModelEntry]
    load_model_entry(model_dir) -> ModelEntry
    EXAMPLE_REPOSITORY            the built-in demo models as a repository (source checkout)
"""

from __future__ import annotations

from pathlib import Path

from ppipe_trt.repository.config import load_model_entry, load_repository
from ppipe_trt.repository.types import ImageSpec, ModelEntry, Postprocess, TensorConfig

#: The project's example repository: the built-in demo models (their ONNX files are exported
#: into it on first use).  ``make serve`` serves it.
EXAMPLE_REPOSITORY = Path(__file__).resolve().parents[2] / "examples" / "model_repository"

__all__ = ["load_repository", "load_model_entry", "ModelEntry", "ImageSpec", "Postprocess",
           "TensorConfig", "EXAMPLE_REPOSITORY"]
