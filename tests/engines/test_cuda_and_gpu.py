"""cuda-python wrappers up to the import boundary; GPU class naming and detection."""

from __future__ import annotations

import enum
import importlib.util

import numpy as np
import pytest

from ppipe_trt.engines.backends import cuda
from ppipe_trt.engines.gpu import detect_gpu_class, gpu_class_from_name
from ppipe_trt.errors import BackendUnavailableError, BadInputError, PPipeError

def _have_cuda_python() -> bool:
    try:
        return importlib.util.find_spec("cuda.bindings.runtime") is not None
    except ModuleNotFoundError:
        return False


HAVE_CUDA_PYTHON = _have_cuda_python()


class FakeError(enum.IntEnum):  # stands in for cudaError_t (an external type)
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2


def test_check_cuda_result_unpacks_and_raises():
    name = lambda e: FakeError(e).name  # noqa: E731
    ok = FakeError.cudaSuccess
    assert cuda.check_cuda_result((ok,), ok, name) is None
    assert cuda.check_cuda_result((ok, 1234), ok, name) == 1234
    assert cuda.check_cuda_result((ok, 1, 2), ok, name) == (1, 2)
    with pytest.raises(cuda.CudaError, match="cudaErrorMemoryAllocation"):
        cuda.check_cuda_result((FakeError.cudaErrorMemoryAllocation, 0), ok, name)
    assert issubclass(cuda.CudaError, PPipeError)


def test_live_nbytes_counts_only_the_live_batch():
    assert cuda.live_nbytes((-1, 3, 4), "float32", 5) == 5 * 12 * 4
    assert cuda.live_nbytes((-1, 3, 4), "float16", 1) == 24
    assert cuda.live_nbytes((7,), "int64", 3) == 56
    with pytest.raises(BadInputError, match="dynamic dims"):
        cuda.live_nbytes((-1, -1), "float32", 2)


@pytest.mark.skipif(HAVE_CUDA_PYTHON, reason="cuda-python is installed")
def test_missing_cuda_python_is_a_clear_error():
    with pytest.raises(BackendUnavailableError, match=r"^cuda-python is not installed: "):
        cuda.cuda_runtime()
    with pytest.raises(BackendUnavailableError, match="cuda-python is not installed"):
        cuda.CudaStream()
    with pytest.raises(BackendUnavailableError, match="cuda-python is not installed"):
        cuda.PinnedHostBuffer(16)


@pytest.mark.parametrize("name,cls", [("Tesla T4", "T4"), ("NVIDIA L4", "L4"),
                                      ("Tesla V100-SXM2-16GB", "V100"), ("Tesla P4", "P4"),
                                      ("NVIDIA H100 80GB HBM3", "H100"),
                                      ("NVIDIA A100-SXM4-40GB", "A100"),
                                      ("NVIDIA GeForce RTX 4090", "4090")])
def test_gpu_class_from_name(name, cls):
    assert gpu_class_from_name(name) == cls


def test_detect_gpu_class_without_driver():
    from ppipe_trt.engines.gpu import local_device_name

    if local_device_name() is not None:
        pytest.skip("an NVIDIA driver is present")
    assert detect_gpu_class() == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA_PYTHON, reason="cuda-python is not installed")
def test_round_trip_through_device_memory():
    data = np.arange(64, dtype=np.float32)
    with cuda.CudaStream() as stream, cuda.PinnedHostBuffer(data.nbytes) as host, \
            cuda.DeviceBuffer(data.nbytes) as dev, cuda.CudaEvent() as done:
        host.array("float32", (64,))[...] = data
        dev.copy_from_host(host.ptr, 32 * 4, stream)  # only the live half
        host.array("float32", (64,))[...] = 0
        dev.copy_to_host(host.ptr, 32 * 4, stream)
        done.record(stream)
        done.synchronize()
        np.testing.assert_array_equal(host.array("float32", (32,)), data[:32])
    with pytest.raises(PPipeError, match="after close"):
        _ = stream.handle
