"""ONNX Runtime backend: one optimized inference session per sub-graph.

CPU by default; ``device="cuda"`` / ``"cuda:1"`` uses the CUDA execution provider when the
installed onnxruntime has it (``onnxruntime-gpu``), else raises BackendUnavailableError.

On the CPU path, ``preallocate_outputs=True`` binds outputs (I/O binding) to buffers
allocated once at ``max_batch``; ``infer`` then returns *views* of those buffers, owned by the
backend and valid until the next ``infer`` or ``close``.  By default every call returns fresh
arrays owned by the caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from ppipe_trt.engines.backends.base import Backend, TensorSpec
from ppipe_trt.errors import BackendUnavailableError, BadInputError, EngineBuildError, PPipeError


class InferenceFailedError(PPipeError):
    """ONNX Runtime rejected or failed a batch (wrong shape, a graph that hard-codes batch 1...)."""

_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
               "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def onnxruntime_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def read_io_specs(onnx_path: Path | str) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Input and output specs of an ONNX file (dim 0 symbolic -> -1), without its weights."""
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}

    def spec(vi) -> TensorSpec:
        tt = vi.type.tensor_type
        dims = tuple(int(d.dim_value) if d.HasField("dim_value") else -1 for d in tt.shape.dim)
        return TensorSpec(vi.name, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name, dims)

    return (tuple(spec(i) for i in model.graph.input if i.name not in inits),
            tuple(spec(o) for o in model.graph.output))


def _parse_device(device: str) -> tuple[str, int]:
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise BadInputError(f"device {device!r}; expected 'cpu', 'cuda' or 'cuda:N'")
    return kind, int(index or 0)


class OnnxRuntimeBackend(Backend):
    """Runs one ONNX sub-graph with ONNX Runtime.  Not loaded until ``load()``."""

    name = "onnxruntime"

    def __init__(self, onnx_path: Path | str, device: str = "cpu", *, max_batch: int = 8,
                 intra_op_threads: int | None = None, optimization: str = "all",
                 preallocate_outputs: bool = False, profiling_prefix: str | None = None):
        super().__init__()
        self.onnx_path = Path(onnx_path)
        if not self.onnx_path.is_file():
            raise BadInputError(f"ONNX file {self.onnx_path} not found")
        if optimization not in _OPT_LEVELS:
            raise BadInputError(f"optimization {optimization!r}; expected one of {sorted(_OPT_LEVELS)}")
        self.device_kind, self.device_index = _parse_device(device)
        self.max_batch = max_batch
        self.intra_op_threads = intra_op_threads
        self.optimization = optimization
        self.preallocate_outputs = preallocate_outputs and self.device_kind == "cpu"
        self.profiling_prefix = profiling_prefix
        self._inputs, self._outputs = read_io_specs(self.onnx_path)
        self._session = None
        self._binding = None
        self._out_buffers: dict[str, np.ndarray] = {}

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    @property
    def session(self):
        """The underlying ``onnxruntime.InferenceSession`` (after ``load()``)."""
        return self._session

    def _providers(self, ort) -> list:
        if self.device_kind == "cpu":
            return ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailableError(
                "ONNX Runtime CUDA execution provider is not installed: onnxruntime "
                f"{ort.__version__} offers {ort.get_available_providers()}; install onnxruntime-gpu")
        return [("CUDAExecutionProvider", {"device_id": self.device_index}), "CPUExecutionProvider"]

    def _load_impl(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[self.optimization])
        if self.intra_op_threads:
            opts.intra_op_num_threads = self.intra_op_threads
        if self.profiling_prefix:
            opts.enable_profiling = True
            opts.profile_file_prefix = self.profiling_prefix
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(self.onnx_path), sess_options=opts,
                                                 providers=self._providers(ort))
        except BackendUnavailableError:
            raise
        except Exception as exc:
            raise EngineBuildError(f"ONNX Runtime could not load {self.onnx_path}: {exc}") from None
        if self.preallocate_outputs and all(d >= 0 for s in self._outputs for d in s.shape[1:]):
            self._binding = self._session.io_binding()
            for spec in self._outputs:
                shape = (self.max_batch,) + tuple(spec.shape[1:]) if spec.shape and spec.shape[0] == -1 \
                    else tuple(spec.shape)
                self._out_buffers[spec.name] = np.empty(shape, dtype=spec.dtype)

    def _infer_impl(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {s.name: np.ascontiguousarray(inputs[s.name], dtype=s.dtype) for s in self._inputs}
        try:
            return self._run(feeds)
        except (BadInputError, InferenceFailedError):
            raise
        except Exception as exc:  # onnxruntime raises its own exception types
            shapes = {k: tuple(v.shape) for k, v in feeds.items()}
            raise InferenceFailedError(f"{self.onnx_path.name}: ONNX Runtime failed on inputs "
                                       f"{shapes}: {exc}") from None

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._binding is None:
            names = [s.name for s in self._outputs]
            return dict(zip(names, self._session.run(names, feeds)))
        batch = next(iter(feeds.values())).shape[0] if feeds else 1
        if batch > self.max_batch:
            raise BadInputError(f"{self.name}: batch {batch} > max_batch {self.max_batch}")
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, arr)
        views = {}
        passthrough = []
        for spec in self._outputs:
            buf = self._out_buffers[spec.name]
            view = buf[:batch] if spec.shape and spec.shape[0] == -1 else buf
            views[spec.name] = view
            if spec.name in feeds:  # ORT does not fill a bound output that is a graph input
                passthrough.append(spec.name)
                continue
            binding.bind_output(spec.name, "cpu", 0, view.dtype, list(view.shape),
                                view.ctypes.data)
        self._session.run_with_iobinding(binding)
        for name in passthrough:
            np.copyto(views[name], feeds[name])
        return views

    def end_profiling(self) -> str:
        """Stop ORT profiling and return the JSON trace path (profiling_prefix was set)."""
        return self._session.end_profiling()

    def _close_impl(self) -> None:
        self._binding = None
        self._session = None
        self._out_buffers.clear()
