"""``build_model_engines``: analyse, pre-partition, extract, compile and profile one model.

Steps, each skipped when its content-addressed result is already in the store:

1. resolve the model (built-in name -> exported with torch; else a path to an ``.onnx``);
2. normalize it (dynamic batch, named nodes) and measure per-node latency on this device;
3. pre-partition into ``num_blocks`` balanced blocks with the fewest bytes at the cuts (a
   partition already built for another GPU class of the same source model is reused, so
   every class's profile describes the same blocks and the planner can mix them);
4. extract each block's sub-graph; with TensorRT, build one engine per block;
5. profile each block at batch 1..max_batch and write ``profile.json``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ppipe_trt.engines.gpu import (CPU_CLASS, default_mps_shares, detect_gpu_class,
                                  local_device_description)
from ppipe_trt.engines.store import (BuiltModel, build_problem, content_hash, model_dir,
                                     model_sha256, read_manifest, sha256_file, spec_dicts,
                                     write_json)
from ppipe_trt.errors import BackendUnavailableError, BadInputError, PPipeError
from ppipe_trt.models import BUILTIN_MODELS, export_builtin

log = logging.getLogger("ppipe.engines")

DEFAULT_NUM_BLOCKS = 10
#: Bump when the analysis, partitioning or extraction changes what a build produces.
BUILD_ALGORITHM_VERSION = 4


def _progress(iterable, desc: str, enabled: bool, total: int | None = None):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, unit="step", dynamic_ncols=True)


def resolve_model(model: str | Path, store_root: Path) -> tuple[str, Path]:
    """(model name, ONNX path).  Built-ins are exported to ``<store>/_sources/<name>.onnx``."""
    if isinstance(model, str) and model in BUILTIN_MODELS:
        path = store_root / "_sources" / f"{model}.onnx"
        try:
            export_builtin(model, path)  # deterministic, ~1 s: cheaper than trusting a stale copy
        except BackendUnavailableError:
            if not path.exists():  # no torch and no earlier export: nothing to build from
                raise
        return model, path
    path = Path(model)
    if path.suffix != ".onnx" or not path.is_file():
        raise BadInputError(f"model {str(model)!r}: expected a built-in name "
                            f"({', '.join(BUILTIN_MODELS)}) or a path to an existing .onnx file")
    return path.stem, path


def resolve_backend(backend: str, gpu_class: str) -> tuple[str, str]:
    """(backend name, version).  "auto" is TensorRT on a GPU class where it is installed,
    else ONNX Runtime."""
    if backend not in ("auto", "onnxruntime", "tensorrt"):
        raise BadInputError(f"backend {backend!r}; expected 'auto', 'onnxruntime' or 'tensorrt'")
    if backend in ("auto", "tensorrt") and gpu_class != CPU_CLASS:
        from ppipe_trt.engines.backends import tensorrt_backend

        try:
            return "tensorrt", tensorrt_backend.tensorrt_version()
        except BackendUnavailableError:
            if backend == "tensorrt":
                raise
    elif backend == "tensorrt":
        raise BadInputError("backend 'tensorrt' needs a GPU class, got 'cpu'")
    from ppipe_trt.engines.backends.onnxruntime_backend import onnxruntime_version

    return "onnxruntime", onnxruntime_version()


def _find_sibling_partition(store_root: Path, model_name: str, source_sha: str, num_blocks: int,
                            gpu_class: str) -> dict[str, Any] | None:
    """The partition of a current build of the same source model for another GPU class."""
    for current in sorted(store_root.glob(f"*/{model_name}/CURRENT")):
        if current.parent.parent.name == gpu_class:
            continue
        try:
            m = read_manifest(current.parent / current.read_text().strip())
        except (PPipeError, OSError):
            continue
        if (m.get("complete") and m["source_sha256"] == source_sha
                and m["requested_blocks"] == num_blocks
                and m.get("algorithm") == BUILD_ALGORITHM_VERSION):
            return m
    return None


def _sibling_node_latencies(store_root: Path, model_name: str, source_sha: str,
                            node_names: list[str]) -> dict[str, list[float]]:
    """Per-node latencies of the same source model measured on other GPU classes."""
    out = {}
    for path in sorted(store_root.glob(f"*/{model_name}/*/node_latency_us.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("source_sha256") == source_sha and data.get("node_names") == node_names:
            out[data["gpu_class"]] = data["latency_us"]
    return out


def build_model_engines(model: str | Path, gpu_class: str | None = None, *,
                        store_root: Path | str = "engines", num_blocks: int = DEFAULT_NUM_BLOCKS,
                        backend: str = "auto", max_batch: int = 8, progress: bool = True,
                        profile: bool = True, precision: str = "tf32", fp16_cuts: bool = False,
                        warmup: int = 2, repeats: int = 7,
                        mps_shares: tuple[int, ...] | None = None, name: str | None = None,
                        rebuild_command: str | None = None) -> BuiltModel:
    """Build (or find up to date) the blocks, engines and profile of ``model``; idempotent.

    ``precision`` ("tf32" | "fp16" | "fp32") applies to TensorRT engines; ``fp16_cuts`` makes
    the profile's cut sizes count float tensors as 2 bytes (activations sent in fp16).
    ``mps_shares``: shares to profile (default :func:`default_mps_shares`: (1,) on CPU).
    ``name``: the model's name in the store (default: the built-in name or the file's stem;
    a repository passes its entry's name).  ``rebuild_command``: what a user runs to rebuild
    it, quoted by the errors that find the build stale or corrupt.
    """
    from ppipe_trt.engines.graph import ModelGraph
    from ppipe_trt.engines.prepartition import prepartition
    from ppipe_trt.engines.profiling import onnxruntime_device_for, profile_node_latency_us
    from ppipe_trt.engines.subgraph import save_model

    if not 1 <= max_batch <= 256:
        raise BadInputError(f"max_batch={max_batch}; expected 1..256")
    if num_blocks < 1:
        raise BadInputError(f"num_blocks={num_blocks}; expected >= 1")
    if precision not in ("tf32", "fp16", "fp32"):
        raise BadInputError(f"precision {precision!r}; expected 'tf32', 'fp16' or 'fp32'")
    store_root = Path(store_root)
    gpu_class = gpu_class or detect_gpu_class()
    resolved_name, source = resolve_model(model, store_root)
    name = name or resolved_name
    if rebuild_command is None:
        rebuild_command = f"ppipe engines build {model} --gpu-class {gpu_class}"
    backend_name, backend_version = resolve_backend(backend, gpu_class)
    source_sha = model_sha256(source)
    key = content_hash({"source_sha256": source_sha, "num_blocks": num_blocks,
                        "backend": backend_name, "backend_version": backend_version,
                        "max_batch": max_batch, "precision": precision, "gpu_class": gpu_class,
                        "fp16_cuts": fp16_cuts, "algorithm": BUILD_ALGORITHM_VERSION})
    mdir = model_dir(store_root, gpu_class, name)
    build_dir = mdir / key

    complete = (build_dir / "manifest.json").exists() and read_manifest(build_dir).get("complete")
    if complete:
        problem = build_problem(BuiltModel.from_manifest(build_dir), check_source=False)
        if problem is not None:  # same inputs, damaged outputs: build them again
            log.warning("%s: %s; rebuilding it", build_dir, problem)
            shutil.rmtree(build_dir)
            complete = False
    if not complete:
        graph = ModelGraph.from_onnx(source)
        full_onnx = save_model(graph.model, build_dir / "model.onnx")
        node_names = [n.name for n in graph.nodes]
        ort_device = onnxruntime_device_for(gpu_class)
        node_lat = profile_node_latency_us(full_onnx, node_names, device=ort_device)
        write_json(build_dir / "node_latency_us.json",
                   {"gpu_class": gpu_class, "source_sha256": source_sha, "device":
                    local_device_description(), "onnxruntime_device": ort_device,
                    "node_names": node_names,
                    "latency_us": [node_lat[n] for n in node_names]})
        cut_bytes = graph.cut_bytes_per_sample(fp16_floats=fp16_cuts)
        sibling = _find_sibling_partition(store_root, name, source_sha, num_blocks, gpu_class)
        if sibling is not None:
            ranges = [tuple(r) for r in sibling["block_node_ranges"]]
            part_info = dict(sibling["partition"], reused_from=sibling["gpu_class"])
        else:
            latencies = _sibling_node_latencies(store_root, name, source_sha, node_names)
            latencies[gpu_class] = [node_lat[n] for n in node_names]
            if sum(latencies[gpu_class]) <= 0:  # profiler reported nothing: fall back to uniform
                latencies[gpu_class] = [1.0] * len(node_names)
            part = prepartition(latencies, cut_bytes, num_blocks,
                                allowed_cuts=graph.allowed_cuts())
            ranges = list(part.block_ranges)
            part_info = {"lower": part.lower, "upper": part.upper,
                         "balanced_on": sorted(latencies),
                         "block_share": {k: list(v) for k, v in part.block_share.items()}}
        cuts = [int(cut_bytes[last]) for _, last in ranges[:-1]]
        manifest = {
            "format": "ppipe-trt-engines", "version": 1, "model": name, "gpu_class": gpu_class,
            "content_hash": key, "source": str(source), "source_sha256": source_sha,
            "requested_blocks": num_blocks, "num_blocks": len(ranges),
            "block_node_ranges": [list(r) for r in ranges],
            "block_first_nodes": [node_names[a] for a, _ in ranges],
            "partition": {**part_info, "cut_bytes_per_sample": cuts, "fp16_cuts": fp16_cuts},
            "backend": backend_name, "backend_version": backend_version,
            "precision": precision, "max_batch": max_batch, "device": local_device_description(),
            "algorithm": BUILD_ALGORITHM_VERSION,
            "inputs": spec_dicts(graph.input_specs), "outputs": spec_dicts(graph.output_specs),
            "model_sha256": sha256_file(full_onnx), "rebuild_command": rebuild_command,
            "complete": False,
        }
        write_json(build_dir / "manifest.json", manifest)
        built = BuiltModel.from_manifest(build_dir)
        built.__dict__["graph"] = graph  # already analysed: spare a reload
        engines = []
        for b in _progress(range(built.num_blocks), f"{name}: extract/build blocks", progress):
            stage = built.stage_onnx(b, b)
            entry = {"block": b, "onnx": str(stage.relative_to(build_dir)),
                     "sha256": sha256_file(stage)}
            if backend_name == "tensorrt":
                backend_obj = built.open_backend(b, b, "tensorrt")  # builds the .plan
                entry["plan"] = str(Path(backend_obj.plan_path).relative_to(build_dir))
            engines.append(entry)
        manifest.update(engines=engines, complete=True,
                        created_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        write_json(build_dir / "manifest.json", manifest)
    built = BuiltModel.from_manifest(build_dir)
    (mdir / "CURRENT").write_text(key + "\n")
    shares = tuple(sorted(set(mps_shares))) if mps_shares else default_mps_shares(gpu_class)
    if shares[0] != 1:
        raise BadInputError(f"mps_shares {shares}; expected 1 first (the whole device)")
    if profile and not _profile_is_current(built, shares):
        profile_built_model(built, progress=progress, warmup=warmup, repeats=repeats,
                            mps_shares=shares)
    return built


def _profile_is_current(built: BuiltModel, shares: tuple[int, ...] = (1,)) -> bool:
    from ppipe_trt.profiles import read_profile

    if not built.profile_path.exists():
        return False
    try:
        _, meta = read_profile(built.profile_path)
    except PPipeError:
        return False
    return (meta.get("content_hash") == built.content_hash
            and tuple(meta.get("mps_shares", ())) == shares
            and meta.get("intra_op_threads") == _profiling_threads(built)
            and meta.get("busy_workers", 1) == _busy_workers(built))


def _busy_workers(built: BuiltModel, device: str | None = None) -> int:
    """How many copies of a block run at once while it is profiled at share 1: on the CPU,
    one per usable core (the serving workers share the machine's memory bandwidth and caches
    and are all busy under load: a block timed alone on an idle machine is faster than any of
    them then); elsewhere 1 (the device is the worker's own)."""
    from ppipe_trt.engines.gpu import usable_cores
    from ppipe_trt.engines.profiling import onnxruntime_device_for

    if built.backend != "onnxruntime":
        return 1
    if device is None:
        device = onnxruntime_device_for(built.gpu_class)
    return usable_cores() if device == "cpu" else 1


def _profiling_threads(built: BuiltModel, device: str | None = None) -> int | None:
    """ONNX Runtime threads the blocks are profiled with: on the CPU, those of one serving
    worker (``CPU_WORKER_THREADS``; ONNX Runtime's default would use every core, and the
    plan would count a worker that fast); elsewhere ONNX Runtime's default (``None``)."""
    from ppipe_trt.engines.gpu import CPU_WORKER_THREADS
    from ppipe_trt.engines.profiling import onnxruntime_device_for

    if built.backend != "onnxruntime":
        return None
    if device is None:
        device = onnxruntime_device_for(built.gpu_class)
    return CPU_WORKER_THREADS if device == "cpu" else None


def profile_built_model(built: BuiltModel, *, progress: bool = True, warmup: int = 2,
                        repeats: int = 7, device: str | None = None,
                        mps_shares: tuple[int, ...] = (1,)) -> Path:
    """Profile every block at batch 1..max_batch on the local device, at each MPS share
    (share m > 1: m processes run the block at once); write profile.json."""
    from ppipe_trt.engines.graph import random_inputs
    from ppipe_trt.engines.profiling import (BackendRecipe, median_latency_us,
                                             profile_backend_latency_us,
                                             profile_busy_latency_us,
                                             profile_concurrent_latency_us)
    from ppipe_trt.profiles import BlockLatencyTable, ModelProfile, write_profile

    from ppipe_trt.engines.profiling import onnxruntime_device_for

    backend = built.backend
    if device is None:
        device = (onnxruntime_device_for(built.gpu_class) if backend == "onnxruntime"
                  else "cuda:0")
    threads = _profiling_threads(built, device)
    busy = _busy_workers(built, device)
    kw = {"intra_op_threads": threads} if threads is not None else {}
    tables = {}
    for share in mps_shares:
        rows = []
        label = f"{busy} workers at once" if share == 1 and busy > 1 else f"share {share}"
        for b in _progress(range(built.num_blocks),
                           f"{built.model_name}: profile blocks ({label})", progress):
            if share == 1 and busy == 1:
                with built.open_backend(b, b, backend, device, **kw) as runner:
                    rows.append(profile_backend_latency_us(runner, built.max_batch, warmup, repeats))
            elif share == 1:
                with ExitStack() as stack:
                    copies = [stack.enter_context(built.open_backend(b, b, backend, device, **kw))
                              for _ in range(busy)]
                    rows.append(profile_busy_latency_us(copies, built.max_batch, warmup,
                                                        repeats))
            else:
                suffix = ".plan" if backend == "tensorrt" else ".onnx"
                recipe = BackendRecipe(backend, str(built.stage_path(b, b, suffix)), device,
                                       built.gpu_class)
                rows.append(profile_concurrent_latency_us(recipe, share, built.max_batch,
                                                          warmup, repeats))
        tables[(built.gpu_class, share)] = BlockLatencyTable(built.model_name, built.gpu_class,
                                                             share, tuple(rows))
    with built.open_backend(0, built.num_blocks - 1, backend, device, **kw) as whole:
        feeds = random_inputs(whole.inputs, 1)
        full_us = median_latency_us(lambda: whole.infer(feeds), warmup, repeats)
    manifest = built.manifest
    fp16 = bool(manifest["partition"].get("fp16_cuts"))
    prof = ModelProfile(
        model=built.model_name, num_blocks=built.num_blocks,
        cut_bytes_per_sample=built.cut_bytes_per_sample(fp16), tables=tables,
        full_model_latency_us={built.gpu_class: full_us},
        input_bytes_per_sample=sum(s.bytes_per_sample for s in built.inputs),
        output_bytes_per_sample=sum(s.bytes_per_sample for s in built.outputs))
    meta = {"content_hash": built.content_hash, "backend": backend,
            "backend_version": manifest["backend_version"], "device": manifest["device"],
            "profiled_on": device, "intra_op_threads": threads,
            **({"warning": f"GPU class {built.gpu_class!r} profiled on the CPU (no CUDA "
                           "execution provider / TensorRT here): latencies are not the GPU's"}
               if built.gpu_class != CPU_CLASS and device == "cpu" else {}),
            "precision": manifest["precision"], "warmup": warmup, "repeats": repeats,
            "statistic": "median wall time of backend.infer incl. host copies, us",
            "mps_shares": list(mps_shares),
            "busy_workers": busy,
            "mps_note": (f"CPU: one share (one worker: {threads} ONNX Runtime thread(s), as "
                         f"the server runs it), timed with {busy} such workers running the "
                         "block at once (one per usable core)" if built.gpu_class == CPU_CLASS
                         else "share m: m processes run the block at once"
                         + ("" if len(mps_shares) > 1 else
                            " (only share 1: no MPS daemon or GPU older than Volta)")),
            "block_node_ranges": [list(r) for r in built.block_node_ranges],
            "partition_bounds": [manifest["partition"].get("lower"), manifest["partition"].get("upper")]}
    return write_profile(built.profile_path, prof, meta)
