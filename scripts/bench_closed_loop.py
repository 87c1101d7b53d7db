#!/usr/bin/env python
"""Closed-loop clients against ``ppipe serve``: throughput and latency at concurrency 1..N.

A closed-loop client sends its next request when the previous one is answered: perf_analyzer
at ``--concurrency-range N``, a sequential tritonclient loop, a video pipeline with a fixed
number of frames in flight.  While its request is held for a fuller batch it sends nothing,
so the wait never fills the batch; this benchmark shows what such clients get.

For each code tree (``--baseline REV``, a ``git archive`` copy of this repository at REV, and
this checkout), it starts ``ppipe serve --model-repository DIR --engines DIR`` on a free
port (real engines, planned for this machine, as ``make serve`` does), drives ``--model``
with perf_analyzer over HTTP at each concurrency (binary tensors, ``--measurement-interval``
per point), and prints per concurrency and tree: throughput, p50 / p90 / p99 latency as
perf_analyzer measured them, and each figure's ratio to the baseline's in the same run.

    scripts/bench_closed_loop.py --model-repository DIR --model NAME --engines engines \\
        --baseline HEAD~1 --out docs/benchmarks/closed_loop.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench_dataplane import export_commit, free_port  # noqa: E402  (git archive, a free port)

FIGURES = (("throughput", "Throughput: ([0-9.]+) infer/sec", 1.0),
           ("p50_ms", "p50 latency: ([0-9]+) usec", 1e-3),
           ("p90_ms", "p90 latency: ([0-9]+) usec", 1e-3),
           ("p99_ms", "p99 latency: ([0-9]+) usec", 1e-3))


def serve(tree: Path, args, port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-m", "ppipe_trt.cli", "serve", "--model-repository",
           str(args.model_repository), "--engines", str(args.engines), "--port", str(port),
           "--grpc-port", "0"]
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + args.start_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"ppipe serve from {tree} exited ({proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready",
                                        timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"ppipe serve from {tree} not ready in {args.start_timeout_s} s; see {log}")


def perf(args, port: int, concurrency: int) -> dict:
    out = subprocess.run([args.perf_analyzer, "-m", args.model, "-u", f"127.0.0.1:{port}",
                          "--concurrency-range", str(concurrency), "--measurement-interval",
                          str(args.interval_ms), "--stability-percentage",
                          str(args.stability_percentage)], capture_output=True, text=True,
                         timeout=args.interval_ms / 1000 * 20 + 60)
    row = {"concurrency": concurrency}
    for key, pattern, scale in FIGURES:
        m = re.search(pattern, out.stdout)
        if m is None:
            raise SystemExit(f"perf_analyzer at concurrency {concurrency} gave no {key}:\n"
                             f"{out.stdout[-1500:]}{out.stderr[-1500:]}")
        row[key] = float(m.group(1)) * scale
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-repository", type=Path, required=True)
    p.add_argument("--model", required=True, help="the model perf_analyzer drives")
    p.add_argument("--engines", type=Path, default=ROOT / "engines",
                   help="engine store (built with `make engines MODEL_REPOSITORY=DIR`)")
    p.add_argument("--baseline", default="HEAD", help="commit to compare with (default HEAD)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--interval-ms", type=int, default=4000)
    p.add_argument("--stability-percentage", type=float, default=10.0,
                   help="perf_analyzer's: how much windows may differ to count as stable")
    p.add_argument("--perf-analyzer", default=os.environ.get(
        "PERF_ANALYZER", str(ROOT / ".tools" / "perf_analyzer" / "perf_analyzer")))
    p.add_argument("--start-timeout-s", type=float, default=120.0)
    p.add_argument("--out", type=Path, help="also write the table (markdown) here")
    p.add_argument("--json", type=Path, help="also write the rows (JSON) here")
    args = p.parse_args(argv)
    if not Path(args.perf_analyzer).is_file():
        p.error(f"perf_analyzer not found at {args.perf_analyzer}; fetch it with "
                "scripts/fetch_perf_analyzer.sh or set $PERF_ANALYZER")
    args.model_repository = args.model_repository.resolve()
    args.engines = args.engines.resolve()
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="bench-closed-loop-"))
    try:
        base_tree = export_commit(args.baseline, workdir, option="--baseline")
        base_rev = base_tree.name.removeprefix("tree-")
        trees = [(f"baseline {base_rev}", base_tree), ("this checkout", ROOT)]
        rows = []
        for label, tree in trees:
            port = free_port()
            proc = serve(tree, args, port, workdir / f"serve-{len(rows)}.log")
            try:
                for c in args.concurrency:
                    row = perf(args, port, c)
                    row["tree"] = label
                    rows.append(row)
                    print(f"{label}: concurrency {c}: {row['throughput']:.1f} infer/s, p50 "
                          f"{row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms",
                          file=sys.stderr)
            finally:
                proc.terminate()
                proc.wait(30)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    base = {r["concurrency"]: r for r in rows if r["tree"] == trees[0][0]}
    lines = ["# Closed-loop clients (`scripts/bench_closed_loop.py`)", "",
             f"Run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, command: "
             f"`{' '.join([Path(sys.argv[0]).name] + (argv or sys.argv[1:]))}` (wall time "
             f"{time.time() - started:.0f} s).  `ppipe serve --model-repository` (real ONNX "
             f"Runtime engines, planned for this machine), perf_analyzer over HTTP on model "
             f"`{args.model}`, {args.interval_ms} ms per point; baseline: commit {base_rev}.",
             "", "| concurrency | code | infer/s | p50 ms | p90 ms | p99 ms | infer/s vs "
             "baseline | p99 vs baseline |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["concurrency"], r["tree"] != trees[0][0])):
        b = base[r["concurrency"]]
        lines.append(f"| {r['concurrency']} | {r['tree']} | {r['throughput']:.1f} | "
                     f"{r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['throughput'] / b['throughput']:.2f} | "
                     f"{r['p99_ms'] / b['p99_ms']:.2f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        notes = ""
        if args.out.exists() and "<!-- notes -->" in args.out.read_text():
            notes = "\n<!-- notes -->" + args.out.read_text().split("<!-- notes -->", 1)[1]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + notes)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
