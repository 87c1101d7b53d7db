"""Stage executors: the engine code a worker runs for its block range.

:class:`BackendExecutor` wraps any :class:`~ppipe_trt.engines.backends.base.Backend`:
ONNX Runtime on CPU, or on a GPU the TensorRT backend, which owns the GPU path (pinned host
and device buffers allocated once at the maximum batch, one CUDA stream per worker, only the
live batch's bytes copied, through the checked-call wrapper of
``ppipe_trt.engines.backends.cuda``; imported lazily, so this module imports anywhere).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Mapping

import numpy as np

from ppipe_trt.engines.backends.base import Backend, TensorSpec
from ppipe_trt.errors import BadInputError


class StageExecutor(ABC):
    """Runs one block range on batches of 1..``max_batch`` samples.

    ``run`` gets batch-major arrays (exactly ``batch_size`` rows, owned by the executor for
    the call) and returns arrays the caller owns (they are forwarded to the next stage).
    """

    label: str = "executor"

    @property
    @abstractmethod
    def inputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    @abstractmethod
    def outputs(self) -> tuple[TensorSpec, ...]: ...

    @abstractmethod
    def run(self, tensors: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]: ...

    def close(self) -> None:
        """Release the engine and its buffers (called once, when the worker stops)."""


class BackendExecutor(StageExecutor):
    """Runs a loaded :class:`Backend`; casts inputs to the dtypes the engine declares
    (activations may arrive as float16 when the plan halves cut traffic)."""

    def __init__(self, backend: Backend, label: str = ""):
        self._backend = backend.load()
        self.label = label or f"{backend.name}"
        self._dtypes = {s.name: np.dtype(s.dtype) for s in backend.inputs}

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return tuple(self._backend.inputs)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return tuple(self._backend.outputs)

    def run(self, tensors: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
        feed = {}
        for name, dtype in self._dtypes.items():
            if name not in tensors:
                raise BadInputError(f"{self.label}: stage input {name!r} missing; got "
                                    f"{sorted(tensors)}")
            array = tensors[name]
            if array.shape[0] != batch_size:
                raise BadInputError(f"{self.label}: input {name!r} has {array.shape[0]} rows; "
                                    f"expected batch {batch_size}")
            feed[name] = array if array.dtype == dtype else array.astype(dtype)
        return self._backend.infer(feed)

    def warm_up(self, max_batch: int) -> None:
        """Run zeros at batch 1 and ``max_batch`` once (first runs allocate and optimize)."""
        for batch in sorted({1, max_batch}):
            self.run({s.name: np.zeros((batch,) + tuple(max(1, d) for d in s.shape[1:]),
                                       s.dtype) for s in self.inputs}, batch)

    def close(self) -> None:
        self._backend.close()
