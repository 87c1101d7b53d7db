#!/usr/bin/env python3
"""Plan the paper's 24 main configurations with PPipe, NP and DART-r and print a table.

Normalized throughput = min over models of planned throughput / workload weight (req/s).
``--json PATH`` writes one object per (models, cluster, scheduler); ``--plans-dir DIR`` saves
every plan JSON (reused by the simulator's reproduction script).  Timings are wall-clock on
this machine; other processes sharing the CPU make them noisy.

    .venv/bin/python scripts/bench_planner.py --solver highs --json /tmp/planner.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from tqdm import tqdm

from ppipe_trt.cluster import load_paper_setting
from ppipe_trt.errors import PPipeError
from ppipe_trt.plan import save_plan
from ppipe_trt.profiles import default_profiles_dir, load_profiles

from planner import PlannerOptions, plan_cluster

SCHEDULERS = ("np", "ppipe", "dart-r")
#: The public artifact's own Gurobi plans (normalized throughput, req/s): the calibration points.
ANCHORS = {
    (3, "L4-T4"): {"np": 1490.8, "ppipe": 1812.3},
    (2, "V100-P4"): {"np": 2168.4, "ppipe": 2863.1},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", type=Path, default=None)
    ap.add_argument("--max-stages", type=int, default=2, choices=(1, 2, 3))
    ap.add_argument("--solver", default="highs", choices=("auto", "highs", "gurobi", "cbc"))
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--json", type=Path, help="write per-(models, cluster, scheduler) results")
    ap.add_argument("--plans-dir", type=Path, help="save every plan JSON here")
    ap.add_argument("--groups", type=int, nargs="*", help="model groups (default: all)")
    ap.add_argument("--schedulers", nargs="*", default=list(SCHEDULERS), choices=SCHEDULERS)
    args = ap.parse_args(argv)

    profiles_dir = args.profiles or default_profiles_dir()
    profiles = load_profiles(profiles_dir)
    setting = load_paper_setting(profiles_dir)
    options = PlannerOptions(max_stages=args.max_stages, solver=args.solver,
                             time_limit_s=args.time_limit)
    groups = args.groups or list(range(1, len(setting.model_groups) + 1))
    jobs = [(g, c) for g in groups for c in setting.clusters]
    rows, records = [], []
    for g, cluster in tqdm(jobs, desc="planning", file=sys.stderr):
        workloads = setting.workloads(g, profiles)
        row = {"group": g, "cluster": cluster.label}
        for sched in args.schedulers:
            try:
                plan = plan_cluster(profiles, cluster, workloads, sched, options)
            except PPipeError as exc:
                print(f"group {g} {cluster.label} {sched}: {exc}", file=sys.stderr)
                row[sched] = None
                continue
            row[sched] = plan
            records.append({
                "models": [w.model for w in workloads],
                "cluster": list(cluster.gpu_classes),
                "scheduler": sched,
                "per_model_throughput": [m.throughput_rps for m in plan.models],
                "normalized_throughput": plan.normalized_throughput,
                "solve_s": plan.solve_s,
                "solver": plan.solver,
                "mip_gap": plan.mip_gap,
                "gpus_used": dict(plan.gpus_used),
                "max_stages": args.max_stages,
                "milp_cols": plan.params.get("milp", {}).get("cols"),
                "milp_rows": plan.params.get("milp", {}).get("rows"),
            })
            if args.plans_dir:
                save_plan(plan, args.plans_dir / f"g{g}_{cluster.label}_{sched}.json")
        rows.append(row)
    print(render(rows, args.schedulers, setting, args.max_stages, args.solver))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1))
    return 0


def render(rows, schedulers, setting, max_stages: int, solver: str) -> str:
    classes = lambda label: label.split("-")  # noqa: E731
    out = [f"Planner on the paper's configurations (max_stages={max_stages}, solver={solver}); "
           "normalized throughput = min over models of throughput / weight (req/s); "
           "GPUs used as high/low of 25/75.", ""]
    head = "| group | cluster |"
    rule = "|---|---|"
    for s in schedulers:
        head += f" {s} norm | {s} s | {s} GPUs |"
        rule += "---:|---:|---:|"
    if "ppipe" in schedulers and "np" in schedulers:
        head += " ppipe/np |"
        rule += "---:|"
    out += [head, rule]
    times = {s: [] for s in schedulers}
    ratios = []
    for row in rows:
        line = f"| {row['group']} | {row['cluster']} |"
        for s in schedulers:
            plan = row.get(s)
            if plan is None:
                line += " infeasible | - | - |"
                continue
            hi, lo = classes(row["cluster"])
            times[s].append(plan.solve_s)
            anchor = ANCHORS.get((row["group"], row["cluster"]), {}).get(s)
            mark = f" (artifact {anchor})" if anchor else ""
            line += (f" {plan.normalized_throughput:.1f}{mark} | {plan.solve_s:.3f} | "
                     f"{plan.gpus_used.get(hi, 0)}/{plan.gpus_used.get(lo, 0)} |")
        if "ppipe" in schedulers and "np" in schedulers and row.get("ppipe") and row.get("np"):
            ratio = row["ppipe"].normalized_throughput / row["np"].normalized_throughput
            ratios.append(ratio)
            line += f" {ratio:.2f}x |"
        out.append(line)
    out.append("")
    for s in schedulers:
        if times[s]:
            out.append(f"{s}: solve time median {statistics.median(times[s]):.3f} s, "
                       f"worst {max(times[s]):.3f} s over {len(times[s])} configurations")
    sizes = [(r["ppipe"].params["milp"]["cols"], r["ppipe"].params["milp"]["rows"])
             for r in rows if r.get("ppipe") is not None]
    if sizes:
        out.append(f"ppipe MILP size: variables median {statistics.median(c for c, _ in sizes):.0f}"
                   f" (max {max(c for c, _ in sizes)}), constraints median "
                   f"{statistics.median(r for _, r in sizes):.0f} (max {max(r for _, r in sizes)})")
    if ratios:
        out.append(f"ppipe / np normalized throughput: median {statistics.median(ratios):.2f}x, "
                   f"min {min(ratios):.2f}x, max {max(ratios):.2f}x")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
