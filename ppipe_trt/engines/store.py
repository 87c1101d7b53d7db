"""The artifact store: ``engines/<gpu_class>/<model>/...``, content-addressed.

Layout (``<hash>`` covers the source model bytes, the block count, the backend and its
version, the maximum batch, the precision and the GPU class)::

    <root>/<gpu_class>/<model>/CURRENT                 hash of the build in use
    <root>/<gpu_class>/<model>/profile.json            what the planner reads
    <root>/<gpu_class>/<model>/<hash>/manifest.json    partition, I/O, backend, versions
    <root>/<gpu_class>/<model>/<hash>/model.onnx       normalized full model (dynamic batch)
    <root>/<gpu_class>/<model>/<hash>/node_latency_us.json
    <root>/<gpu_class>/<model>/<hash>/stages/stage_<first>_<last>.onnx   block-range sub-graphs
    <root>/<gpu_class>/<model>/<hash>/stages/stage_<first>_<last>.plan   TensorRT engines (+ .json)
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ppipe_trt.engines.backends.base import Backend, TensorSpec
from ppipe_trt.errors import (BadInputError, EngineBuildError, EngineMismatchError,
                              ProfileFormatError)

log = logging.getLogger("ppipe.engines")

MANIFEST_FORMAT = "ppipe-trt-engines"
MANIFEST_VERSION = 1
_STAGE_LOCK = threading.Lock()


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_sha256(path: Path | str) -> str:
    """Hash of an ONNX model *with* its external data files (weights saved beside the graph,
    as PyTorch's dynamo exporter does), so that new weights make a new build.  A model
    without external data hashes as its file alone."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    path = Path(path)
    own = sha256_file(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not readable as ONNX: the build will say so; hash the bytes
        return own
    locations = sorted({e.value for t in model.graph.initializer if uses_external_data(t)
                        for e in t.external_data if e.key == "location"})
    if not locations:
        return own
    h = hashlib.sha256(own.encode())
    for loc in locations:
        h.update(loc.encode())
        h.update(sha256_file(path.parent / loc).encode())
    return h.hexdigest()


def content_hash(fields: dict[str, Any]) -> str:
    """Short stable hash of the build inputs (a JSON-able dict)."""
    blob = json.dumps({"store_version": MANIFEST_VERSION, **fields}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def safe_path_name(name: str, what: str = "model name") -> str:
    """``name`` if it can name one directory under a root (not empty, ``.`` or ``..``; no
    ``/``, ``\\`` or NUL; not absolute), else ``BadInputError``: a name from a user never
    reaches outside the store or repository it is looked up in."""
    if (not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0")
            or Path(name).is_absolute()):
        raise BadInputError(f"{what} {name!r} cannot name a directory: expected one path "
                            "component (no '/', '\\', NUL, '.' or '..')")
    return name


def model_dir(store_root: Path | str, gpu_class: str, model_name: str) -> Path:
    """The store's folder of ``model_name`` built for ``gpu_class``; ``BadInputError`` for a
    name that would lead outside the store."""
    return (Path(store_root) / safe_path_name(gpu_class, "GPU class")
            / safe_path_name(model_name))


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def read_manifest(build_dir: Path) -> dict[str, Any]:
    path = build_dir / "manifest.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileFormatError(f"{path}: no manifest; build the engines first "
                                 "(ppipe engines build MODEL)") from None
    except json.JSONDecodeError as exc:
        raise ProfileFormatError(f"{path}: invalid JSON ({exc})") from None
    if data.get("format") != MANIFEST_FORMAT or data.get("version") != MANIFEST_VERSION:
        raise ProfileFormatError(f"{path}: not a {MANIFEST_FORMAT} v{MANIFEST_VERSION} manifest")
    return data


def _specs(raw: list) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(s["name"], s["dtype"], tuple(s["shape"])) for s in raw)


def spec_dicts(specs: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
    return [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in specs]


@dataclass(frozen=True)
class BuiltModel:
    """A built model in the store: its blocks, sub-graphs and profile.

    Blocks are numbered ``0 .. num_blocks-1``; a stage is an inclusive block range.  Files
    returned by :meth:`stage_onnx` belong to the store (do not delete them while in use).
    """

    model_name: str
    gpu_class: str
    num_blocks: int
    full_onnx: Path
    profile_path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    build_dir: Path
    content_hash: str
    block_node_ranges: tuple[tuple[int, int], ...]
    backend: str
    max_batch: int

    @classmethod
    def from_manifest(cls, build_dir: Path) -> "BuiltModel":
        m = read_manifest(build_dir)
        return cls(
            model_name=m["model"], gpu_class=m["gpu_class"], num_blocks=int(m["num_blocks"]),
            full_onnx=build_dir / "model.onnx", profile_path=build_dir.parent / "profile.json",
            inputs=_specs(m["inputs"]), outputs=_specs(m["outputs"]), build_dir=build_dir,
            content_hash=m["content_hash"],
            block_node_ranges=tuple((int(a), int(b)) for a, b in m["block_node_ranges"]),
            backend=m["backend"], max_batch=int(m["max_batch"]))

    @cached_property
    def manifest(self) -> dict[str, Any]:
        return read_manifest(self.build_dir)

    @cached_property
    def graph(self):
        """The analysed full model (:class:`ppipe_trt.engines.graph.ModelGraph`), loaded once."""
        from ppipe_trt.engines.graph import ModelGraph

        return ModelGraph(__import__("onnx").load(str(self.full_onnx)))

    def _check_range(self, first_block: int, last_block: int) -> tuple[int, int]:
        if not 0 <= first_block <= last_block < self.num_blocks:
            raise BadInputError(f"{self.model_name}: block range {first_block}..{last_block}; "
                                f"expected 0 <= first <= last <= {self.num_blocks - 1}")
        return self.block_node_ranges[first_block][0], self.block_node_ranges[last_block][1]

    def stage_path(self, first_block: int, last_block: int, suffix: str = ".onnx") -> Path:
        self._check_range(first_block, last_block)
        return self.build_dir / "stages" / f"stage_{first_block}_{last_block}{suffix}"

    def stage_onnx(self, first_block: int, last_block: int) -> Path:
        """Sub-graph of blocks ``first_block..last_block``, extracted on first use and cached.

        Inputs: the tensors crossing the cut before ``first_block`` (model inputs for block 0);
        outputs: those crossing the cut after ``last_block`` (model outputs for the last block),
        pass-through tensors included.  Dim 0 is the dynamic batch."""
        first_node, last_node = self._check_range(first_block, last_block)
        path = self.stage_path(first_block, last_block)
        checksum = path.with_name(path.name + ".sha256")
        with _STAGE_LOCK:
            if path.exists() and checksum.exists() and \
                    checksum.read_text().strip() == sha256_file(path):
                return path
            if path.exists():  # a cache: rebuilt from model.onnx rather than trusted
                log.warning("%s does not match its checksum (corrupt or from an interrupted "
                            "build); extracting it again", path)
            from ppipe_trt.engines.subgraph import extract_stage, save_model

            model = extract_stage(self.graph, first_node, last_node,
                                  name=f"blocks_{first_block}_{last_block}")
            save_model(model, path)
            checksum.write_text(sha256_file(path) + "\n")
        return path

    def stage_io(self, first_block: int, last_block: int
                 ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        """(input specs, output specs) of the stage, without extracting it."""
        from ppipe_trt.engines.subgraph import stage_io_names

        first_node, last_node = self._check_range(first_block, last_block)
        ins, outs = stage_io_names(self.graph, first_node, last_node)
        return self.graph.specs(ins), self.graph.specs(outs)

    def cut_bytes_per_sample(self, fp16: bool = False) -> tuple[int, ...]:
        """Bytes per sample crossing each of the ``num_blocks - 1`` cuts between blocks."""
        cuts = self.graph.cut_bytes_per_sample(fp16_floats=fp16)
        return tuple(int(cuts[last]) for _, last in self.block_node_ranges[:-1])

    def open_backend(self, first_block: int, last_block: int, backend: str = "onnxruntime",
                     device: str = "cpu", **kw) -> Backend:
        """An executor of blocks ``first_block..last_block``, not loaded yet.

        ``backend``: "onnxruntime" (``device`` "cpu" or "cuda[:N]"; keyword arguments go to
        :class:`OnnxRuntimeBackend`), "tensorrt" (builds the stage engine on first use; needs
        TensorRT) or "torch" (built-in models, whole-model range only; needs PyTorch)."""
        if backend == "onnxruntime":
            from ppipe_trt.engines.backends.onnxruntime_backend import OnnxRuntimeBackend

            kw.setdefault("max_batch", self.max_batch)
            return OnnxRuntimeBackend(self.stage_onnx(first_block, last_block), device, **kw)
        if backend == "tensorrt":
            from ppipe_trt.engines.backends.tensorrt_backend import TensorRTBackend, ensure_engine

            plan = ensure_engine(self.stage_onnx(first_block, last_block),
                                 self.stage_path(first_block, last_block, ".plan"),
                                 gpu_class=self.gpu_class, max_batch=self.max_batch,
                                 source_sha256=self.manifest["source_sha256"],
                                 block_range=(first_block, last_block),
                                 precision=self.manifest.get("precision", "tf32"),
                                 timing_cache=self.build_dir.parent / "timing.cache")
            return TensorRTBackend(plan, expected_gpu_class=self.gpu_class,
                                   device_index=int(device.partition(":")[2] or 0), **kw)
        if backend == "torch":
            if (first_block, last_block) != (0, self.num_blocks - 1):
                raise BadInputError(
                    f"torch backend runs whole built-in models only; asked for blocks "
                    f"{first_block}..{last_block} of {self.num_blocks}")
            from ppipe_trt.engines.backends.torch_backend import TorchBackend

            return TorchBackend.for_builtin(self.model_name, device=device, **kw)
        raise BadInputError(f"backend {backend!r}; expected 'onnxruntime', 'tensorrt' or 'torch'")


def open_built_model(model_name: str, gpu_class: str, store_root: Path | str = "engines") -> BuiltModel:
    """The current build of ``model_name`` for ``gpu_class`` in ``store_root``."""
    mdir = model_dir(store_root, gpu_class, model_name)
    current = mdir / "CURRENT"
    if not current.exists():
        have = sorted(p.parent.name for p in Path(store_root).glob(f"*/{model_name}/CURRENT"))
        raise BadInputError(
            f"no build of {model_name!r} for GPU class {gpu_class!r} in {store_root}"
            + (f" (built for: {', '.join(have)})" if have else "")
            + f"; run: ppipe engines build {model_name} --gpu-class {gpu_class}")
    build_dir = mdir / current.read_text().strip()
    try:
        built = BuiltModel.from_manifest(build_dir)
    except ProfileFormatError as exc:
        raise EngineBuildError(f"{exc}; rebuild it: ppipe engines build MODEL --gpu-class "
                               f"{gpu_class}") from None
    problem = build_problem(built)
    if problem is not None:
        raise EngineMismatchError(f"{model_name} for {gpu_class} in {store_root}: {problem}; "
                                  f"rebuild it: {rebuild_command(built)}")
    return built


def rebuild_command(built: BuiltModel) -> str:
    """The command that rebuilds ``built`` (recorded at build time)."""
    return built.manifest.get("rebuild_command") or (
        f"ppipe engines build {built.manifest.get('source', built.model_name)} "
        f"--gpu-class {built.gpu_class}")


def build_problem(built: BuiltModel, check_source: bool = True) -> str | None:
    """Why ``built`` cannot be used as it is (stale or corrupt), or None when it is sound.

    Checks: the normalized model exists and matches its recorded checksum; it was built by
    the current build algorithm; its source model (when still on disk and ``check_source``)
    has not changed since; its profile is readable.  Block sub-graphs are caches that
    :meth:`BuiltModel.stage_onnx` re-extracts when they do not match their checksums.
    """
    from ppipe_trt.engines.build import BUILD_ALGORITHM_VERSION

    m = built.manifest
    if not m.get("complete"):
        return f"the build in {built.build_dir} did not finish"
    if not built.full_onnx.exists():
        return f"{built.full_onnx} is missing"
    if m.get("model_sha256") and sha256_file(built.full_onnx) != m["model_sha256"]:
        return f"{built.full_onnx} is corrupt (its checksum differs from the manifest's)"
    if m.get("algorithm") != BUILD_ALGORITHM_VERSION:
        return (f"stale: built by build algorithm v{m.get('algorithm')}, this ppipe-trt "
                f"builds v{BUILD_ALGORITHM_VERSION}")
    source = Path(m.get("source", ""))
    if check_source and source.is_file() and model_sha256(source) != m["source_sha256"]:
        return f"stale: its source {source} changed since the build"
    if built.profile_path.exists():
        from ppipe_trt.profiles import read_profile

        try:
            read_profile(built.profile_path)
        except ProfileFormatError as exc:
            return f"its profile is unreadable ({exc})"
    return None
