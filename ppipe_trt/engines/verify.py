"""Check that chained stage sub-graphs reproduce the full model (ONNX Runtime, CPU)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ppipe_trt.engines.graph import random_inputs
from ppipe_trt.engines.store import BuiltModel


@dataclass(frozen=True, slots=True)
class ChainCheck:
    """Largest relative error of the chained stages against the full model.

    Relative error of one output = max |chained - full| / max |full| (norm-wise, so values
    near zero do not blow it up); ``max_rel_error`` is the largest over outputs and batches.
    """

    stage_ranges: tuple[tuple[int, int], ...]
    batches: tuple[int, ...]
    fp16_cuts: bool
    max_rel_error: float
    per_output: dict[str, float]


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    if actual.shape != reference.shape:
        return float("inf")
    ref = reference.astype(np.float64)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    diff = float(np.max(np.abs(actual.astype(np.float64) - ref))) if ref.size else 0.0
    return diff / scale if scale > 0 else diff


def run_chain(built: BuiltModel, stage_ranges: Sequence[tuple[int, int]],
              feeds: dict[str, np.ndarray], fp16_cuts: bool = False,
              backends: dict | None = None) -> dict[str, np.ndarray]:
    """Run stages in order, passing tensors by name; with ``fp16_cuts`` float tensors are
    rounded to float16 at every cut (as if sent in fp16).  Returns the last stage's outputs."""
    env = dict(feeds)
    out: dict[str, np.ndarray] = {}
    for k, (first, last) in enumerate(stage_ranges):
        runner = backends[(first, last)] if backends else built.open_backend(first, last).load()
        try:
            out = runner.infer({s.name: env[s.name] for s in runner.inputs})
        finally:
            if not backends:
                runner.close()
        if fp16_cuts and k < len(stage_ranges) - 1:
            out = {n: (a.astype(np.float16).astype(a.dtype) if a.dtype in (np.float32, np.float64) else a)
                   for n, a in out.items()}
        env.update({n: np.array(a, copy=True) for n, a in out.items()})
    return out


def check_chain(built: BuiltModel, stage_ranges: Sequence[tuple[int, int]] | None = None,
                batches: Sequence[int] | None = None, fp16_cuts: bool = False,
                seed: int = 0) -> ChainCheck:
    """Chain ``stage_ranges`` (default: every block alone) at each batch (default 1 and
    max_batch) on random inputs and compare with the full model."""
    ranges = tuple(stage_ranges or [(b, b) for b in range(built.num_blocks)])
    if ranges[0][0] != 0 or ranges[-1][1] != built.num_blocks - 1 or any(
            a[1] + 1 != b[0] for a, b in zip(ranges, ranges[1:])):
        from ppipe_trt.errors import BadInputError

        raise BadInputError(f"stage ranges {ranges} must cover blocks 0..{built.num_blocks - 1} "
                            "contiguously")
    batches = tuple(batches or sorted({1, built.max_batch}))
    per_output: dict[str, float] = {}
    backends = {r: built.open_backend(*r).load() for r in ranges}
    full = built.open_backend(0, built.num_blocks - 1).load()
    try:
        for batch in batches:
            feeds = random_inputs(built.inputs, batch, seed)
            reference = full.infer(feeds)
            chained = run_chain(built, ranges, feeds, fp16_cuts, backends)
            for spec in built.outputs:
                err = relative_error(chained[spec.name], reference[spec.name])
                per_output[spec.name] = max(per_output.get(spec.name, 0.0), err)
    finally:
        full.close()
        for runner in backends.values():
            runner.close()
    return ChainCheck(ranges, batches, fp16_cuts, max(per_output.values()), per_output)
