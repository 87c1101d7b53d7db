#!/usr/bin/env python3
"""Issue #11, acceptance 2: goodput at 99 % attainment of static, adaptive (``--adapt``) and
oracle plans on a 2-hour workload-shift trace on a 100-GPU paper cluster (simulated).

    scripts/replan_sim.py [--profiles DIR] [--group 3] [--cluster L4-T4] [--duration 7200]
                          [--search-time-scale 10] [--search-steps 4] [--full-steps 2]
                          [--solve-s 1.0] [--startup-s 0.043] [--json PATH] [--doc PATH]
                          [--plot PATH]

Plans with PPipe for the group's paper weights, then calls
:func:`ppipe_trt.simulator.replan_compare.compare_policies` (see its module doc for the
search) and writes the JSON, a markdown summary and, with ``--plot``, a PNG of the
full-length runs' per-window attainment and offered load with the swap instants.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default=str(ROOT.parent / "shared" / "ppipe-profiles"))
    ap.add_argument("--group", type=int, default=3)
    ap.add_argument("--cluster", default="L4-T4")
    ap.add_argument("--scenario", default="shifts")
    ap.add_argument("--duration", type=float, default=7200.0, help="trace length, s")
    ap.add_argument("--search-time-scale", type=float, default=10.0)
    ap.add_argument("--search-steps", type=int, default=4)
    ap.add_argument("--full-steps", type=int, default=2)
    ap.add_argument("--solve-s", type=float, default=1.0,
                    help="MILP solve time charged per swap (s); negative: measured")
    ap.add_argument("--startup-s", type=float, default=None,
                    help="worker start-up (s); default: the measured ONNX Runtime figure")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--doc", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)

    from ppipe_trt.simulator.engine import SimConfig
    from ppipe_trt.simulator.replan_compare import compare_on_paper_cluster
    from ppipe_trt.simulator.swap import MEASURED_ORT_STARTUP_S, SwapCosts

    t0 = time.perf_counter()
    costs = SwapCosts(solve_s=None if args.solve_s < 0 else args.solve_s,
                      worker_startup_s=MEASURED_ORT_STARTUP_S if args.startup_s is None
                      else args.startup_s)
    out = compare_on_paper_cluster(args.profiles, group=args.group, cluster=args.cluster,
                                   scenario_name=args.scenario, duration_s=args.duration,
                                   search_time_scale=args.search_time_scale,
                                   search_steps=args.search_steps, full_steps=args.full_steps,
                                   costs=costs, config=SimConfig(seed=args.seed),
                                   progress=lambda m: print(m, file=sys.stderr, flush=True),
                                   keep_results=bool(args.plot))
    results = out.pop("results", {})
    out["command"] = " ".join(["scripts/replan_sim.py"] + (argv or sys.argv[1:]))
    out["total_wall_s"] = time.perf_counter() - t0
    out["host"] = platform.node()
    out["date_utc"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    print(summary(out))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.doc:
        Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
        Path(args.doc).write_text(summary(out, markdown=True))
    if args.plot and results:
        plot(results, args.plot)
    return 0


def summary(out: dict, markdown: bool = False) -> str:
    g = out["goodput_rps"]
    fmt = lambda x: "n/a" if x is None else f"{x:.1f}"           # noqa: E731
    rat = lambda x: "n/a" if x is None else f"{x:.3f}"           # noqa: E731
    lines = [f"scenario {out['scenario']} ({out['shifts']} shifts, {out['duration_s']:.0f} s) "
             f"on {out['cluster']}, models {', '.join(out['models'])}",
             f"goodput at {100 * out['target']:g} % attainment (mean offered req/s): static "
             f"{fmt(g.get('static'))}, adaptive {fmt(g.get('adaptive'))}, oracle "
             f"{fmt(g.get('oracle'))}",
             f"adaptive / static = {rat(out['adaptive_over_static'])} (goal >= 1.3), "
             f"adaptive / oracle = {rat(out['adaptive_over_oracle'])} (goal >= 0.95)",
             f"swaps at goodput: {out['swaps']}, requests moved: {out['moved']}; "
             f"{out['plans_solved']} MILP solves ({out['solve_wall_s']:.1f} s), "
             f"{out['plan_cache_hits']} cache hits; wall {out.get('total_wall_s', 0):.0f} s"]
    if not markdown:
        return "\n".join(lines)
    md = ["# Re-planning on the simulator: static vs adaptive vs oracle (issue #11)", "",
          f"Run {out.get('date_utc', '')} UTC on the shared 2-core development machine:", "",
          f"    {out.get('command', '')}", "", *lines, "",
          "| policy | stage | trace s | scale req/s | attainment | requests | swaps | moved "
          "| wall s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in out["runs"]:
        md.append(f"| {r['policy']} | {r['stage']} | {r['duration_s']:.0f} | "
                  f"{r['scale_rps']:.1f} | {100 * r['attainment']:.3f} % | {r['requests']} | "
                  f"{r['swaps']} | {r['moved']} | {r['wall_s']:.0f} |")
    return "\n".join(md) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(12, 3.2 * len(results)), sharex=True,
                             squeeze=False)
    for ax, (policy, r) in zip(axes[:, 0], results.items()):
        w = r.windows
        t = [k * w.window_s / 60 for k in range(len(w.attainment))]
        for m, v in w.offered_rps.items():
            ax.plot(t, v, lw=0.6, label=m[:28])
        ax.set_ylabel("offered req/s")
        ax2 = ax.twinx()
        ax2.plot(t, [100 * a for a in w.attainment], color="k", lw=0.6, label="attainment")
        ax2.set_ylim(0, 101)
        ax2.set_ylabel("attainment %")
        for s in r.swaps:
            ax.axvline(s.at_us / 6e7, color="r", lw=0.8, ls="--")
        ax.set_title(f"{policy}: scale {r.scale_rps:.0f} req/s, attainment "
                     f"{100 * r.attainment:.2f} %, {len(r.swaps)} swaps (dashed)")
        ax.legend(loc="upper left", fontsize=7)
    axes[-1, 0].set_xlabel("minutes")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
