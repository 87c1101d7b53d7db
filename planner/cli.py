"""``ppipe plan``: plan a cluster from profiles and workloads, print a table, save the JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from planner.options import POLICIES, SOLVERS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan", help="plan pipelines for a cluster (MILP)",
        description="Decide per model a set of pooled pipelines (block ranges, GPU class, MPS "
                    "share, batch, workers) that maximises the minimum normalized throughput.")
    p.add_argument("--profiles", type=Path, default=None, metavar="DIR",
                   help="profile folder: the PPipe artifact or an engines/ store "
                        "(default: $PPIPE_PROFILES or ../shared/ppipe-profiles)")
    cl = p.add_mutually_exclusive_group(required=True)
    cl.add_argument("--cluster", type=Path, metavar="FILE", help="cluster file (YAML/JSON)")
    cl.add_argument("--paper-cluster", metavar="HIGH-LOW",
                    help="a cluster of the paper's setting, e.g. L4-T4, V100-P4")
    wl = p.add_mutually_exclusive_group(required=True)
    wl.add_argument("--workloads", type=Path, metavar="FILE", help="workloads file (YAML/JSON)")
    wl.add_argument("--paper-group", type=int, metavar="N",
                    help="model group N (1-6) of the paper's setting, weights 0.30/0.33/0.37")
    p.add_argument("--policy", choices=POLICIES, default="ppipe")
    p.add_argument("--solver", choices=SOLVERS, default="auto")
    p.add_argument("--max-stages", type=int, default=2, choices=(1, 2, 3))
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--slo-margin", type=float, default=0.4,
                   help="fraction of the SLO kept back (plan against 1 - margin)")
    p.add_argument("--batching-delay-factor", type=float, default=1.3,
                   help="batch-building delay = factor x (batch - 1) / estimated arrival rate")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per MILP solve")
    p.add_argument("--mip-gap", type=float, default=None, help="relative MIP gap")
    p.add_argument("-o", "--output", type=Path, metavar="PLAN_JSON",
                   help="write the plan JSON here")
    p.set_defaults(handler=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    from ppipe_trt.cluster import load_cluster, load_paper_setting, load_workloads
    from ppipe_trt.plan import save_plan
    from ppipe_trt.profiles import default_profiles_dir, load_profiles

    from planner.options import PlannerOptions
    from planner.planning import plan_cluster
    from planner.report import format_plan

    profiles_dir = args.profiles or default_profiles_dir()
    profiles = load_profiles(profiles_dir)
    setting = None
    if args.paper_cluster or args.paper_group is not None:
        setting = load_paper_setting(profiles_dir)
    cluster = setting.cluster(args.paper_cluster) if args.paper_cluster else \
        load_cluster(args.cluster)
    workloads = setting.workloads(args.paper_group, profiles) if args.paper_group is not None \
        else load_workloads(args.workloads, profiles)
    kwargs = dict(max_stages=args.max_stages, max_batch=args.max_batch,
                  slo_margin=args.slo_margin, batching_delay_factor=args.batching_delay_factor,
                  solver=args.solver, time_limit_s=args.time_limit)
    if args.mip_gap is not None:
        kwargs["mip_rel_gap"] = args.mip_gap
    plan = plan_cluster(profiles, cluster, workloads, args.policy, PlannerOptions(**kwargs))
    print(format_plan(plan))
    if args.output:
        save_plan(plan, args.output)
        print(f"plan written to {args.output}")
    return 0
