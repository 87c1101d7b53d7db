#!/usr/bin/env python3
"""Measure a stage worker's start-up: open its ONNX Runtime engine and warm it up.

What the live runtime does before a plan swap's added worker can take batches
(``ppipe_trt.serving.specs.open_executor``): load the stage's ONNX sub-graph into an ONNX
Runtime session and run zeros at batch 1 and the max batch once.  The engines are built
offline (``make serve`` / ``ppipe engines build``); this times only opening them.

    scripts/measure_worker_startup.py --build-dir engines/cpu/demo_resnet/<hash> [--repeat 5]

The build folder is copied to a scratch folder first (stage sub-graphs not yet extracted are
extracted there, untimed), so the store is only read.  Prints per stage range the median
open + warm-up time and the median over ranges (the simulator's default
``SwapCosts.worker_startup_s``).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", required=True, help="an engine build folder (manifest.json)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--ranges", default="0-9,0-4,5-9,0-0,1-9",
                    help="block ranges (first-last) to open, comma separated")
    args = ap.parse_args(argv)
    from ppipe_trt.engines.store import BuiltModel
    from ppipe_trt.serving.executors import BackendExecutor

    with tempfile.TemporaryDirectory() as tmp:
        build = Path(tmp) / "build"
        shutil.copytree(args.build_dir, build)
        built = BuiltModel.from_manifest(build)
        ranges = [tuple(int(x) for x in r.split("-")) for r in args.ranges.split(",")]
        for first, last in ranges:
            built.stage_onnx(first, last)          # extraction is offline work: not timed
        medians = []
        for first, last in ranges:
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                ex = BackendExecutor(built.open_backend(first, last, "onnxruntime", "cpu",
                                                        intra_op_threads=1))
                ex.warm_up(built.max_batch)
                times.append(time.perf_counter() - t0)
                ex.close()
            med = statistics.median(times)
            medians.append(med)
            print(f"blocks {first}..{last}: open + warm-up median {1e3 * med:.0f} ms "
                  f"(min {1e3 * min(times):.0f}, max {1e3 * max(times):.0f}, n={len(times)})")
        print(f"median over ranges: {1e3 * statistics.median(medians):.0f} ms; "
              f"max {1e3 * max(medians):.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
