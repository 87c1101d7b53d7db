"""Small owners of CUDA resources on top of cuda-python (``cuda.bindings.runtime``).

Every call goes through :func:`cuda_call`, which raises :class:`CudaError` with the error's
name.  :class:`PinnedHostBuffer`, :class:`DeviceBuffer`, :class:`CudaStream` and
:class:`CudaEvent` own one resource each, free it in ``close()`` (idempotent) and support
``with``.  Allocate once at the profile's maximum batch and copy only the live batch's bytes
(:func:`live_nbytes`).  cuda-python is imported on first use; without it every entry point
raises ``BackendUnavailableError("cuda-python is not installed: ...")``.
"""

from __future__ import annotations

import ctypes
from typing import Any, Callable

import numpy as np

from ppipe_trt.errors import BackendUnavailableError, BadInputError, PPipeError


class CudaError(PPipeError):
    """A CUDA runtime call returned an error; the message names it (e.g. cudaErrorMemoryAllocation)."""


_RUNTIME = None


def cuda_runtime():
    """The ``cuda.bindings.runtime`` module (cuda-python >= 12.6; older: ``cuda.cudart``)."""
    global _RUNTIME
    if _RUNTIME is None:
        try:
            from cuda.bindings import runtime as rt  # type: ignore[import-not-found]
        except ImportError as exc:
            try:
                from cuda import cudart as rt  # type: ignore[import-not-found,no-redef]
            except ImportError:
                raise BackendUnavailableError(
                    f"cuda-python is not installed: {exc}; install it with "
                    "pip install 'cuda-python>=12.3' (needs an NVIDIA driver)") from None
        _RUNTIME = rt
    return _RUNTIME


def check_cuda_result(result: Any, success: Any, error_name: Callable[[Any], str]) -> Any:
    """Unpack a cuda-python result ``(err, *values)``: raise on error, else return the value
    (None, the single value, or a tuple)."""
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if err != success:
        raise CudaError(f"CUDA call failed: {error_name(err)} ({int(err) if hasattr(err, '__int__') else err})")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def cuda_call(result: Any) -> Any:
    """Check a cuda-python call's result tuple; raises :class:`CudaError` with the error name."""
    rt = cuda_runtime()

    def name(err: Any) -> str:
        got = rt.cudaGetErrorName(err)
        raw = got[1] if isinstance(got, tuple) else got
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    return check_cuda_result(result, rt.cudaError_t.cudaSuccess, name)


def live_nbytes(shape: tuple[int, ...], dtype: str | np.dtype, batch: int) -> int:
    """Bytes of a tensor of per-engine ``shape`` (dim 0 = -1 for the batch) at ``batch``."""
    dims = [batch if (i == 0 and d == -1) else d for i, d in enumerate(shape)]
    if any(d < 0 for d in dims):
        raise BadInputError(f"shape {shape} has dynamic dims besides the batch; expected static")
    return int(np.prod(dims, dtype=np.int64)) * np.dtype(dtype).itemsize


class _Resource:
    def __init__(self) -> None:
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._free()

    def _free(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _check_open(self) -> None:
        if self._closed:
            raise PPipeError(f"{type(self).__name__} used after close()")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CudaStream(_Resource):
    """A non-blocking CUDA stream.  ``handle`` is what TensorRT's ``execute_async_v3`` takes."""

    def __init__(self) -> None:
        super().__init__()
        rt = cuda_runtime()
        self._stream = cuda_call(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))

    @property
    def handle(self) -> int:
        self._check_open()
        return int(self._stream)

    @property
    def raw(self):
        return self._stream

    def synchronize(self) -> None:
        self._check_open()
        cuda_call(cuda_runtime().cudaStreamSynchronize(self._stream))

    def _free(self) -> None:
        cuda_call(cuda_runtime().cudaStreamDestroy(self._stream))


class CudaEvent(_Resource):
    """A CUDA event (timing disabled) to hand a batch from one stream to another."""

    def __init__(self) -> None:
        super().__init__()
        rt = cuda_runtime()
        self._event = cuda_call(rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming))

    def record(self, stream: CudaStream) -> None:
        self._check_open()
        cuda_call(cuda_runtime().cudaEventRecord(self._event, stream.raw))

    def wait_on(self, stream: CudaStream) -> None:
        """Make ``stream`` wait for this event (no host synchronisation)."""
        self._check_open()
        cuda_call(cuda_runtime().cudaStreamWaitEvent(stream.raw, self._event, 0))

    def synchronize(self) -> None:
        self._check_open()
        cuda_call(cuda_runtime().cudaEventSynchronize(self._event))

    def _free(self) -> None:
        cuda_call(cuda_runtime().cudaEventDestroy(self._event))


class PinnedHostBuffer(_Resource):
    """Page-locked host memory of ``nbytes``; :meth:`array` gives numpy views (owned here,
    valid until ``close()``)."""

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.nbytes = int(nbytes)
        self._ptr = int(cuda_call(cuda_runtime().cudaMallocHost(max(self.nbytes, 1))))
        raw = (ctypes.c_uint8 * max(self.nbytes, 1)).from_address(self._ptr)
        self._bytes = np.frombuffer(raw, dtype=np.uint8, count=self.nbytes)

    @property
    def ptr(self) -> int:
        self._check_open()
        return self._ptr

    def array(self, dtype: str | np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        self._check_open()
        count = int(np.prod(shape, dtype=np.int64))
        nbytes = count * np.dtype(dtype).itemsize
        if nbytes > self.nbytes:
            raise BadInputError(f"view of {nbytes} bytes exceeds pinned buffer of {self.nbytes}")
        return self._bytes[:nbytes].view(dtype).reshape(shape)

    def _free(self) -> None:
        self._bytes = None
        cuda_call(cuda_runtime().cudaFreeHost(self._ptr))


class DeviceBuffer(_Resource):
    """Device memory of ``nbytes`` on the current device."""

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.nbytes = int(nbytes)
        self._ptr = int(cuda_call(cuda_runtime().cudaMalloc(max(self.nbytes, 1))))

    @property
    def ptr(self) -> int:
        self._check_open()
        return self._ptr

    def copy_from_host(self, host_ptr: int, nbytes: int, stream: CudaStream) -> None:
        """Async copy of the first ``nbytes`` (the live batch) from pinned host memory."""
        rt = cuda_runtime()
        self._check_size(nbytes)
        cuda_call(rt.cudaMemcpyAsync(self._ptr, host_ptr, nbytes,
                                     rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.raw))

    def copy_to_host(self, host_ptr: int, nbytes: int, stream: CudaStream) -> None:
        rt = cuda_runtime()
        self._check_size(nbytes)
        cuda_call(rt.cudaMemcpyAsync(host_ptr, self._ptr, nbytes,
                                     rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.raw))

    def _check_size(self, nbytes: int) -> None:
        self._check_open()
        if nbytes > self.nbytes:
            raise BadInputError(f"copy of {nbytes} bytes exceeds device buffer of {self.nbytes}")

    def _free(self) -> None:
        cuda_call(cuda_runtime().cudaFree(self._ptr))


def set_device(index: int) -> None:
    cuda_call(cuda_runtime().cudaSetDevice(index))


def device_properties(index: int = 0) -> tuple[str, str]:
    """(device name, compute capability "major.minor") of GPU ``index``."""
    props = cuda_call(cuda_runtime().cudaGetDeviceProperties(index))
    name = props.name
    name = name.decode(errors="replace").rstrip("\x00") if isinstance(name, bytes) else str(name)
    return name, f"{props.major}.{props.minor}"
