#!/usr/bin/env python3
"""Benchmark: wall time of a 30-simulated-second run at load 1.0 (PPipe plans, 100 GPUs).

For each configuration of the paper's setting: ``--repeat`` runs (reservation scheduler,
Poisson arrivals, no warm-up, so exactly 30 s are simulated), the median wall time, the
simulated requests and requests per wall second.  The public artifact's Java simulator, built
and run on the same plans, takes a median of 4.5 s per run (about 5 400 simulated requests
per wall second); that figure is the baseline column (not re-measured by this script).

    scripts/bench_simulator.py [--profiles DIR] [--only 2:L4-T4 ...] [--repeat 3]
        [--python-scheduler]

``--python-scheduler``: also run every configuration on the Python reference of the
reservation scheduler (``PPIPE_NATIVE=0``; runs interleaved with the compiled one's, same
seeds) and give its median wall time and the ratio, measured in the same run.  The two make
the same decisions (the runs' request and event counts are checked equal).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

JAVA_MEDIAN_S = 4.5


def main(argv=None) -> int:
    from ppipe_trt.cluster import load_paper_setting
    from ppipe_trt.profiles import default_profiles_dir, load_profiles
    from ppipe_trt.simulator import SimConfig, simulate
    sys.path.insert(0, str(ROOT / "scripts"))
    from reproduce_paper import _plan

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default=str(default_profiles_dir()))
    ap.add_argument("--only", nargs="*", default=None, help="GROUP:CLUSTER (default: all 24)")
    ap.add_argument("--plans-dir", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--policy", default="reservation")
    ap.add_argument("--python-scheduler", action="store_true",
                    help="also time the Python reference scheduler (PPIPE_NATIVE=0)")
    args = ap.parse_args(argv)
    from ppipe_trt.scheduler.native import native_status

    impl = native_status()
    print(f"scheduler: {impl['scheduler']} ({impl['detail']})")
    setting = load_paper_setting(args.profiles)
    profiles = load_profiles(args.profiles)
    tags = args.only or [f"{g}:{c.label}" for g in range(1, len(setting.model_groups) + 1)
                         for c in setting.clusters]
    py = args.python_scheduler
    print(f"{'config':<12} {'requests':>9} {'events':>9} {'median wall s':>14} "
          f"{'req / wall s':>13} {'vs Java 4.5 s':>14}"
          + (f" {'python sched s':>15} {'python / this':>14}" if py else ""))
    walls, rates, ratios = [], [], []

    def run(plan, seed: int, python: bool):
        saved = os.environ.get("PPIPE_NATIVE")
        if python:
            os.environ["PPIPE_NATIVE"] = "0"
        try:
            return simulate(plan, profiles, SimConfig(duration_s=args.duration, warmup_s=0.0,
                                                      policy=args.policy, seed=seed))
        finally:
            if python:
                if saved is None:
                    os.environ.pop("PPIPE_NATIVE", None)
                else:
                    os.environ["PPIPE_NATIVE"] = saved

    for tag in tags:
        g, c = tag.split(":")
        plan = _plan(args.profiles, int(g), c, "ppipe", args.plans_dir)
        runs, ref = [], []
        for k in range(args.repeat):   # interleaved: a slow spell hits both alike
            runs.append(run(plan, k, False))
            if py:
                ref.append(run(plan, k, True))
                a, b = runs[-1], ref[-1]
                if (a.events, [m.requests for m in a.models], [m.completed for m in a.models]) \
                        != (b.events, [m.requests for m in b.models],
                            [m.completed for m in b.models]):
                    raise SystemExit(f"{tag} seed {k}: the two schedulers' runs differ")
        wall = statistics.median(r.wall_s for r in runs)
        reqs = statistics.median(sum(m.requests for m in r.models) for r in runs)
        events = statistics.median(r.events for r in runs)
        walls.append(wall)
        rates.append(reqs / wall)
        extra = ""
        if py:
            ref_wall = statistics.median(r.wall_s for r in ref)
            ratios.append(ref_wall / wall)
            extra = f" {ref_wall:>15.2f} {ref_wall / wall:>13.2f}x"
        print(f"{tag:<12} {reqs:>9.0f} {events:>9.0f} {wall:>14.2f} {reqs / wall:>13.0f} "
              f"{JAVA_MEDIAN_S / wall:>13.2f}x" + extra)
    print(f"median over {len(tags)} configurations: {statistics.median(walls):.2f} s per 30 s run "
          f"(target < 2 s; Java artifact {JAVA_MEDIAN_S} s), "
          f"{statistics.median(rates):.0f} simulated requests per wall second"
          + (f"; the Python reference scheduler takes {statistics.median(ratios):.2f}x as long "
             f"(median of the per-configuration ratios)" if py else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
