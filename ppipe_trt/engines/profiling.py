"""Latency profiling on the local device: per block and batch size, and per ONNX node.

Block latencies are the median of ``repeats`` timed runs after ``warmup`` untimed ones, in
microseconds.  A backend's ``infer`` returns host arrays, so on a GPU each timed run includes
the stream synchronisation that makes its outputs visible (what a stage worker pays).
MPS shares: a CPU has one share (the whole machine), timed with one worker per usable core
running the block at once (:func:`profile_busy_latency_us`: what each serving worker takes
under load, when they share memory bandwidth and caches).  On a GPU, share ``m`` is measured by
``m`` processes running the same block at once (:func:`profile_concurrent_latency_us`), when
the MPS control daemon is running and the GPU supports MPS clients (Volta or newer); see
:func:`ppipe_trt.engines.gpu.default_mps_shares`.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ppipe_trt.engines.backends.base import Backend
from ppipe_trt.engines.graph import random_inputs
from ppipe_trt.errors import BadInputError, EngineBuildError


def median_latency_us(fn: Callable[[], object], warmup: int = 2, repeats: int = 7) -> float:
    """Median wall time of ``fn()`` in microseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - start) / 1e3)
    return float(statistics.median(samples))


def monotone_in_batch(row: Sequence[float]) -> tuple[float, ...]:
    """Running maximum: measurement noise must not make a larger batch look faster (the
    profile format requires latencies non-decreasing in batch size)."""
    out, best = [], 0.0
    for v in row:
        best = max(best, float(v))
        out.append(best)
    return tuple(out)


def profile_backend_latency_us(backend: Backend, max_batch: int, warmup: int = 2,
                               repeats: int = 7, seed: int = 0) -> tuple[float, ...]:
    """Latency (us) of a loaded backend at batch 1..max_batch, made non-decreasing."""
    row = []
    for batch in range(1, max_batch + 1):
        feeds = random_inputs(backend.inputs, batch, seed)
        row.append(median_latency_us(lambda: backend.infer(feeds), warmup, repeats))
    return monotone_in_batch(row)


def onnxruntime_device_for(gpu_class: str) -> str:
    """Where ONNX Runtime can measure ``gpu_class``: "cuda" with the CUDA execution provider
    on a GPU class, else "cpu" (then a non-CPU class is measured on the CPU: see meta)."""
    if gpu_class == "cpu":
        return "cpu"
    import onnxruntime as ort

    return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def profile_node_latency_us(onnx_path: Path | str, node_names: Sequence[str], runs: int = 10,
                            warmup: int = 2, device: str = "cpu") -> dict[str, float]:
    """Per-node latency (us, batch 1, median over ``runs``) from ONNX Runtime's profiler,
    with graph optimizations off so node names match the model.  Nodes the profiler does not
    report (e.g. folded away) get 0."""
    from ppipe_trt.engines.backends.onnxruntime_backend import OnnxRuntimeBackend
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        backend = OnnxRuntimeBackend(onnx_path, device, optimization="disable",
                                     profiling_prefix=str(Path(tmp) / "nodeprof"))
        with backend:
            feeds = random_inputs(backend.inputs, 1)
            for _ in range(warmup + runs):
                backend.infer(feeds)
            trace = Path(backend.end_profiling())
            events = json.loads(trace.read_text())
    durations: dict[str, list[float]] = {}
    for ev in events:
        if ev.get("cat") == "Node" and str(ev.get("name", "")).endswith("_kernel_time"):
            durations.setdefault(ev["name"][: -len("_kernel_time")], []).append(float(ev["dur"]))
    out = {}
    for name in node_names:
        samples = durations.get(name, [])[warmup:] or durations.get(name, [])
        out[name] = float(statistics.median(samples)) if samples else 0.0
    return out


def profile_busy_latency_us(backends: Sequence[Backend], max_batch: int, warmup: int = 2,
                            repeats: int = 7, seed: int = 0) -> tuple[float, ...]:
    """Latency (us) at batch 1..max_batch of one block while ``len(backends)`` copies of it run
    at once, each on a thread of its own (CPU workers: each copy is a serving worker's
    session; ONNX Runtime releases the GIL while it runs): median over every copy's samples,
    made non-decreasing.  The copies start each batch size together and keep running until
    the slowest has its ``repeats`` samples, so every sample is taken with all of them busy."""
    import threading

    n = len(backends)
    if n < 1:
        raise BadInputError("profile_busy_latency_us needs at least one backend")
    row = []
    for batch in range(1, max_batch + 1):
        feeds = [random_inputs(b.inputs, batch, seed) for b in backends]
        barrier = threading.Barrier(n)
        samples: list[list[float]] = [[] for _ in range(n)]
        done = [0]
        lock = threading.Lock()
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                for _ in range(warmup):
                    backends[i].infer(feeds[i])
                barrier.wait()
                mine = samples[i]
                while True:
                    start = time.perf_counter_ns()
                    backends[i].infer(feeds[i])
                    if len(mine) < repeats:
                        mine.append((time.perf_counter_ns() - start) / 1e3)
                        if len(mine) == repeats:
                            with lock:
                                done[0] += 1
                    if done[0] == n:   # every copy has its samples: all were busy throughout
                        return
            except BaseException as exc:  # re-raised by the caller's thread below
                errors.append(exc)
                barrier.abort()
                with lock:
                    done[0] = n

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise EngineBuildError(f"profiling {n} copies at once failed at batch {batch}: "
                                   f"{type(errors[0]).__name__}: {errors[0]}") from errors[0]
        row.append(float(statistics.median([s for mine in samples for s in mine])))
    return monotone_in_batch(row)


# ---- concurrent processes (MPS shares) ------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BackendRecipe:
    """How a child process re-creates a stage backend: ``kind`` "onnxruntime" (``path`` is the
    ONNX file) or "tensorrt" (``path`` is the .plan)."""

    kind: str
    path: str
    device: str = "cpu"
    gpu_class: str | None = None

    def create(self) -> Backend:
        if self.kind == "onnxruntime":
            from ppipe_trt.engines.backends.onnxruntime_backend import OnnxRuntimeBackend
            from ppipe_trt.engines.gpu import CPU_WORKER_THREADS

            # on the CPU, each process runs as one serving worker does
            return OnnxRuntimeBackend(self.path, self.device, intra_op_threads=(
                CPU_WORKER_THREADS if self.device == "cpu" else None))
        if self.kind == "tensorrt":
            from ppipe_trt.engines.backends.tensorrt_backend import TensorRTBackend

            return TensorRTBackend(self.path, expected_gpu_class=self.gpu_class,
                                   device_index=int(self.device.partition(":")[2] or 0))
        raise BadInputError(f"backend {self.kind!r}; expected 'onnxruntime' or 'tensorrt'")


def _concurrent_worker(recipe: BackendRecipe, max_batch: int, warmup: int, repeats: int,
                       seed: int, barrier, queue) -> None:
    backend = None
    try:
        backend = recipe.create().load()
        rows = []
        for batch in range(1, max_batch + 1):
            feeds = random_inputs(backend.inputs, batch, seed)
            for _ in range(warmup):
                backend.infer(feeds)
            barrier.wait()  # every process times the same batch size at the same time
            samples = []
            for _ in range(repeats):
                start = time.perf_counter_ns()
                backend.infer(feeds)
                samples.append((time.perf_counter_ns() - start) / 1e3)
            rows.append(samples)
        queue.put(("ok", rows))
    except BaseException as exc:  # reported to the parent, which raises
        barrier.abort()
        queue.put(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        if backend is not None:
            backend.close()


def profile_concurrent_latency_us(recipe: BackendRecipe, processes: int, max_batch: int,
                                  warmup: int = 2, repeats: int = 7, seed: int = 0,
                                  timeout_s: float = 600.0) -> tuple[float, ...]:
    """Latency (us) at batch 1..max_batch seen by each of ``processes`` processes running the
    same stage at once (an MPS share of ``processes``): median over all processes' samples,
    made non-decreasing.  Raises EngineBuildError if a process fails."""
    import multiprocessing as mp
    import queue as queue_mod

    if processes < 1:
        raise BadInputError(f"processes={processes}; expected >= 1")
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_concurrent_worker, daemon=True,
                         args=(recipe, max_batch, warmup, repeats, seed, barrier, results))
             for _ in range(processes)]
    for p in procs:
        p.start()
    outcomes = []
    try:
        for _ in procs:
            outcomes.append(results.get(timeout=timeout_s))
    except queue_mod.Empty:
        raise EngineBuildError(f"concurrent profiling of {recipe.path} with {processes} "
                               f"processes timed out after {timeout_s:.0f} s") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    errors = [msg for status, msg in outcomes if status != "ok"]
    if errors:
        raise EngineBuildError(f"concurrent profiling of {recipe.path} failed: {errors[0]}")
    row = [float(statistics.median([s for _, rows in outcomes for s in rows[b]]))
           for b in range(max_batch)]
    return monotone_in_batch(row)
