"""Check a repository entry's declared tensors against its ONNX model, and fill what the
config leaves out (Triton's "auto-complete": inputs/outputs read from the model)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ppipe_trt.errors import ConfigError
from ppipe_trt.repository.config import NUMPY_TO_TRITON
from ppipe_trt.repository.types import ModelEntry, TensorConfig


def onnx_io(path: Path) -> tuple[tuple[TensorConfig, ...], tuple[TensorConfig, ...]]:
    """(inputs, outputs) of an ONNX file, per-sample dims (dim 0, the batch, dropped; -1 for
    a symbolic dim).  Reads the graph only (external weights are not loaded)."""
    import numpy as np
    import onnx
    from onnx import helper

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends
        raise ConfigError(f"{path}: not a readable ONNX model ({exc})") from None
    inits = {t.name for t in model.graph.initializer}

    def convert(vi) -> TensorConfig:
        tt = vi.type.tensor_type
        dims = tuple(int(d.dim_value) if d.HasField("dim_value") else -1 for d in tt.shape.dim)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
        return TensorConfig(vi.name, dtype, dims[1:])

    ins = tuple(convert(v) for v in model.graph.input if v.name not in inits)
    outs = tuple(convert(v) for v in model.graph.output)
    return ins, outs


def _dims_match(declared: tuple[int, ...], actual: tuple[int, ...]) -> bool:
    return len(declared) == len(actual) and all(
        a == b or a == -1 or b == -1 for a, b in zip(declared, actual))


def _check(kind: str, declared: tuple[TensorConfig, ...], actual: tuple[TensorConfig, ...],
           config: Path, onnx_path: Path) -> tuple[TensorConfig, ...]:
    """The declared tensors with unknown (-1) dims taken from the model; raises naming both
    sides on any mismatch."""
    by_name = {t.name: t for t in actual}
    out = []
    for t in declared:
        a = by_name.get(t.name)
        if a is None:
            raise ConfigError(f"{config}: {kind} {t.name!r} is not an {kind} of {onnx_path} "
                              f"(the model's {kind}s: {sorted(by_name)})")
        if t.dtype != a.dtype:
            raise ConfigError(
                f"{config}: {kind} {t.name!r} has data_type {NUMPY_TO_TRITON.get(t.dtype, t.dtype)}"
                f" but {onnx_path} has {NUMPY_TO_TRITON.get(a.dtype, a.dtype)} ({a.dtype})")
        if not _dims_match(t.dims, a.dims):
            raise ConfigError(f"{config}: {kind} {t.name!r} has dims {list(t.dims)} but "
                              f"{onnx_path} has {list(a.dims)} (per sample, batch excluded)")
        dims = tuple(d if d != -1 else e for d, e in zip(t.dims, a.dims))
        out.append(dataclasses.replace(t, dims=dims))
    return tuple(out)


def resolve_against_onnx(entry: ModelEntry) -> ModelEntry:
    """``entry`` checked against its ONNX file: declared inputs must be exactly the model's
    inputs, declared outputs a subset of its outputs (undeclared ones are not served), with
    equal dtypes and dims; with none declared, the model's own are used."""
    if not entry.onnx_path.is_file():
        raise ConfigError(f"{entry.config_path}: model file {entry.onnx_path} not found")
    ins, outs = onnx_io(entry.onnx_path)
    cfg = entry.config_path
    inputs = _check("input", entry.inputs, ins, cfg, entry.onnx_path) if entry.inputs else ins
    if entry.inputs:
        missing = sorted({t.name for t in ins} - {t.name for t in inputs})
        if missing:
            raise ConfigError(f"{cfg}: {entry.onnx_path} also needs inputs {missing}, which "
                              "the config does not declare")
    outputs = (_check("output", entry.outputs, outs, cfg, entry.onnx_path) if entry.outputs
               else outs)
    for t in inputs:
        if any(d < 0 for d in t.dims):
            raise ConfigError(
                f"{cfg}: tensor {t.name!r} of {entry.onnx_path} has dims {list(t.dims)} per "
                "sample; ppipe-trt needs static dims except the batch (export with a fixed "
                "image size and dynamic_axes only on dim 0)")
    return dataclasses.replace(entry, inputs=inputs, outputs=outputs)


__all__ = ["onnx_io", "resolve_against_onnx"]
