"""TensorRT backend (TensorRT 10/11 Python API), imported lazily.

Builder: one engine per sub-graph for the local GPU class -- an optimization profile over the
batch (1 / opt / max), FP16 or TF32 (or strict FP32), a timing cache file reused across
builds, the serialized ``.plan`` plus a ``.plan.json`` sidecar with the TensorRT version, GPU
name and compute capability, GPU class, source model hash and block range.  Runner: refuses
(EngineMismatchError) an engine built for another GPU class or TensorRT version, allocates
device and pinned host buffers once at the maximum batch, copies only the live batch's bytes,
and runs ``execute_async_v3`` on its own stream.

Tensors that only pass through a stage (graph input == graph output) are stripped before
building -- TensorRT cannot mark a network input as an output -- and copied by the runner.

Without TensorRT every entry point raises ``BackendUnavailableError("TensorRT is not
installed: ...")``; the metadata, shape and pass-through logic are pure functions, tested
without it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ppipe_trt.engines.backends.base import Backend, TensorSpec
from ppipe_trt.errors import (BackendUnavailableError, BadInputError, EngineBuildError,
                              EngineMismatchError)

PLAN_META_FORMAT = "ppipe-trt-plan"
DEFAULT_WORKSPACE_BYTES = 2 << 30


def import_tensorrt():
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError as exc:
        raise BackendUnavailableError(
            f"TensorRT is not installed: {exc}; install it on a GPU machine with "
            "pip install --extra-index-url https://pypi.nvidia.com tensorrt") from None
    return trt


def tensorrt_version() -> str:
    return str(import_tensorrt().__version__)


# ---- pure helpers (tested without TensorRT) --------------------------------------------------
def optimization_profile_shapes(spec: TensorSpec, max_batch: int, opt_batch: int | None = None
                                ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) shapes of one input: batch 1 / ``opt_batch`` (default: half of
    ``max_batch``, rounded up) / ``max_batch``; the other dims must be static."""
    if max_batch < 1:
        raise BadInputError(f"max_batch={max_batch}; expected >= 1")
    opt = opt_batch if opt_batch is not None else max(1, (max_batch + 1) // 2)
    if not 1 <= opt <= max_batch:
        raise BadInputError(f"opt_batch={opt}; expected 1..{max_batch}")
    rest = tuple(spec.shape[1:])
    if any(d < 0 for d in rest):
        raise BadInputError(f"input {spec.name!r} shape {spec.shape}: only the batch dim may be "
                            "dynamic for a TensorRT optimization profile")
    if not spec.shape or spec.shape[0] != -1:
        fixed = tuple(spec.shape)
        return fixed, fixed, fixed
    return (1,) + rest, (opt,) + rest, (max_batch,) + rest


def strip_passthrough_outputs(model) -> tuple[Any, tuple[str, ...]]:
    """A copy of an ONNX model without outputs that are also inputs, and those names."""
    import onnx

    inputs = {i.name for i in model.graph.input}
    passthrough = tuple(o.name for o in model.graph.output if o.name in inputs)
    if not passthrough:
        return model, ()
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    keep = [o for o in copy.graph.output if o.name not in inputs]
    del copy.graph.output[:]
    copy.graph.output.extend(keep)
    return copy, passthrough


def engine_metadata(*, tensorrt_version: str, gpu_class: str, gpu_name: str,
                    compute_capability: str, source_sha256: str, onnx_sha256: str,
                    block_range: tuple[int, int], precision: str, max_batch: int, opt_batch: int,
                    inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                    passthrough: tuple[str, ...]) -> dict[str, Any]:
    return {"format": PLAN_META_FORMAT, "tensorrt_version": tensorrt_version,
            "gpu_class": gpu_class, "gpu_name": gpu_name,
            "compute_capability": compute_capability, "source_sha256": source_sha256,
            "onnx_sha256": onnx_sha256, "block_range": list(block_range),
            "precision": precision, "max_batch": max_batch, "opt_batch": opt_batch,
            "inputs": [[s.name, s.dtype, list(s.shape)] for s in inputs],
            "outputs": [[s.name, s.dtype, list(s.shape)] for s in outputs],
            "passthrough": list(passthrough)}


def check_engine_metadata(meta: Mapping[str, Any], *, gpu_class: str, tensorrt_version: str,
                          onnx_sha256: str | None = None, where: str = "engine") -> None:
    """Raise EngineMismatchError unless the engine was built for this GPU class, this
    TensorRT version (and, when given, from this sub-graph)."""
    if meta.get("format") != PLAN_META_FORMAT:
        raise EngineMismatchError(f"{where}: metadata is not a {PLAN_META_FORMAT} file")
    if meta.get("gpu_class") != gpu_class:
        raise EngineMismatchError(
            f"{where} was built for GPU class {meta.get('gpu_class')!r} "
            f"({meta.get('gpu_name')}, sm {meta.get('compute_capability')}); this GPU is class "
            f"{gpu_class!r}: rebuild with ppipe engines build --gpu-class {gpu_class}")
    if meta.get("tensorrt_version") != tensorrt_version:
        raise EngineMismatchError(
            f"{where} was built with TensorRT {meta.get('tensorrt_version')}; this is TensorRT "
            f"{tensorrt_version}: engines are not portable across versions, rebuild it")
    if onnx_sha256 is not None and meta.get("onnx_sha256") != onnx_sha256:
        raise EngineMismatchError(f"{where} was built from another sub-graph (hash "
                                  f"{str(meta.get('onnx_sha256'))[:12]}); rebuild it")


def _specs(raw) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(n, d, tuple(s)) for n, d, s in raw)


def read_engine_metadata(plan_path: Path | str) -> dict[str, Any]:
    path = Path(str(plan_path) + ".json")
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineMismatchError(f"{path}: engine metadata missing; rebuild the engine") from None


# ---- builder --------------------------------------------------------------------------------
def build_engine(onnx_path: Path | str, plan_path: Path | str, *, gpu_class: str,
                 max_batch: int, source_sha256: str, block_range: tuple[int, int],
                 precision: str = "tf32", opt_batch: int | None = None,
                 timing_cache: Path | str | None = None,
                 workspace_bytes: int = DEFAULT_WORKSPACE_BYTES, device_index: int = 0) -> Path:
    """Compile ``onnx_path`` into a serialized engine at ``plan_path`` (+ ``.json`` metadata)."""
    trt = import_tensorrt()
    import onnx

    from ppipe_trt.engines.backends import cuda
    from ppipe_trt.engines.backends.onnxruntime_backend import read_io_specs
    from ppipe_trt.engines.store import sha256_file

    if precision not in ("tf32", "fp16", "fp32"):
        raise BadInputError(f"precision {precision!r}; expected 'tf32', 'fp16' or 'fp32'")
    cuda.set_device(device_index)
    gpu_name, capability = cuda.device_properties(device_index)
    inputs, outputs = read_io_specs(onnx_path)
    stripped, passthrough = strip_passthrough_outputs(onnx.load(str(onnx_path)))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "stage.onnx"
        onnx.save_model(stripped, str(src))
        if not parser.parse_from_file(str(src)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineBuildError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    else:
        config.set_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for spec in inputs:
        lo, opt, hi = optimization_profile_shapes(spec, max_batch, opt_batch)
        profile.set_shape(spec.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build an engine for {onnx_path} "
                               f"(blocks {block_range[0]}..{block_range[1]})")
    plan_path = Path(plan_path)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_plan = plan_path.with_name(plan_path.name + ".tmp")
    tmp_plan.write_bytes(bytes(memoryview(serialized)))
    tmp_plan.replace(plan_path)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    opt = optimization_profile_shapes(inputs[0], max_batch, opt_batch)[1][0] if inputs else 1
    meta = engine_metadata(tensorrt_version=str(trt.__version__), gpu_class=gpu_class,
                           gpu_name=gpu_name, compute_capability=capability,
                           source_sha256=source_sha256, onnx_sha256=sha256_file(onnx_path),
                           block_range=block_range, precision=precision, max_batch=max_batch,
                           opt_batch=opt, inputs=inputs, outputs=outputs, passthrough=passthrough)
    Path(str(plan_path) + ".json").write_text(json.dumps(meta, indent=1))
    return plan_path


def ensure_engine(onnx_path: Path | str, plan_path: Path | str, *, gpu_class: str,
                  max_batch: int, source_sha256: str, block_range: tuple[int, int],
                  precision: str = "tf32", timing_cache: Path | str | None = None) -> Path:
    """The engine at ``plan_path`` if it is up to date for this sub-graph, GPU class and
    TensorRT version; else build it."""
    version = tensorrt_version()
    from ppipe_trt.engines.store import sha256_file

    plan_path = Path(plan_path)
    if plan_path.exists() and Path(str(plan_path) + ".json").exists():
        meta = read_engine_metadata(plan_path)
        try:
            check_engine_metadata(meta, gpu_class=gpu_class, tensorrt_version=version,
                                  onnx_sha256=sha256_file(onnx_path), where=str(plan_path))
            if meta.get("max_batch") == max_batch and meta.get("precision") == precision:
                return plan_path
        except EngineMismatchError:
            pass  # stale: rebuild below
    return build_engine(onnx_path, plan_path, gpu_class=gpu_class, max_batch=max_batch,
                        source_sha256=source_sha256, block_range=block_range,
                        precision=precision, timing_cache=timing_cache)


# ---- runner ---------------------------------------------------------------------------------
class TensorRTBackend(Backend):
    """Runs one serialized engine.  Returned arrays are fresh copies owned by the caller."""

    name = "tensorrt"

    def __init__(self, plan_path: Path | str, expected_gpu_class: str | None = None,
                 device_index: int = 0):
        super().__init__()
        self.plan_path = Path(plan_path)
        if not self.plan_path.is_file():
            raise BadInputError(f"TensorRT engine {self.plan_path} not found")
        self.meta = read_engine_metadata(self.plan_path)
        self.expected_gpu_class = expected_gpu_class
        self.device_index = device_index
        self.max_batch = int(self.meta["max_batch"])
        self._inputs = _specs(self.meta["inputs"])
        self._outputs = _specs(self.meta["outputs"])
        self._passthrough = set(self.meta.get("passthrough", ()))
        self._resources: list = []

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def _load_impl(self) -> None:
        try:
            self._load_engine()
        except BaseException:
            self._close_impl()  # free what was allocated before the failure
            raise

    def _load_engine(self) -> None:
        trt = import_tensorrt()
        from ppipe_trt.engines.backends import cuda
        from ppipe_trt.engines.gpu import detect_gpu_class

        check_engine_metadata(self.meta, gpu_class=self.expected_gpu_class or detect_gpu_class(),
                              tensorrt_version=str(trt.__version__), where=str(self.plan_path))
        cuda.set_device(self.device_index)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self._engine is None:
            raise EngineBuildError(f"TensorRT could not deserialize {self.plan_path}")
        self._context = self._engine.create_execution_context()
        self._stream = cuda.CudaStream()
        self._resources.append(self._stream)
        self._device: dict[str, Any] = {}
        self._host: dict[str, Any] = {}
        engine_names = {self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)}
        # inputs nothing reads may be dropped by TensorRT; pass-through outputs are copied
        self._engine_inputs = tuple(s for s in self._inputs if s.name in engine_names)
        self._engine_outputs = tuple(s for s in self._outputs
                                     if s.name in engine_names and s.name not in self._passthrough)
        for spec in self._engine_inputs + self._engine_outputs:
            nbytes = cuda.live_nbytes(spec.shape, spec.dtype, self.max_batch)
            self._device[spec.name] = cuda.DeviceBuffer(nbytes)
            self._host[spec.name] = cuda.PinnedHostBuffer(nbytes)
            self._resources += [self._device[spec.name], self._host[spec.name]]
            self._context.set_tensor_address(spec.name, self._device[spec.name].ptr)

    def _infer_impl(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ppipe_trt.engines.backends import cuda

        batch = int(np.asarray(inputs[self._inputs[0].name]).shape[0]) if self._inputs else 1
        if not 1 <= batch <= self.max_batch:
            raise BadInputError(f"{self.name}: batch {batch}; engine profile allows 1..{self.max_batch}")
        for spec in self._engine_inputs:
            arr = np.ascontiguousarray(inputs[spec.name], dtype=spec.dtype)
            host = self._host[spec.name].array(spec.dtype, arr.shape)
            host[...] = arr  # staged in pinned memory so the copy is truly async
            self._device[spec.name].copy_from_host(self._host[spec.name].ptr, arr.nbytes, self._stream)
            self._context.set_input_shape(spec.name, arr.shape)
        if not self._context.execute_async_v3(self._stream.handle):
            raise EngineBuildError(f"TensorRT execution failed for {self.plan_path}")
        shapes = {}
        for spec in self._engine_outputs:
            shape = tuple(self._context.get_tensor_shape(spec.name))
            shapes[spec.name] = shape
            nbytes = cuda.live_nbytes(shape, spec.dtype, batch)
            self._device[spec.name].copy_to_host(self._host[spec.name].ptr, nbytes, self._stream)
        self._stream.synchronize()
        out = {}
        for spec in self._outputs:
            if spec.name in shapes:
                out[spec.name] = self._host[spec.name].array(spec.dtype, shapes[spec.name]).copy()
            else:  # passes through this stage untouched
                out[spec.name] = np.array(inputs[spec.name], copy=True)
        return out

    def _close_impl(self) -> None:
        self._context = None
        self._engine = None
        self._runtime = None
        for res in reversed(self._resources):
            res.close()
        self._resources.clear()
