"""Read the PPipe artifact's pre-partitioning inputs and outputs (for validation/benchmarks).

Files under a PPipe profile folder (see its README):

* ``node-profile-no-const/<model>-<gpu>.csv``: ``node,latency`` (us, batch 1), topological order;
* ``cuts-no-const/<model>.json``: ``[{"node", "cut": [tensor, ...]}]`` for ``$input$``, every
  node, then ``$output$``;
* ``shapes/<model>.json``: ``{tensor: {"dtype", "shape"}}`` (batch dimension negative);
* ``prepartition_mappings/<model>/contraction_mapping_ilpprepart<N>-<lo>-<hi>.csv``:
  ``node,block_id`` (no header).

Cut sizes follow the artifact's convention by default: float32 counted as 2 bytes (the cuts
are sent in fp16) and int64 as 4 bytes.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ppipe_trt.errors import ProfileFormatError

ARTIFACT_GPU_CLASSES = ("V100", "L4", "T4", "P4")
_MAPPING_RE = re.compile(r"contraction_mapping_ilpprepart(\d+)-([0-9.]+)-([0-9.]+)\.csv$")


@dataclass(frozen=True, slots=True)
class ArtifactModel:
    """Pre-partitioning inputs of one artifact model, plus the artifact's own answer.

    ``node_latency_us[gpu][j]``: node ``j``'s latency; ``cut_bytes[j]``: bytes per sample
    crossing a cut after node ``j`` (``L - 1`` values); ``artifact_block_ids[j]``: the block
    the artifact put node ``j`` in; ``artifact_bounds``: (N, lower, upper) from its file name.
    """

    name: str
    node_names: tuple[str, ...]
    node_latency_us: dict[str, tuple[float, ...]]
    cut_bytes: tuple[int, ...]
    artifact_block_ids: tuple[int, ...]
    artifact_bounds: tuple[int, float, float]


def tensor_bytes_per_sample(shape: list[int], dtype: str, fp16_floats: bool = True) -> int:
    """Bytes per sample of one tensor: |dims| product (batch dim is -1), artifact itemsizes."""
    count = int(np.prod([abs(int(d)) for d in shape], dtype=np.int64)) if shape else 1
    dt = np.dtype(dtype)
    if dt == np.float32 and fp16_floats:
        itemsize = 2
    elif dt == np.int64 and fp16_floats:
        itemsize = 4
    else:
        itemsize = dt.itemsize
    return count * itemsize


def artifact_model_names(root: Path | str) -> list[str]:
    """Models that have a pre-partition mapping in the artifact folder."""
    base = Path(root) / "prepartition_mappings"
    if not base.is_dir():
        raise ProfileFormatError(f"{base}: not found; expected the PPipe artifact's data folder")
    return sorted(p.name for p in base.iterdir() if p.is_dir() and any(p.glob("contraction_mapping_*")))


def load_artifact_model(root: Path | str, name: str, fp16_floats: bool = True) -> ArtifactModel:
    root = Path(root)
    latencies: dict[str, tuple[float, ...]] = {}
    node_names: tuple[str, ...] | None = None
    for gpu in ARTIFACT_GPU_CLASSES:
        path = root / "node-profile-no-const" / f"{name}-{gpu}.csv"
        if not path.exists():
            continue
        with path.open() as f:
            rows = list(csv.DictReader(f))
        names = tuple(r["node"] for r in rows)
        if node_names is not None and names != node_names:
            raise ProfileFormatError(f"{path}: node list differs from the other GPU classes")
        node_names = names
        latencies[gpu] = tuple(float(r["latency"]) for r in rows)
    if node_names is None:
        raise ProfileFormatError(f"no node-profile-no-const/{name}-<gpu>.csv under {root}")

    shapes = json.loads((root / "shapes" / f"{name}.json").read_text())
    cuts = json.loads((root / "cuts-no-const" / f"{name}.json").read_text())
    # [$input$, node_0 .. node_{L-1}, $output$]; cut after node j is entry j + 1.
    if len(cuts) != len(node_names) + 2 or cuts[1]["node"] != node_names[0]:
        raise ProfileFormatError(f"{name}: cuts file has {len(cuts)} entries for "
                                 f"{len(node_names)} nodes; expected nodes + 2")
    size = {t: tensor_bytes_per_sample(v["shape"], v["dtype"], fp16_floats) for t, v in shapes.items()}
    cut_bytes = tuple(int(sum(size[t] for t in entry["cut"])) for entry in cuts[1:len(node_names)])

    mapping_files = sorted((root / "prepartition_mappings" / name).glob("contraction_mapping_*.csv"))
    if not mapping_files:
        raise ProfileFormatError(f"{name}: no contraction_mapping_*.csv")
    match = _MAPPING_RE.search(mapping_files[0].name)
    if not match:
        raise ProfileFormatError(f"{mapping_files[0]}: unexpected file name")
    bounds = (int(match.group(1)), float(match.group(2)), float(match.group(3)))
    with mapping_files[0].open() as f:
        mapping = [(row[0], int(row[1])) for row in csv.reader(f) if row]
    if tuple(n for n, _ in mapping) != node_names:
        raise ProfileFormatError(f"{mapping_files[0]}: node list differs from the node profile")
    return ArtifactModel(name, node_names, latencies, cut_bytes,
                         tuple(b for _, b in mapping), bounds)
