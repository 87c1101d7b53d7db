#!/usr/bin/env python3
"""Benchmark: scheduler decision time per dispatched batch on 100-GPU plans.

Runs PPipe plans of the paper's setting (100 GPUs each) at load 1.0 on the simulator and
times every scheduler call with ``time.perf_counter_ns``.  Prints, per configuration and
policy: the median time of the calls that dispatched, per batch they dispatched (the
decision time per dispatched batch), and the amortised time (all scheduler time, waiting
and dropping decisions included, over the batches dispatched).  Target: median <= 30 us.

    scripts/bench_scheduler.py [--profiles DIR] [--only 2:L4-T4 ...] [--duration 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_ONLY = ("1:L4-T4", "2:L4-T4", "3:V100-P4", "4:L4-P4", "5:V100-T4", "6:L4-T4")


class TimedScheduler:
    """Delegates to a scheduler and records, per call, its duration and dispatch count."""

    def __init__(self, inner, samples):
        self.inner = inner
        self.samples = samples   # list of (ns, dispatched batches)

    def _timed(self, fn, *args):
        t0 = time.perf_counter_ns()
        dec = fn(*args)
        self.samples.append((time.perf_counter_ns() - t0, len(dec.dispatches)))
        return dec

    def on_arrival(self, request, now_us):
        return self._timed(self.inner.on_arrival, request, now_us)

    def on_stage_finished(self, batch_id, stage, finish_us, now_us):
        return self._timed(self.inner.on_stage_finished, batch_id, stage, finish_us, now_us)

    def on_wake(self, now_us):
        return self._timed(self.inner.on_wake, now_us)

    def drain(self, now_us):
        return self.inner.drain(now_us)


def main(argv=None) -> int:
    from ppipe_trt.cluster import load_paper_setting
    from ppipe_trt.profiles import default_profiles_dir, load_profiles
    from ppipe_trt.simulator import SimConfig, simulate
    sys.path.insert(0, str(ROOT / "scripts"))
    from reproduce_paper import _plan

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default=str(default_profiles_dir()))
    ap.add_argument("--only", nargs="*", default=list(DEFAULT_ONLY))
    ap.add_argument("--plans-dir", default=None)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--policies", nargs="*", default=["reservation", "reactive"])
    args = ap.parse_args(argv)
    setting = load_paper_setting(args.profiles)
    profiles = load_profiles(args.profiles)
    print(f"{'config':<12} {'policy':<12} {'GPUs':>5} {'pipes':>5} {'batches':>8} "
          f"{'calls':>8} {'median us/batch':>16} {'p90 us/batch':>13} {'amortised us/batch':>19}")
    medians = {p: [] for p in args.policies}
    for tag in args.only:
        g, c = tag.split(":")
        plan = _plan(args.profiles, int(g), c, "ppipe", args.plans_dir)
        gpus = sum(p.count for p in setting.cluster(c).pools)
        npipes = sum(len(m.pipelines) for m in plan.models)
        for policy in args.policies:
            samples: list = []
            simulate(plan, profiles, SimConfig(duration_s=args.duration, warmup_s=0.0,
                                               policy=policy),
                     wrap=lambda s: TimedScheduler(s, samples))
            per_batch = [ns / n / 1e3 for ns, n in samples if n]
            batches = sum(n for _, n in samples)
            total = sum(ns for ns, _ in samples) / 1e3
            med = statistics.median(per_batch)
            p90 = statistics.quantiles(per_batch, n=10)[-1]
            medians[policy].append(med)
            print(f"{tag:<12} {policy:<12} {gpus:>5} {npipes:>5} {batches:>8} {len(samples):>8} "
                  f"{med:>16.1f} {p90:>13.1f} {total / max(1, batches):>19.1f}")
    for policy, vals in medians.items():
        if vals:
            print(f"median over configurations ({policy}): {statistics.median(vals):.1f} us per "
                  "dispatched batch (target <= 30 us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
