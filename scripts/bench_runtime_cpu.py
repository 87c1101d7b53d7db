#!/usr/bin/env python
"""CPU the serving runtime spends per request, without a front end (issue 10's runtime part).

``scripts/bench_dataplane.py`` measures the whole server (protocol + runtime) against a bare
echo server, with perf_analyzer on the same two cores: the right end-to-end figure, but noisy
(+-10-15 % run to run) and slow.  This benchmark isolates the runtime, the part of the
request path that is ppipe-trt's own: the plan is served EMULATED (timing-only workers, as
``ppipe serve --plan P --emulate``) on a uvloop event loop, exactly as ``ppipe serve`` runs it
(``ServingRuntime.start(event_loop)``), and an in-process open-loop Poisson generator submits
each model's requests with ``submit_async`` (no tensors, no HTTP).  Per load factor it reports
the process CPU per answered request over a fixed window, for:

* ``null``: the same generator answering each request with a bare future on the next
  event-loop turn -- the generator's and the event loop's own cost, the baseline measured in
  the same run;
* the runtime of each code tree given (``--tree``, default this checkout), e.g. a build with
  a compiled hot path against the plain one.

Every measurement runs in a fresh process, trees and the baseline interleaved, ``--repeats``
times; the table gives medians, the runtime's net cost (runtime - null) and each tree's ratio
to the first tree's.  Figures are EMULATED (no GPU): what is measured is the data plane's own
CPU -- admission, the reservation scheduler, the timing-only workers' timers and hand-offs,
the answers.

    .venv/bin/python scripts/bench_runtime_cpu.py                          # ~2 min
    .venv/bin/python scripts/bench_runtime_cpu.py --tree . --tree /tmp/compiled-tree \\
        --load-factors 0.7 --repeats 5 --out /tmp/rt.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ppipe_trt.profiles import default_profiles_dir

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GROUP, DEFAULT_CLUSTER = 5, "L4-P4"


# ---- one measurement (child process) ------------------------------------------------------------

def child(args) -> None:
    """Serve the plan on a uvloop event loop, drive it for warm-up + window + drain, print one
    JSON line: answered, CPU us per answered request, results and drops."""
    import asyncio
    import random

    import uvloop

    from ppipe_trt.plan import load_plan
    from ppipe_trt.profiles import load_profiles
    from ppipe_trt.serving.assembly import RuntimeOptions, build_runtime

    plan = load_plan(args.plan)
    runtime = None
    if args.variant == "runtime":
        runtime = build_runtime(plan, load_profiles(args.profiles, plan.model_names), {},
                                RuntimeOptions())

    async def main() -> dict:
        loop = asyncio.get_running_loop()
        counts = {"ok": 0, "dropped": 0}

        def answered(fut) -> None:
            counts["ok" if fut.exception() is None else "dropped"] += 1

        if runtime is not None:
            runtime.start(loop)
            submit = runtime.submit_async
        else:
            def submit(model, inputs):
                fut = loop.create_future()
                loop.call_soon(fut.set_result, None)
                return fut

        def arrive(model: str) -> None:
            submit(model, None).add_done_callback(answered)

        rng = random.Random(args.seed)
        start = loop.time() + 0.2
        span = args.warmup_s + args.window_s
        sent = 0
        for m in plan.models:
            rate = m.throughput_rps * args.load_factor
            t = start
            while True:
                t += rng.expovariate(rate)
                if t >= start + span:
                    break
                loop.call_at(t, arrive, m.model)
                sent += 1
        await asyncio.sleep(0.2 + args.warmup_s)
        cpu0, n0 = time.process_time(), counts["ok"] + counts["dropped"]
        await asyncio.sleep(args.window_s)
        cpu1, n1 = time.process_time(), counts["ok"] + counts["dropped"]
        await asyncio.sleep(args.drain_s)
        if runtime is not None:
            runtime.stop()
        n = max(1, n1 - n0)
        impl = "-"
        if runtime is not None:
            from ppipe_trt.scheduler.native import (scheduler_implementation,
                                                    timed_worker_implementation)

            impl = (scheduler_implementation(runtime.scheduler(m.model)
                                             for m in plan.models)["implementation"]
                    + " / " + str(timed_worker_implementation(runtime.workers)))
        return {"answered": n1 - n0, "cpu_us_per_request": (cpu1 - cpu0) / n * 1e6,
                "ok": counts["ok"], "dropped": counts["dropped"], "sent": sent,
                "scheduler": impl}

    print(json.dumps(uvloop.run(main())))


# ---- the parent ---------------------------------------------------------------------------------

def make_plan(args, workdir: Path) -> Path:
    if args.plan:
        return Path(args.plan).resolve()
    path = workdir / f"plan-g{args.group}-{args.cluster}.json"
    cmd = [sys.executable, "-m", "ppipe_trt.cli", "plan", "--paper-group", str(args.group),
           "--paper-cluster", args.cluster, "--profiles", str(args.profiles), "-o", str(path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"planning failed:\n{proc.stderr[-2000:]}")
    return path


def measure(args, tree: Path, variant: str, load_factor: float, plan: Path, seed: int,
            extra_env: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(extra_env or {})
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--variant", variant,
           "--plan", str(plan), "--profiles", str(args.profiles),
           "--load-factor", str(load_factor), "--window-s", str(args.window_s),
           "--warmup-s", str(args.warmup_s), "--drain-s", str(args.drain_s),
           "--seed", str(seed)]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True,
                          timeout=120 + 3 * (args.window_s + args.warmup_s))
    if proc.returncode != 0:
        raise SystemExit(f"measurement failed ({variant}, tree {tree}, load {load_factor}):\n"
                         f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench-runtime-cpu-") as tmp:
        plan = make_plan(args, Path(tmp))
        trees = [Path(t).resolve() for t in (args.tree or [str(ROOT)])]
        # (label, tree, environment): each tree as it is (its compiled parts where they are
        # built), and with each --native SPEC also under PPIPE_NATIVE=SPEC (0: the Python
        # references of the scheduler and the timing-only workers)
        entries = []
        for t in trees:
            entries.append((str(t), t, {}))
            for spec in args.native or []:
                entries.append((f"{t} (PPIPE_NATIVE={spec})", t, {"PPIPE_NATIVE": spec}))
        samples: dict[tuple, list[dict]] = {}
        for rep in range(args.repeats):
            for lf in args.load_factors:
                for label, tree, variant, env in ([("null", trees[0], "null", {})]
                                                  + [(lb, t, "runtime", e)
                                                     for lb, t, e in entries]):
                    got = measure(args, tree, variant, lf, plan, seed=rep + 1, extra_env=env)
                    samples.setdefault((label, lf), []).append(got)
                    print(f"  repeat {rep + 1}/{args.repeats} load {lf:g} {label}: "
                          f"{got['cpu_us_per_request']:.1f} us/request "
                          f"({got['answered']} answered)", file=sys.stderr)
    rows = []
    for lf in args.load_factors:
        null = statistics.median(s["cpu_us_per_request"] for s in samples[("null", lf)])
        first = None
        for label, t, _ in entries:
            runs = samples[(label, lf)]
            med = statistics.median(s["cpu_us_per_request"] for s in runs)
            net = med - null
            first = net if first is None else first
            drops = sum(s["dropped"] for s in runs)
            rows.append({"load_factor": lf, "tree": label,
                         "scheduler": "/".join(sorted({s.get("scheduler", "-") for s in runs})),
                         "cpu_us_per_request": med,
                         "null_cpu_us_per_request": null, "net_cpu_us_per_request": net,
                         "ratio_to_first_tree": net / first if first > 0 else None,
                         "samples": [round(s["cpu_us_per_request"], 1) for s in runs],
                         "answered": [s["answered"] for s in runs],
                         "dropped_fraction": drops / max(1, sum(s["ok"] + s["dropped"]
                                                                for s in runs))})
    return rows


def fmt_ratio(ratio: float | None) -> str:
    """A ratio to the first tree; "-" when the first tree's net cost was not above zero."""
    return "-" if ratio is None else f"{ratio:.3f}"


def markdown(args, rows: list[dict], wall_s: float) -> str:
    lines = [
        "# Runtime CPU per request, no front end (`scripts/bench_runtime_cpu.py`)", "",
        f"Run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, command: "
        f"`{' '.join(['.venv/bin/python', 'scripts/bench_runtime_cpu.py', *sys.argv[1:]])}` "
        f"(wall time {wall_s:.0f} s).  Plan: "
        + (f"`{args.plan}`" if args.plan else
           f"paper group {args.group} on {args.cluster}") +
        f", served **EMULATED** (timing-only workers) on a uvloop event loop as `ppipe serve` "
        f"runs it; in-process Poisson arrivals at each load factor x the plan's rates; "
        f"{args.window_s:g} s window after {args.warmup_s:g} s warm-up; median of "
        f"{args.repeats} fresh processes per cell, interleaved.", "",
        "| load | code tree | scheduler / timing-only workers | CPU us/request "
        "| null (generator + event loop) "
        "| **runtime net** | ratio to the first row | samples | dropped |",
        "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['load_factor']:g} | `{r['tree']}` | {r['scheduler']} "
            f"| {r['cpu_us_per_request']:.1f} "
            f"| {r['null_cpu_us_per_request']:.1f} | **{r['net_cpu_us_per_request']:.1f}** "
            f"| {fmt_ratio(r['ratio_to_first_tree'])} | {', '.join(map(str, r['samples']))} "
            f"| {100 * r['dropped_fraction']:.2f} % |")
    lines += ["", "CPU us/request: the process's CPU time over the window / requests answered "
              "in it (results and drops).  null: the same generator and event loop answering "
              "each request with a bare future (the baseline).  runtime net = CPU us/request - "
              "null.  The machine is shared (2 cores here): compare trees within one run."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", help="serve this plan.json instead of planning a paper one")
    p.add_argument("--group", type=int, default=DEFAULT_GROUP, help="paper model group (1-6)")
    p.add_argument("--cluster", default=DEFAULT_CLUSTER, help="paper cluster (e.g. L4-P4)")
    p.add_argument("--profiles", type=Path, default=None,
                   help="profile folder (default: $PPIPE_PROFILES or ../shared/ppipe-profiles)")
    p.add_argument("--load-factors", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    p.add_argument("--window-s", type=float, default=6.0)
    p.add_argument("--warmup-s", type=float, default=1.5)
    p.add_argument("--drain-s", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tree", action="append",
                   help="code tree to measure (repeatable; default this checkout); ratios "
                        "are to the first")
    p.add_argument("--native", action="append", metavar="SPEC",
                   help="also measure each tree with PPIPE_NATIVE=SPEC (repeatable): 0 runs "
                        "the Python references, 'reservation' only the compiled scheduler, "
                        "'timed' only the compiled timing-only workers")
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--out", type=Path, help="write the markdown table here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=["runtime", "null"], help=argparse.SUPPRESS)
    p.add_argument("--load-factor", type=float, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    args.profiles = (args.profiles or default_profiles_dir()).resolve()
    if not args.profiles.is_dir():
        raise SystemExit(f"--profiles {args.profiles}: no such folder (set PPIPE_PROFILES)")
    if any(not 0.0 < lf <= 2.0 for lf in args.load_factors):
        raise SystemExit("--load-factors: each must be in (0, 2]")
    if args.repeats < 1 or args.window_s <= 0:
        raise SystemExit("--repeats must be >= 1 and --window-s > 0")
    t0 = time.monotonic()
    rows = run(args)
    text = markdown(args, rows, time.monotonic() - t0)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
