#!/usr/bin/env python
"""Where the server's CPU per request goes, by library: the live server against the protocol's
bare echo floor, under the same open-loop load (issue 10's diagnosis).

``scripts/bench_dataplane.py`` says how much CPU a request costs the server and how that
compares with a bare echo server of the same protocol; this script says *where* the
difference is.  For each protocol and load factor it serves the plan EMULATED (``ppipe serve
--plan P --emulate``, timing-only workers) and the protocol's echo floor (the same servers as
``bench_dataplane.py``), drives each with ``scripts/loadgen.py`` at the same rates, and
samples the server's process tree with ``perf record`` over a fixed window.  Per library
(Python interpreter, kernel, grpc's core, uvloop, libc, ...) it prints the CPU microseconds per
answered request, live and floor, and the difference; and the interpreter's bytecode loop
(``_PyEval_EvalFrameDefault``) on its own line, the part of the interpreter that runs Python
code rather than allocating, looking up attributes and so on for it.

    .venv/bin/python scripts/bench_cpu_split.py                 # http and grpc at 0.3, 0.7
    .venv/bin/python scripts/bench_cpu_split.py --protocols grpc --load-factors 0.3 \\
        --out /tmp/split.md --json /tmp/split.json

Needs Linux ``perf`` (``--perf PATH``; ``kernel.perf_event_paranoid`` low enough to sample a
child process) and the open-loop generator's Python dependencies.  The load generator runs on
the same cores and is not sampled.  Figures are per answered request (results and errors)
over the window; perf's own overhead is in both columns alike.  EMULATED: no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dataplane as dp  # noqa: E402  (servers, load generator, counters)

ROOT = dp.ROOT
#: perf's per-library share lines: "  43.27%  libpython3.11.so.1.0"
_DSO_LINE = re.compile(r"^\s*([\d.]+)%\s+(\S.*?)\s*$")
_EVENT_COUNT = re.compile(r"Event count \(approx\.\):\s*(\d+)")
#: The symbol of CPython's bytecode loop.
EVAL_SYMBOL = "_PyEval_EvalFrameDefault"


def library_label(dso: str) -> str:
    """A short, stable name for a perf DSO: the interpreter, the kernel, or the file's stem
    (``cygrpc.cpython-311-x86_64-linux-gnu.so`` -> ``cygrpc``)."""
    if dso.startswith("[kernel"):
        return "kernel"
    if dso.startswith("libpython"):
        return "python interpreter (libpython)"
    name = dso.split("/")[-1]
    if name.startswith("loop.cpython"):
        return "uvloop"
    if name.startswith("parser.cpython"):
        return "httptools"
    if name.startswith("_message"):
        return "protobuf (upb)"
    if name.startswith("libc.so"):
        return "libc"
    return name.split(".")[0]


def parse_dso_report(text: str) -> dict[str, float]:
    """``perf report --sort dso -g none`` -> {library: share 0..1} (lines merged by label)."""
    shares: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _DSO_LINE.match(line)
        if m:
            label = library_label(m.group(2))
            shares[label] = shares.get(label, 0.0) + float(m.group(1)) / 100.0
    return shares


def parse_event_count(text: str) -> int:
    """The sampled event count of a ``perf report`` (cpu-clock: nanoseconds of CPU)."""
    m = _EVENT_COUNT.search(text)
    if not m:
        raise SystemExit("perf report printed no 'Event count'; is the perf.data empty?")
    return int(m.group(1))


def parse_symbol_share(text: str, symbol: str) -> float:
    """The share (0..1) of ``symbol`` in a ``perf report --sort sym -g none``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith("#") and line.rstrip().endswith(symbol):
            m = re.match(r"^\s*([\d.]+)%", line)
            if m:
                total += float(m.group(1)) / 100.0
    return total


def perf_split(perf: str, pids: list[int], window_s: float, frequency: int,
               data: Path) -> dict:
    """Sample ``pids`` for ``window_s`` seconds; the CPU seconds sampled, each library's share
    and the bytecode loop's share."""
    rec = subprocess.run([perf, "record", "-F", str(frequency), "-e", "cpu-clock",
                          "-p", ",".join(map(str, pids)), "-o", str(data), "--", "sleep",
                          f"{window_s:g}"], capture_output=True, text=True,
                         timeout=window_s + 60)
    if rec.returncode != 0 or not data.is_file():
        raise SystemExit(f"perf record failed (exit {rec.returncode}): {rec.stderr[-800:]}\n"
                         "(needs Linux perf and permission to sample the server: "
                         "kernel.perf_event_paranoid <= 1, or root)")
    report = [perf, "report", "-i", str(data), "--stdio", "--no-children", "-g", "none"]
    by_dso = subprocess.run(report + ["--sort", "dso"], capture_output=True, text=True,
                            timeout=300)
    by_sym = subprocess.run(report + ["--sort", "sym"], capture_output=True, text=True,
                            timeout=300)
    return {"cpu_s": parse_event_count(by_dso.stdout) / 1e9,
            "shares": parse_dso_report(by_dso.stdout),
            "eval_share": parse_symbol_share(by_sym.stdout, EVAL_SYMBOL)}


def answered(c0: dp.Counters, c1: dp.Counters) -> float:
    """Answers (results and errors) between two counter scrapes."""
    return sum(c1.completed.get(m, 0.0) - c0.completed.get(m, 0.0)
               + c1.errors.get(m, 0.0) - c0.errors.get(m, 0.0) for m in c1.completed)


def measure(args, target: str, protocol: str, lf: float, rates: dict[str, float], proc,
            port: int, counters, workdir: Path) -> dict:
    tag = f"split-{target}-{protocol}-{lf:g}"
    load = dp.OpenLoopLoad(args, port, protocol, rates,
                           args.warmup_s + args.window_s + 1.0, workdir, tag)
    load.start()
    time.sleep(args.warmup_s)
    c0, t0 = counters(), time.monotonic()
    got = perf_split(args.perf, dp.descendants(proc.pid), args.window_s, args.frequency,
                     workdir / f"{tag}.perf.data")
    c1, t1 = counters(), time.monotonic()
    load.finish(args.drain_s + 60.0)
    # the scrapes bracket perf's window (its start-up and the report in between): answers
    # per second over the scrapes, times the sampled seconds
    n = answered(c0, c1) * args.window_s / (t1 - t0)
    if n <= 0:
        raise SystemExit(f"{target} {protocol} at {lf:g}: no request answered in the window")
    us = got["cpu_s"] * 1e6 / n
    print(f"  {target:5s} {protocol:4s} load {lf:g}: {n / args.window_s:.0f} answers/s, "
          f"{us:.0f} us/request sampled", file=sys.stderr)
    return {"target": target, "protocol": protocol, "load_factor": lf, "answered": n,
            "cpu_us_per_request": us,
            "by_library_us": {k: v * us for k, v in got["shares"].items()},
            "bytecode_loop_us": got["eval_share"] * us}


def median_point(repeats: list[dict]) -> dict:
    """One point standing for the repeats of a (target, protocol, load factor): the median of
    each figure (a library absent from a repeat counts 0 there), answers summed."""
    first = repeats[0]
    libs = dict.fromkeys(k for r in repeats for k in r["by_library_us"])
    return {"target": first["target"], "protocol": first["protocol"],
            "load_factor": first["load_factor"], "repeats": len(repeats),
            "answered": sum(r["answered"] for r in repeats),
            "cpu_us_per_request": statistics.median(r["cpu_us_per_request"] for r in repeats),
            "cpu_us_samples": [round(r["cpu_us_per_request"], 1) for r in repeats],
            "by_library_us": {k: statistics.median(r["by_library_us"].get(k, 0.0)
                                                   for r in repeats) for k in libs},
            "bytecode_loop_us": statistics.median(r["bytecode_loop_us"] for r in repeats)}


def rows_of(points: list[dict]) -> list[dict]:
    """One row per (protocol, load factor, library): live and floor us/request (medians over
    the repeats of a point), difference."""
    rows = []
    grouped: dict[tuple, list[dict]] = {}
    for p in points:
        grouped.setdefault((p["target"], p["protocol"], p["load_factor"]), []).append(p)
    keyed = {k: median_point(v) for k, v in grouped.items()}
    for (target, protocol, lf), live in keyed.items():
        if target != "live":
            continue
        floor = keyed.get(("floor", protocol, lf))
        libs = dict(live["by_library_us"])
        libs[f"of which the bytecode loop ({EVAL_SYMBOL})"] = live["bytecode_loop_us"]
        flibs = dict(floor["by_library_us"]) if floor else {}
        if floor:
            flibs[f"of which the bytecode loop ({EVAL_SYMBOL})"] = floor["bytecode_loop_us"]
        names = sorted(set(libs) | set(flibs),
                       key=lambda k: -(libs.get(k, 0.0) - flibs.get(k, 0.0)))
        total = ("all", live["cpu_us_per_request"], floor["cpu_us_per_request"] if floor else None)
        for name, lv, fv in [total] + [(k, libs.get(k, 0.0), flibs.get(k, 0.0) if floor else None)
                                       for k in names]:
            rows.append({"protocol": protocol, "load_factor": lf, "library": name,
                         "live_us_per_request": lv, "floor_us_per_request": fv,
                         "difference_us": None if fv is None else lv - fv})
        rows[-len(names) - 1].update(  # the "all" row: every window's figure
            live_samples=live["cpu_us_samples"],
            floor_samples=floor["cpu_us_samples"] if floor else None)
    return rows


def _cell(value: float | None, samples: list[float] | None) -> str:
    """A figure, with its windows' range when there were several."""
    text = dp.fmt(value)
    if samples and len(samples) > 1:
        text += f" ({min(samples):.0f}-{max(samples):.0f})"
    return text


def markdown(argv: list[str], rows: list[dict], wall_s: float, min_us: float,
             repeats: int = 1) -> str:
    lines = ["# Server CPU per request by library, live vs the echo floor "
             "(`scripts/bench_cpu_split.py`)", "",
             f"Run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, command: "
             f"`{' '.join(['.venv/bin/python', 'scripts/bench_cpu_split.py', *argv])}` "
             f"(wall time {wall_s:.0f} s).  **EMULATED** plan (timing-only workers) served by "
             "`ppipe serve --plan P --emulate`; the floor is `bench_dataplane.py`'s bare echo "
             "server of the same protocol; both under `scripts/loadgen.py` (open loop) at the "
             "same rates; `perf record -e cpu-clock` on the server's process tree"
             + (f"; every cell the median of {repeats} windows, live and floor interleaved"
                if repeats > 1 else "; one window per cell") +
             f".  Libraries below {min_us:g} us/request in both columns are left out.", "",
             "| protocol | load | library | live us/req | floor us/req | live - floor |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        small = (abs(r["live_us_per_request"]) < min_us
                 and abs(r["floor_us_per_request"] or 0.0) < min_us)
        if small and r["library"] != "all":
            continue
        bold = "**" if r["library"] == "all" else ""
        lines.append(f"| {r['protocol']} | {r['load_factor']:g} | {bold}{r['library']}{bold} | "
                     f"{_cell(r['live_us_per_request'], r.get('live_samples'))} | "
                     f"{_cell(r['floor_us_per_request'], r.get('floor_samples'))} | "
                     f"{dp.fmt(r['difference_us'], '+.1f')} |")
    lines += ["", "perf samples the CPU clock at a fixed frequency; a library's us/request = its "
              "share of the samples x the sampled CPU time / the answers in the window.  perf's "
              "own cost is in both columns alike; compare columns within a run.  The load "
              "generator shares the cores and is not sampled.", "",
              dp.NOTES_MARKER, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", type=int, default=dp.DEFAULT_GROUP)
    p.add_argument("--cluster", default=dp.DEFAULT_CLUSTER)
    p.add_argument("--plan", type=Path, help="serve this plan.json instead of planning")
    p.add_argument("--profiles", type=Path, default=None)
    p.add_argument("--protocols", default="http,grpc", help="comma list of http, grpc")
    p.add_argument("--load-factors", type=float, nargs="+", default=[0.3, 0.7])
    p.add_argument("--window-s", type=float, default=8.0, help="sampled seconds per point")
    p.add_argument("--repeats", type=int, default=1, metavar="N",
                   help="sample every point N times, live and floor interleaved; the table "
                        "gives medians (an odd N makes each one of the samples)")
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument("--drain-s", type=float, default=3.0)
    p.add_argument("--frequency", type=int, default=999, help="perf samples per second")
    p.add_argument("--perf", default=shutil.which("perf") or "perf", help="the perf binary")
    p.add_argument("--min-us", type=float, default=2.0,
                   help="leave out libraries below this many us/request live and floor")
    p.add_argument("--start-timeout-s", type=float, default=180.0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_cpu_split"))
    p.add_argument("--json", type=Path)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "cpu_split.md")
    args = p.parse_args(argv)
    protocols = [x.strip() for x in args.protocols.split(",") if x.strip()]
    if not protocols or any(x not in ("http", "grpc") for x in protocols):
        p.error(f"--protocols {args.protocols!r}: expected a comma list of http, grpc")
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: expected an integer >= 1")
    if not shutil.which(args.perf) and not Path(args.perf).is_file():
        p.error(f"perf not found ({args.perf}); install linux-perf or give --perf PATH")
    # what bench_dataplane's servers and load generator read from its own options
    args.frontends, args.server_tree = 1, ROOT
    if args.profiles is None:
        args.profiles = Path(os.environ.get("PPIPE_PROFILES")
                             or ROOT.parent / "shared" / "ppipe-profiles")
    args.profiles = args.profiles.resolve()
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        plan_path = dp.make_plan(args, args.workdir)
        from ppipe_trt.plan import load_plan

        plan = load_plan(plan_path)
        models = [m.model for m in plan.models]
        proc, http_port, grpc_port, _ = dp.start_live(args, plan_path, args.workdir)
        dp.check_models(http_port, models)
        points = []
        for protocol in protocols:
            echo, echo_port = dp.start_echo(args, protocol, models, args.workdir)
            for lf in args.load_factors:
                rates = {m.model: m.throughput_rps * lf for m in plan.models}
                live_port = grpc_port if protocol == "grpc" else http_port
                for _ in range(args.repeats):
                    points.append(measure(args, "live", protocol, lf, rates, proc, live_port,
                                          lambda: dp.live_counters(http_port), args.workdir))
                    points.append(measure(
                        args, "floor", protocol, lf, rates, echo, echo_port,
                        lambda: dp.echo_counters(protocol, echo_port, models), args.workdir))
            dp.Children.stop(echo)
    finally:
        dp.CHILDREN.stop_all()
    rows = rows_of(points)
    text = markdown(argv, rows, time.monotonic() - t0, args.min_us, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    old = args.out.read_text() if args.out.is_file() else ""
    if dp.NOTES_MARKER in old:  # keep the notes written under the marker
        text = text[:text.index(dp.NOTES_MARKER)] + old[old.index(dp.NOTES_MARKER):]
    args.out.write_text(text)
    print(text[:text.index(dp.NOTES_MARKER)])
    if args.json:
        args.json.write_text(json.dumps({"points": points, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
