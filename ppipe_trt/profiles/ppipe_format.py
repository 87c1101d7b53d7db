"""Reader for the public PPipe artifact's profile folder (``../shared/ppipe-profiles``).

Layout (see that folder's README)::

    block-timing-tf32/<model>-<gpu>-<mps>.csv      rows = blocks, columns = batch 1..N, in us
    prepartition_mappings/<model>/contraction_trans-size_<tag>.csv   one row per cut, bytes/sample
    full_model_latency_us.csv                      dnn,gpu,bs,mean_compute_us,samples
    shapes/<model>.json                            tensor shapes, for input/output sizes
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Iterable

import numpy as np

from ppipe_trt.errors import ProfileFormatError
from ppipe_trt.profiles.types import BlockLatencyTable, ModelProfile, ProfileSet

_TIMING_DIR = "block-timing-tf32"
_TIMING_NAME = re.compile(r"^(?P<model>.+)-(?P<gpu>[A-Za-z][A-Za-z0-9]*)-(?P<mps>\d+)\.csv$")


def is_ppipe_profile_dir(path: Path) -> bool:
    return (Path(path) / _TIMING_DIR).is_dir()


def _read_numeric_csv(path: Path) -> list[list[float]]:
    rows: list[list[float]] = []
    with open(path, newline="") as fh:
        for lineno, row in enumerate(csv.reader(fh), start=1):
            cells = [c.strip() for c in row if c.strip()]
            if not cells:
                continue
            try:
                rows.append([float(c) for c in cells])
            except ValueError:
                raise ProfileFormatError(
                    f"{path}:{lineno}: expected numbers, got {row!r}"
                ) from None
    if not rows:
        raise ProfileFormatError(f"{path}: file is empty; expected one row per block")
    return rows


def _cut_bytes(root: Path, model: str, num_blocks: int) -> tuple[int, ...]:
    folder = root / "prepartition_mappings" / model
    candidates = sorted(folder.glob("contraction_trans-size_*.csv"))
    if not candidates:
        raise ProfileFormatError(
            f"{folder}: no contraction_trans-size_*.csv; expected the bytes per sample at each cut"
        )
    for path in candidates:
        rows = _read_numeric_csv(path)
        if any(len(r) != 1 for r in rows):
            raise ProfileFormatError(f"{path}: expected one number per row (bytes per sample)")
        if len(rows) == num_blocks - 1:
            return tuple(int(r[0]) for r in rows)
    raise ProfileFormatError(
        f"{folder}: no cut-size file with {num_blocks - 1} rows for {num_blocks} blocks "
        f"(found {[p.name for p in candidates]})"
    )


def _full_model_latency(root: Path) -> dict[str, dict[str, float]]:
    path = root / "full_model_latency_us.csv"
    out: dict[str, dict[str, float]] = {}
    if not path.exists():
        return out
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                if int(row["bs"]) != 1:
                    continue
                out.setdefault(row["dnn"], {})[row["gpu"]] = float(row["mean_compute_us"])
            except (KeyError, ValueError) as exc:
                raise ProfileFormatError(f"{path}: bad row {row!r}: {exc}") from None
    return out


def _io_bytes(root: Path, model: str) -> tuple[int, int]:
    """Bytes per sample of the model's first input and of all tensors nothing consumes.

    The shapes file lists every tensor; its first entry is the input.  The output size is not
    recoverable from it without the graph, so it is reported as 0 (the planner ignores it).
    """
    path = root / "shapes" / f"{model}.json"
    if not path.exists():
        return 0, 0
    try:
        shapes = json.loads(path.read_text())
        first = next(iter(shapes.values()))
        dims = [abs(int(d)) for d in first["shape"][1:]]
        itemsize = np.dtype(first["dtype"]).itemsize
    except (ValueError, KeyError, StopIteration, TypeError) as exc:
        raise ProfileFormatError(f"{path}: cannot read the input tensor's shape: {exc}") from None
    return int(np.prod(dims)) * itemsize, 0


def available_models(root: Path) -> list[str]:
    root = Path(root)
    names = set()
    for path in (root / _TIMING_DIR).glob("*.csv"):
        match = _TIMING_NAME.match(path.name)
        if match:
            names.add(match["model"])
    return sorted(names)


def load_ppipe_profiles(root: Path | str, models: Iterable[str] | None = None) -> ProfileSet:
    """Load the PPipe artifact's profiles of ``models`` (all of them when None)."""
    root = Path(root)
    if not is_ppipe_profile_dir(root):
        raise ProfileFormatError(
            f"{root}: not a PPipe profile folder (no {_TIMING_DIR}/ inside); pass --profiles DIR "
            "pointing at ../shared/ppipe-profiles or at an engines/ store"
        )
    files: dict[str, list[tuple[str, int, Path]]] = {}
    for path in sorted((root / _TIMING_DIR).glob("*.csv")):
        match = _TIMING_NAME.match(path.name)
        if not match:
            raise ProfileFormatError(f"{path}: name does not follow <model>-<gpu>-<mps>.csv")
        files.setdefault(match["model"], []).append((match["gpu"], int(match["mps"]), path))
    wanted = sorted(files) if models is None else list(models)
    full = _full_model_latency(root)
    out: dict[str, ModelProfile] = {}
    for model in wanted:
        if model not in files:
            raise ProfileFormatError(
                f"no block timings for model {model!r} under {root / _TIMING_DIR}; "
                f"known models: {', '.join(sorted(files))}"
            )
        tables = {}
        for gpu, mps, path in files[model]:
            rows = _read_numeric_csv(path)
            tables[(gpu, mps)] = BlockLatencyTable(model, gpu, mps, tuple(tuple(r) for r in rows))
        num_blocks = next(iter(tables.values())).num_blocks
        in_bytes, out_bytes = _io_bytes(root, model)
        out[model] = ModelProfile(
            model=model,
            num_blocks=num_blocks,
            cut_bytes_per_sample=_cut_bytes(root, model, num_blocks),
            tables=tables,
            full_model_latency_us=full.get(model, {}),
            input_bytes_per_sample=in_bytes,
            output_bytes_per_sample=out_bytes,
        )
    return ProfileSet(out, str(root))
