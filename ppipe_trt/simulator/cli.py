"""``ppipe simulate PLAN``: run a plan on the simulated cluster, or search its load factor.

    ppipe simulate plan.json --load 0.9 --duration 30s --arrivals poisson
    ppipe simulate plan.json --search --reference-plan ppipe.json --policy reactive --json out.json

Load factor 1.0 offers each model the throughput of the ``--reference-plan`` (the PPipe
plan, as in the paper; default: PLAN itself).

Workload shifts (issue #11): ``--scenario`` plays a rate curve over the plan's models
(weights: the plan's), at ``--scale`` req/s (default: load factor x the plan's normalized
throughput), for ``--duration``; ``--adapt`` re-plans on the way as ``ppipe serve --adapt``
would (the MILP runs for real; swaps switch after ``--solve-s`` and ``--startup-s``);
``--compare`` searches the goodput at ``--target`` of static, adaptive and oracle plans.

    ppipe simulate plan.json --scenario shifts --duration 10m --adapt --json out.json
    ppipe simulate plan.json --scenario shifts --duration 2h --compare
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ppipe_trt.errors import ConfigError


def parse_duration_s(text: str) -> float:
    """``30s``, ``500ms``, ``2m``, ``2h`` or a bare number of seconds."""
    t = text.strip().lower()
    try:
        for suffix, scale in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
            if t.endswith(suffix):
                return float(t[: -len(suffix)]) * scale
        return float(t)
    except ValueError:
        raise ConfigError(f"duration {text!r}: expected e.g. 30s, 500ms, 2m") from None


def register(subparsers) -> None:
    p = subparsers.add_parser("simulate", help="simulate a plan on a virtual cluster",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("plan", help="plan JSON (ppipe plan / scripts/bench_planner.py --plans-dir)")
    p.add_argument("--profiles", default=None, help="profile folder (default: shared profiles)")
    p.add_argument("--load", type=float, default=1.0, help="load factor (default 1.0)")
    p.add_argument("--duration", default="30s", help="measured simulated time (default 30s)")
    p.add_argument("--warmup", default="2s", help="excluded warm-up before it (default 2s)")
    p.add_argument("--arrivals", default="poisson", help="poisson | gamma:CV | mmpp[:ON_MS:OFF_MS] | trace:FILE | "
                        "gamma-cv2 | gamma-cv4 (bursty stand-ins for the paper's Azure trace)")
    p.add_argument("--policy", default="reservation",
                   choices=("reservation", "reactive", "triton"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency-cv", type=float, default=0.0,
                   help="log-normal noise on stage latencies, coefficient of variation")
    p.add_argument("--hop-overhead-us", type=float, default=0.0,
                   help="fixed cost added to every network transfer")
    p.add_argument("--link-model", default="duplex", choices=("duplex", "sender", "channel"),
                   help="duplex (default): a transfer occupies the sender's uplink and the "
                        "receiver's downlink; sender: only the sender's uplink; channel: only "
                        "the sending worker's channel of gpus_per_server x mps_share workers "
                        "of its stage (the public PPipe artifact's simulator)")
    p.add_argument("--max-queue-delay-us", type=float, default=None,
                   help="triton policy: longest a request waits for a fuller batch")
    p.add_argument("--strict-batch-fraction", type=float, default=None,
                   help="reservation policy: the public artifact's admission rule (e.g. 0.95)")
    p.add_argument("--work-conserving", action="store_true",
                   help="reservation policy: dispatch at once (or when the route frees) while "
                        "the estimated rate is under half the capacity at the queue's batch "
                        "size, instead of PPipe's wait for a fuller batch")
    p.add_argument("--reference-plan", default=None,
                   help="plan whose per-model throughput is load 1.0 (default: PLAN)")
    p.add_argument("--search", action="store_true",
                   help="search the load factor from 1.0 down by 0.05 to >= 99%% attainment")
    p.add_argument("--target", type=float, default=0.99, help="attainment target of --search")
    p.add_argument("--json", default=None, help="write the metrics to this JSON file")
    p.add_argument("--scenario", default=None,
                   choices=("shifts", "rotating", "step", "diurnal"),
                   help="play a workload-shift scenario over the plan's models (its weights)")
    p.add_argument("--scale", type=float, default=None,
                   help="scenario scale, req/s (default: load x the plan's normalized "
                        "throughput)")
    p.add_argument("--adapt", action="store_true",
                   help="with --scenario: re-plan when the mix drifts (ppipe serve --adapt)")
    p.add_argument("--compare", action="store_true",
                   help="with --scenario: goodput at --target of static, adaptive, oracle")
    p.add_argument("--solve-s", type=float, default=None,
                   help="MILP solve time charged per swap, s (default: measured)")
    p.add_argument("--startup-s", type=float, default=None,
                   help="added workers' start-up, s (default: measured ONNX Runtime figure)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ppipe_trt.plan import load_plan
    from ppipe_trt.profiles import load_profiles
    from ppipe_trt.simulator.arrivals import ArrivalSpec
    from ppipe_trt.simulator.engine import SimConfig, simulate
    from ppipe_trt.simulator.metrics import format_table
    from ppipe_trt.simulator.search import search_load_factor

    if (args.adapt or args.compare or args.scale is not None) and not args.scenario:
        raise ConfigError("--adapt, --compare and --scale play a workload-shift scenario: "
                          "add --scenario shifts|rotating|step|diurnal")
    plan = load_plan(args.plan)
    profiles = load_profiles(args.profiles, plan.model_names)
    ref = load_plan(args.reference_plan) if args.reference_plan else plan
    rates = {}
    for m in plan.model_names:
        rates[m] = ref.model(m).throughput_rps
    options = {}
    if args.max_queue_delay_us is not None:
        options["max_queue_delay_us"] = args.max_queue_delay_us
    if args.strict_batch_fraction is not None:
        options["strict_batch_fraction"] = args.strict_batch_fraction
    if args.work_conserving:
        options["work_conserving"] = True
    config = SimConfig(load_factor=args.load, policy_options=options, duration_s=parse_duration_s(args.duration),
                       warmup_s=parse_duration_s(args.warmup),
                       arrivals=ArrivalSpec.parse(args.arrivals), policy=args.policy,
                       seed=args.seed, latency_cv=args.latency_cv,
                       hop_overhead_us=args.hop_overhead_us, rates_rps=rates,
                       link_model=args.link_model)
    if args.scenario:
        out = _run_scenario(args, plan, profiles, config)
    elif args.search:
        def progress(f, res):
            print(f"load {f:.2f}: " + ", ".join(f"{m.model[:24]} {100 * m.attainment:.2f}%"
                                                 for m in res.models), file=sys.stderr)
        sr = search_load_factor(plan, profiles, config, target=args.target, progress=progress)
        print(f"load factor at >= {100 * args.target:g}% attainment ({args.policy}, plan "
              f"{plan.scheduler}, {plan.cluster.label}):")
        for m, f in sr.per_model_load_factor.items():
            print(f"  {m:<48} {f:.2f}")
        print(f"  {'mean':<48} {sr.load_factor:.3f}")
        if sr.final:
            print(format_table(sr.final))
        out = {"per_model_load_factor": dict(sr.per_model_load_factor),
               "load_factor": sr.load_factor, "utilization": dict(sr.utilization),
               "runs": [r.to_dict() for r in sr.runs]}
    else:
        res = simulate(plan, profiles, config)
        print(format_table(res))
        print(f"({res.events} events in {res.wall_s:.2f} s wall)")
        out = res.to_dict(workers=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def _run_scenario(args: argparse.Namespace, plan, profiles, config) -> dict:
    from dataclasses import replace

    from ppipe_trt.adapt import AdaptOptions
    from ppipe_trt.simulator.adaptive import simulate_scenario
    from ppipe_trt.simulator.replan_compare import compare_policies
    from ppipe_trt.simulator.scenarios import build_scenario
    from ppipe_trt.simulator.swap import MEASURED_ORT_STARTUP_S, SwapCosts

    if args.adapt and args.compare:
        raise ConfigError("--compare runs static, adaptive and oracle itself; drop --adapt")
    costs = SwapCosts(solve_s=args.solve_s, worker_startup_s=MEASURED_ORT_STARTUP_S
                      if args.startup_s is None else args.startup_s)
    config = replace(config, warmup_s=0.0)
    duration_s = parse_duration_s(args.duration)
    scenario = build_scenario(args.scenario, plan.model_names,
                              [plan.model(m).weight for m in plan.model_names], duration_s)
    if args.compare:
        out = compare_policies(profiles, plan, scenario=scenario, target=args.target,
                               costs=costs, config=config,
                               progress=lambda m: print(m, file=sys.stderr, flush=True))
        g = out["goodput_rps"]
        print(f"goodput at >= {100 * args.target:g}% attainment (mean offered req/s): "
              + ", ".join(f"{k} {v:.1f}" if v else f"{k} n/a" for k, v in g.items()))
        print(f"adaptive/static {out['adaptive_over_static']}, adaptive/oracle "
              f"{out['adaptive_over_oracle']}, swaps {out['swaps']}")
        return out
    scale = args.scale if args.scale is not None else args.load * plan.normalized_throughput
    res = simulate_scenario(plan, profiles, scenario, scale, config=config,
                            adapt=AdaptOptions() if args.adapt else None, costs=costs)
    print(f"scenario {scenario.name} ({scenario.shifts} shifts, {duration_s:g} s) at scale "
          f"{scale:.1f} req/s, {'adaptive' if args.adapt else 'static plan'}: attainment "
          f"{100 * res.attainment:.3f} % of {res.requests} requests "
          f"({res.wall_s:.1f} s wall)")
    for m, a in res.per_model_attainment.items():
        print(f"  {m:<48} {100 * a:7.3f} %")
    for s in res.swaps:
        print(f"  swap at {s.at_us / 1e6:8.1f} s (asked {s.decided_us / 1e6:.1f} s): kept "
              f"{s.kept}, added {s.added}, retired {s.retired}, moved {s.moved}: {s.reason}")
    return res.to_dict(windows=True)
