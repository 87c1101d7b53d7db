"""One interface for every execution backend (ONNX Runtime, TensorRT, PyTorch).

Public methods check state; ``_impl`` methods do the work (the Polygraphy runner pattern).
A backend runs one sub-graph (a block range) on one device.  Buffers returned by ``infer``
are owned by the caller unless the backend documents otherwise.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ppipe_trt.errors import BadInputError, PPipeError


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, dtype and shape of an engine input/output; ``-1`` marks the batch dimension."""

    name: str
    dtype: str           # numpy dtype name, e.g. "float32"
    shape: tuple[int, ...]

    @property
    def bytes_per_sample(self) -> int:
        return int(np.prod([d for d in self.shape[1:]], dtype=np.int64)) * np.dtype(self.dtype).itemsize


class Backend(ABC):
    """Runs one sub-graph.  Use as a context manager, or call ``load()`` and ``close()``."""

    name: str = "backend"

    def __init__(self) -> None:
        self._loaded = False
        self._closed = False

    # ---- public, state-checking --------------------------------------------------------
    def load(self) -> "Backend":
        if self._closed:
            raise PPipeError(f"{self.name}: load() after close()")
        if not self._loaded:
            self._load_impl()
            self._loaded = True
        return self

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch.  ``inputs`` maps every input name to an array of batch >= 1."""
        if not self._loaded or self._closed:
            raise PPipeError(f"{self.name}: infer() needs load() first and no close()")
        missing = [s.name for s in self.inputs if s.name not in inputs]
        if missing:
            raise BadInputError(f"{self.name}: missing inputs {missing}; expected "
                                f"{[s.name for s in self.inputs]}")
        return self._infer_impl(inputs)

    def close(self) -> None:
        if self._loaded and not self._closed:
            self._close_impl()
        self._closed = True

    def __enter__(self) -> "Backend":
        return self.load()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- to implement --------------------------------------------------------------------
    @property
    @abstractmethod
    def inputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    @abstractmethod
    def outputs(self) -> tuple[TensorSpec, ...]: ...

    @abstractmethod
    def _load_impl(self) -> None: ...

    @abstractmethod
    def _infer_impl(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def _close_impl(self) -> None: ...
