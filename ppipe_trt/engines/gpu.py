"""Local GPU class detection (nvidia-ml-py, imported lazily)."""

from __future__ import annotations

import os
import re

CPU_CLASS = "cpu"
#: ONNX Runtime threads of one CPU worker, as the server runs it (``RuntimeOptions.
#: intra_op_threads``) and as CPU blocks are profiled: a plan for the ``cpu`` class counts one
#: such worker per slot, so its latency tables must be this worker's.
CPU_WORKER_THREADS = 1
_VENDOR_WORDS = ("nvidia", "tesla", "geforce", "quadro", "rtx")


def gpu_class_from_name(device_name: str) -> str:
    """Short class name of an NVIDIA device name: "Tesla T4" -> "T4", "NVIDIA L4" -> "L4",
    "Tesla V100-SXM2-16GB" -> "V100", "NVIDIA H100 80GB HBM3" -> "H100",
    "NVIDIA GeForce RTX 4090" -> "4090"."""
    words = [w for w in re.split(r"\s+", device_name.strip()) if w]
    while words and words[0].lower() in _VENDOR_WORDS:
        words = words[1:]
    if not words:
        return device_name.strip().replace(" ", "_") or CPU_CLASS
    return words[0].split("-")[0]


def local_device_name(index: int = 0) -> str | None:
    """Name of NVIDIA GPU ``index`` via NVML, or None without nvidia-ml-py or a driver."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound / DriverNotLoaded: no NVIDIA driver
        return None
    try:
        if pynvml.nvmlDeviceGetCount() <= index:
            return None
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(index))
        return name.decode() if isinstance(name, bytes) else str(name)
    finally:
        pynvml.nvmlShutdown()


def detect_gpu_class(index: int = 0) -> str:
    """The local GPU class ("T4", "L4", ...), or "cpu" on a machine without an NVIDIA driver."""
    name = local_device_name(index)
    return CPU_CLASS if name is None else gpu_class_from_name(name)


def local_device_description() -> str:
    """Human-readable name of the device profiles are taken on."""
    name = local_device_name()
    if name is not None:
        return name
    import platform

    return f"CPU ({platform.processor() or platform.machine()})"


def mps_daemon_running() -> bool:
    """Whether an MPS control daemon is listening (its pipe directory has a control pipe)."""
    import os

    pipe_dir = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    return os.path.exists(os.path.join(pipe_dir, "control"))


def local_compute_capability(index: int = 0) -> tuple[int, int] | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        return int(major), int(minor)
    finally:
        pynvml.nvmlShutdown()


def default_mps_shares(gpu_class: str, max_share: int = 4) -> tuple[int, ...]:
    """MPS shares to profile: (1,) on CPU, without an MPS daemon, or before Volta (P4 in the
    paper has m=1 only); else 1..max_share."""
    if gpu_class == CPU_CLASS or not mps_daemon_running():
        return (1,)
    cc = local_compute_capability()
    if cc is None or cc < (7, 0):
        return (1,)
    return tuple(range(1, max_share + 1))


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
