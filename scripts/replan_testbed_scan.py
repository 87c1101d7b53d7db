#!/usr/bin/env python
"""Scan model sets and shifts for bench_replan's live check, in the simulator only.

For each model set (``--sets``, or every ``--size``-subset of ``--pool``) and shift
(``--shifts``, bench_replan's ``--shift`` syntax), plans A (equal weights) and B (the shifted
mix) exactly as ``scripts/bench_replan.py`` does (:func:`bench_replan.build_plans`) on the
``--l4`` + ``--t4`` testbed, then serves each plan its own mix at ``--load`` x the plan's
per-model throughput, Poisson, for ``--duration-s`` on each of ``--seeds``
(:func:`ppipe_trt.simulator.simulate_scenario`, one constant phase, 1-s windows).

The live server's emulated timing is modelled as ``ppipe serve --emulate`` sets it up: the
scheduler plans against the deadline minus ``--deadline-margin-ms`` (the runtime default
1 ms) minus the event loop's answer slop (2 ms; a thread-less emulated runtime runs on the
front end's event loop), wakes ``--wake-lead-us`` (1 ms + the 2 ms slop) early and is
work-conserving (``ppipe serve``'s default); every
cross-server hand-off costs ``--hop-overhead-us`` (the server measures it at start: tens of
us on the 2-core host).  A request counts on time only within that reduced deadline (the
live check judges against the full SLO, so this is slightly pessimistic).

A row passes when both plans show 0 drops and 0 late answers and every 1-s window holds
>= ``--target`` on every seed, and both totals stay under ``--max-total-rps``; the chosen
row is the passing one with the highest min(total A, total B).  Table cells: the plan's
offered total req/s, then per seed ``drops/worst 1-s window %``.

Result of 2026-12 (4 L4 + 12 T4, load 0.8): nothing passes.  All 378 pairs of the 28
profiled models with shifts 0=3 and 1=3 (251 rows over 400 req/s; the 40 lowest of those
fail too), 20 triples of the best models, and planner options slo_margin 0.2-0.7,
max_stages=3, batching_delay_factor=3, max_batch=1 (and planner.tuning.plan_by_simulation,
tried on efficientnet-b8 + fsaf) all drop 0.1-5 % of requests: at 0.8 the pools of a
16-GPU plan are too small for Poisson bursts.  The best pairs (efficientnet-b8 + fsaf_r101
/ wide_resnet101_2 / encnet_r101) drop 0.1-0.4 %, 0-1 per run at load 0.6, none at 0.5.

    PYTHONPATH=. .venv/bin/python scripts/replan_testbed_scan.py \\
        --sets efficientnet-b8_3rdparty_8xb32-aa-advprop_in1k,repvgg-b3 --shifts "0=3;1=3"
    PYTHONPATH=. .venv/bin/python scripts/replan_testbed_scan.py --pool A,B,C --size 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_replan as br  # noqa: E402  (the live check's planning)

#: Live runtime: answers on the front end's event loop are heard up to this late (us);
#: the runtime plans against SLO - deadline margin - this (EVENT_LOOP_TIMER_SLOP_US).
EVENT_LOOP_SLOP_US = 2000.0


def short(model: str) -> str:
    return model.split("_")[0]


def served_as_live(plan, margin_us: float):
    """``plan`` with each SLO shortened by the live runtime's unplanned margin."""
    return replace(plan, models=tuple(replace(m, slo_ms=m.slo_ms - margin_us / 1e3)
                                      for m in plan.models))


def run_plan(plan, profiles, args, seed: int) -> dict:
    """Serve ``plan`` its own mix at ``args.load``: drops, late, worst 1-s window."""
    from ppipe_trt.simulator import SimConfig, simulate_scenario
    from ppipe_trt.simulator.scenarios import Phase, Scenario

    live = served_as_live(plan, 1e3 * args.deadline_margin_ms + EVENT_LOOP_SLOP_US)
    rel = tuple(args.load * m.throughput_rps for m in plan.models)
    scenario = Scenario("steady", plan.model_names, (Phase(0.0, args.duration_s, rel),))
    config = SimConfig(seed=seed, hop_overhead_us=args.hop_overhead_us,
                       policy_options={"wake_lead_us": args.wake_lead_us,
                                       "work_conserving": args.work_conserving})
    r = simulate_scenario(live, profiles, scenario, 1.0, config=config)
    late = r.outcomes.get("late", 0) + r.outcomes.get("unresolved", 0)
    drops = r.requests - r.completed - late
    return {"seed": seed, "requests": r.requests, "drops": drops, "late": late,
            "worst_window": min(r.windows.attainment), "attainment": r.attainment}


def scan_one(models: list[str], shift: str, args) -> dict:
    from ppipe_trt.errors import ConfigError

    t0 = time.perf_counter()
    row: dict = {"models": models, "shift": shift}
    try:
        a, b, profiles = br.build_plans(args.profiles, models, args.l4, args.t4, shift,
                                        br.planner_options(args.planner_option))
    except Exception as exc:  # infeasible, a shift naming no model, ...
        return {**row, "error": f"{type(exc).__name__}: {exc}"}
    for key, plan in (("A", a), ("B", b)):
        row[key] = {"rates": {m.model: args.load * m.throughput_rps for m in plan.models},
                    "total_rps": args.load * sum(m.throughput_rps for m in plan.models)}
    if max(row["A"]["total_rps"], row["B"]["total_rps"]) > args.max_total_rps:
        return {**row, "error": f"over {args.max_total_rps:g} req/s"}
    ok = True
    for key, plan in (("A", a), ("B", b)):
        runs = []
        for seed in args.seeds:
            try:
                runs.append(run_plan(plan, profiles, args, seed))
            except ConfigError as exc:  # e.g. MPS shares that do not pack onto the GPUs
                return {**row, "error": f"plan {key}: {exc}"}
            ok &= (runs[-1]["drops"] == 0 and runs[-1]["late"] == 0
                   and runs[-1]["worst_window"] >= args.target)
            if not ok and args.fail_fast:
                break
        row[key]["runs"] = runs
        if not ok and args.fail_fast:
            break
    row["pass"] = ok
    row["wall_s"] = time.perf_counter() - t0
    return row


def cell(plan: dict | None) -> str:
    if not plan:
        return "-"
    runs = " ".join(f"{r['drops']}/{100 * r['worst_window']:.1f}" for r in plan.get("runs", []))
    return f"{plan['total_rps']:.0f} [{runs}]"


def main(argv: list[str] | None = None) -> int:
    from ppipe_trt.profiles import default_profiles_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", type=Path, default=default_profiles_dir())
    ap.add_argument("--sets", default="", help="model sets: 'M1,M2;M3,M4,M5;...'")
    ap.add_argument("--pool", default="", help="models to combine (with --size)")
    ap.add_argument("--size", type=int, default=2)
    ap.add_argument("--shifts", default="1=3", help="shifts to try, ';'-separated, "
                    "bench_replan --shift syntax (a shift naming an absent index is skipped)")
    ap.add_argument("--l4", type=int, default=4)
    ap.add_argument("--t4", type=int, default=12)
    ap.add_argument("--load", type=float, default=0.8)
    ap.add_argument("--planner-option", action="append", default=[], metavar="KEY=VALUE",
                    help="as bench_replan's (planner.PlannerOptions field, repeatable)")
    ap.add_argument("--duration-s", type=float, default=60.0)
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3])
    ap.add_argument("--target", type=float, default=0.995, help="every 1-s window >= this")
    ap.add_argument("--max-total-rps", type=float, default=400.0)
    ap.add_argument("--hop-overhead-us", type=float, default=50.0)
    ap.add_argument("--deadline-margin-ms", type=float, default=1.0,
                    help="the server's --deadline-margin-ms (bench_replan passes none: 1 ms)")
    ap.add_argument("--wake-lead-us", type=float, default=3000.0,
                    help="runtime wake_lead_us (1 ms) + the event loop's 2 ms")
    ap.add_argument("--no-work-conserving", dest="work_conserving", action="store_false",
                    help="as ppipe serve's (default: on, as the live server)")
    ap.add_argument("--fail-fast", action="store_true",
                    help="stop a row at its first failing seed (faster scans)")
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line per row")
    args = ap.parse_args(argv)

    sets = [s.split(",") for s in args.sets.split(";") if s]
    if args.pool:
        sets += [list(c) for c in itertools.combinations(args.pool.split(","), args.size)]
    rows = []
    print("| models | shift | A req/s [drops/worst % per seed] | B req/s [...] | pass |")
    print("|---|---|---|---|---|")
    for models in sets:
        for shift in [s for s in args.shifts.split(";") if s]:
            if any(k.isdigit() and int(k) >= len(models)
                   for k, _, _ in (i.partition("=") for i in shift.split(","))):
                continue
            row = scan_one(models, shift, args)
            rows.append(row)
            verdict = row.get("error") or ("PASS" if row["pass"] else "fail")
            print(f"| {'+'.join(map(short, models))} | {shift} | {cell(row.get('A'))} | "
                  f"{cell(row.get('B'))} | {verdict} |", flush=True)
            if args.json:
                with args.json.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    good = [r for r in rows if r.get("pass")]
    if good:
        best = max(good, key=lambda r: min(r["A"]["total_rps"], r["B"]["total_rps"]))
        print(f"\nchosen: --models {','.join(best['models'])} --shift {best['shift']} "
              f"(A {best['A']['total_rps']:.0f} req/s, B {best['B']['total_rps']:.0f} req/s)")
    else:
        done = [r for r in rows if "pass" in r and not args.fail_fast]
        near = min(done, key=lambda r: sum(x["drops"] for k in "AB" for x in r[k]["runs"]),
                   default=None)
        print("\nno configuration passes" + (
            f"; fewest drops: {'+'.join(map(short, near['models']))} {near['shift']}"
            if near else ""))
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
