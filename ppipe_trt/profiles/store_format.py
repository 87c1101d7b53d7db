"""The project's own profile file, ``profile.json``, written by the engine profiler.

One file per (model, GPU class), in ``engines/<gpu_class>/<model>/profile.json``::

    {
      "format": "ppipe-trt-profile", "version": 1,
      "model": "demo_resnet",
      "num_blocks": 4,
      "cut_bytes_per_sample": [131072, 65536, 32768],
      "input_bytes_per_sample": 150528, "output_bytes_per_sample": 4000,
      "full_model_latency_us": {"cpu": 2100.0},
      "tables": [{"gpu_class": "cpu", "mps_share": 1,
                  "latency_us": [[b0 at batch 1, batch 2, ...], [b1 ...], ...]}],
      "meta": {... free-form: backend, device name, block node names, engine hashes ...}
    }

Several files of the same model (one per GPU class) merge into one :class:`ModelProfile`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from ppipe_trt.errors import ProfileFormatError
from ppipe_trt.profiles.types import BlockLatencyTable, ModelProfile, ProfileSet

FORMAT_NAME = "ppipe-trt-profile"
FORMAT_VERSION = 1
PROFILE_FILENAME = "profile.json"


def profile_to_dict(profile: ModelProfile, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model": profile.model,
        "num_blocks": profile.num_blocks,
        "cut_bytes_per_sample": list(profile.cut_bytes_per_sample),
        "input_bytes_per_sample": profile.input_bytes_per_sample,
        "output_bytes_per_sample": profile.output_bytes_per_sample,
        "full_model_latency_us": dict(profile.full_model_latency_us),
        "tables": [
            {"gpu_class": t.gpu_class, "mps_share": t.mps_share,
             "latency_us": [list(row) for row in t.latency_us]}
            for _, t in sorted(profile.tables.items())
        ],
        "meta": meta or {},
    }


def write_profile(path: Path | str, profile: ModelProfile, meta: dict[str, Any] | None = None) -> Path:
    """Write ``profile`` as JSON (atomically: a reader never sees a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(profile_to_dict(profile, meta), indent=1))
    tmp.replace(path)
    return path


def profile_from_dict(data: Any, where: str = "profile") -> ModelProfile:
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ProfileFormatError(f"{where}: not a {FORMAT_NAME} file (missing \"format\")")
    if data.get("version") != FORMAT_VERSION:
        raise ProfileFormatError(
            f"{where}: profile format version {data.get('version')!r}; this build reads {FORMAT_VERSION}"
        )
    try:
        model = str(data["model"])
        tables = {}
        for entry in data["tables"]:
            gpu, mps = str(entry["gpu_class"]), int(entry["mps_share"])
            rows = tuple(tuple(float(v) for v in row) for row in entry["latency_us"])
            tables[(gpu, mps)] = BlockLatencyTable(model, gpu, mps, rows)
        return ModelProfile(
            model=model,
            num_blocks=int(data["num_blocks"]),
            cut_bytes_per_sample=tuple(int(v) for v in data["cut_bytes_per_sample"]),
            tables=tables,
            full_model_latency_us={str(k): float(v) for k, v in data.get("full_model_latency_us", {}).items()},
            input_bytes_per_sample=int(data.get("input_bytes_per_sample", 0)),
            output_bytes_per_sample=int(data.get("output_bytes_per_sample", 0)),
        )
    except ProfileFormatError as exc:
        raise ProfileFormatError(f"{where}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ProfileFormatError(f"{where}: malformed profile ({type(exc).__name__}: {exc})") from None


def read_profile(path: Path | str) -> tuple[ModelProfile, dict[str, Any]]:
    """Read one ``profile.json``; returns the profile and its free-form ``meta``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileFormatError(f"{path}: no such profile file") from None
    except json.JSONDecodeError as exc:
        raise ProfileFormatError(f"{path}: invalid JSON ({exc})") from None
    return profile_from_dict(data, str(path)), dict(data.get("meta") or {})


def merge_profiles(a: ModelProfile, b: ModelProfile) -> ModelProfile:
    """One profile with the tables of both; they must describe the same blocks."""
    if a.num_blocks != b.num_blocks or a.cut_bytes_per_sample != b.cut_bytes_per_sample:
        raise ProfileFormatError(
            f"{a.model}: profiles disagree on the blocks ({a.num_blocks} blocks, cuts "
            f"{list(a.cut_bytes_per_sample)} vs {b.num_blocks} blocks, cuts "
            f"{list(b.cut_bytes_per_sample)}); rebuild the engines with the same partition"
        )
    return ModelProfile(
        model=a.model,
        num_blocks=a.num_blocks,
        cut_bytes_per_sample=a.cut_bytes_per_sample,
        tables={**a.tables, **b.tables},
        full_model_latency_us={**a.full_model_latency_us, **b.full_model_latency_us},
        input_bytes_per_sample=a.input_bytes_per_sample or b.input_bytes_per_sample,
        output_bytes_per_sample=a.output_bytes_per_sample or b.output_bytes_per_sample,
    )


def load_store_profiles(root: Path | str, models: Iterable[str] | None = None) -> ProfileSet:
    """Load every ``profile.json`` under ``root`` (an engines/ store, or one file)."""
    root = Path(root)
    paths = [root] if root.is_file() else sorted(root.rglob(PROFILE_FILENAME))
    if not paths:
        raise ProfileFormatError(
            f"{root}: no {PROFILE_FILENAME} found; build engines first (make engines GPU_CLASS=...)"
        )
    merged: dict[str, ModelProfile] = {}
    for path in paths:
        profile, _ = read_profile(path)
        merged[profile.model] = (merge_profiles(merged[profile.model], profile)
                                 if profile.model in merged else profile)
    result = ProfileSet(merged, str(root))
    return result if models is None else result.subset(models)
