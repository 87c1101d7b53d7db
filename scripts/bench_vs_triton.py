#!/usr/bin/env python
"""``ppipe serve`` beside a real Triton Inference Server on the same ONNX model, the same client
and the same cores: goodput against offered load (see ppipe_trt/bench/vs_triton.py for the
method, ppipe_trt/bench/triton_peer.py for how tritonserver is installed and run).

    .venv/bin/python scripts/bench_vs_triton.py                      # demo_resnet, ~10 min
    .venv/bin/python scripts/bench_vs_triton.py --model demo_resnet --model demo_detector \\
        --model demo_unet --json out/vs_triton.json --png docs/benchmarks/vs_triton.png
    .venv/bin/python scripts/bench_vs_triton.py --seconds 3 --repeats 1 --loads 0.5,1,2 \\
        --note "Smoke run" --ppipe-arg --no-calibrate                 # a quick check

Extra ``ppipe serve`` arguments: ``--ppipe-arg ARG`` (repeatable; an ARG starting with "--"
is taken as the value, e.g. ``--ppipe-arg --policy --ppipe-arg triton``).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ppipe_trt.errors import PPipeError  # noqa: E402


def _loads(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--loads {text!r}; expected numbers like 0.5,1,2")
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"--loads {text!r}; expected positive multiples")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", type=Path, default=ROOT / "examples" / "model_repository",
                   help="Triton-layout model repository (default: examples/model_repository)")
    p.add_argument("--model", action="append", dest="models", metavar="NAME",
                   help="model to compare (repeatable; default demo_resnet)")
    p.add_argument("--workers", type=int, default=2,
                   help="ppipe --slots N and Triton instance count N (default 2)")
    p.add_argument("--loads", type=_loads, default=(0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0),
                   help="offered loads as multiples of Triton's 99%% capacity "
                        "(default 0.25,0.5,0.75,1,1.25,1.5,2)")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds per load point")
    p.add_argument("--repeats", type=int, default=3,
                   help="repeats of every point (medians reported; default 3)")
    p.add_argument("--capacity-rps", type=float, default=None,
                   help="Triton's capacity (req/s): skip the search")
    p.add_argument("--search-seconds", type=float, default=3.0,
                   help="seconds per capacity-search probe (default 3)")
    p.add_argument("--search-probes", type=int, default=8,
                   help="capacity-search probes at most (default 8)")
    p.add_argument("--slo-ms", type=float, default=None,
                   help="SLO (ms) instead of the model config's slo_ms (also passed to ppipe)")
    p.add_argument("--ppipe-arg", action="append", dest="ppipe_args", default=[],
                   metavar="ARG", help="extra argument of ppipe serve (repeatable)")
    p.add_argument("--quiet-host-pct", type=float, default=25.0,
                   help="before each point wait until other processes use less than this %% "
                        "of a core (a shared machine; 0: do not wait; default 25)")
    p.add_argument("--quiet-host-timeout-s", type=float, default=60.0,
                   help="wait at most this long for that (default 60)")
    p.add_argument("--server-nice", type=int, default=10,
                   help="run both servers at this niceness so that the load generator, which "
                        "shares their cores, keeps its schedule under overload (0: as is; "
                        "default 10)")
    p.add_argument("--triton-queue-timeout", type=float, default=None, metavar="FRACTION",
                   help="give Triton's dynamic batcher a queue policy rejecting requests that "
                        "waited FRACTION x the SLO (default: none, Triton queues without bound "
                        "under overload)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-build", action="store_true",
                   help="do not run ppipe engines build first")
    p.add_argument("--work-dir", type=Path, default=ROOT / ".cache" / "bench_vs_triton",
                   help="twin repositories and server logs (default .cache/bench_vs_triton)")
    p.add_argument("--json", type=Path, help="write the records (medians) as JSON")
    p.add_argument("--png", type=Path, help="write goodput vs offered load as PNG")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "vs_triton.md",
                   help="markdown report (default docs/benchmarks/vs_triton.md; '-' for none)")
    p.add_argument("--note", default=None, help="a line at the top of the report")
    return p


def _join_ppipe_args(argv: list[str]) -> list[str]:
    """``--ppipe-arg --flag`` -> ``--ppipe-arg=--flag`` (argparse would read --flag as an
    option of this script)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--ppipe-arg" and i + 1 < len(argv):
            out.append(f"--ppipe-arg={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    from ppipe_trt.bench import report
    from ppipe_trt.bench.vs_triton import CompareOptions, aggregate, compare

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(_join_ppipe_args(argv))
    started = datetime.datetime.now().astimezone()
    info = report.RunInfo(command=report.command_line([sys.argv[0], *argv]),
                          date=started.strftime("%Y-%m-%d %H:%M %Z"), host=report.host_note(),
                          commit=report.git_commit(), note=args.note)
    options = CompareOptions(
        repository=args.model_repository.resolve(), models=tuple(args.models or ["demo_resnet"]),
        work_dir=args.work_dir.resolve(), workers=args.workers, load_factors=args.loads,
        seconds=args.seconds, repeats=args.repeats, capacity_rps=args.capacity_rps,
        search_seconds=args.search_seconds, search_probes=args.search_probes,
        slo_ms=args.slo_ms, ppipe_args=tuple(args.ppipe_args), seed=args.seed,
        build_engines=not args.no_build, quiet_host_pct=args.quiet_host_pct,
        quiet_host_timeout_s=args.quiet_host_timeout_s, server_nice=args.server_nice,
        triton_queue_timeout=args.triton_queue_timeout)
    try:
        results = compare(options, progress=lambda line: print(line, flush=True))
    except PPipeError as exc:
        print(f"bench_vs_triton: error: {exc}", file=sys.stderr)
        return 1
    records = [r for result in results for r in aggregate(result)]
    for result in results:
        print(f"\n{result.model}: SLO {result.slo_ms:g} ms, Triton 99 % capacity "
              f"{result.capacity_rps:.1f} req/s, ppipe printed: {result.ppipe_capacity_line}")
        print(report.console_table([r for r in records if r["model"] == result.model]))
        for warning in result.warnings:
            print(f"warning: {warning}")
    if args.json:
        report.write_json(args.json, records)
    if args.png:
        report.write_png(args.png, results, records)
    if str(args.out) != "-":
        report.write_markdown(args.out, info, results, records, args.png)
        print(f"\nreport: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
