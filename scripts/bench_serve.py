#!/usr/bin/env python
"""Benchmark of the live server (issue 5, acceptance 4).

Part A -- emulated cluster (default 4 L4 + 12 T4, the paper's 16-GPU testbed shape) serving one
model from the shared profiles.  The model exists only as profiles, so its workers run
timing-only: each holds a batch for the profiled latency of its GPU class, block range, batch
and MPS share.  The same plan is searched twice for its maximum load at >= 99 % attainment
(load factor x the plan's throughput, Poisson arrivals, open loop):

* by the simulator (the scheduler on a virtual clock), and
* by the live runtime on the wall clock (worker threads, real hand-offs, the runtime loop),
  fed by an open-loop Poisson generator -- in process (``--via runtime``), or over HTTP
  through the FastAPI front end (``--via http``, a separate load-generator process).

Part B -- the front end on this machine: JPEG decode + preprocess rate (frames/s, one core),
HTTP frames throughput of the built-in ``demo_resnet`` (decode + inference), and the front
end's overhead per request (client round trip minus the runtime's own latency).

All figures of part A are EMULATED GPU classes.  Timings on a shared 2-core machine are
noisy.  Writes the table to stdout and, with ``--out``, as markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ppipe_trt.cluster import ClusterSpec, GpuPool, load_cluster  # noqa: E402
from ppipe_trt.profiles import default_profiles_dir, load_profiles  # noqa: E402


def paper_testbed() -> ClusterSpec:
    return ClusterSpec((GpuPool("L4", 4, gpus_per_server=4, max_mps=4, link_bandwidth_gbps=10.0),
                        GpuPool("T4", 12, gpus_per_server=2, max_mps=4,
                                link_bandwidth_gbps=10.0)), "4xL4+12xT4")


# ---- part A: live vs simulated maximum load -------------------------------------------------

def live_attainment(runtime, model: str, rate_rps: float, duration_s: float, warmup_s: float,
                    seed: int) -> tuple[float, int, dict]:
    """Open-loop Poisson arrivals into the runtime; attainment over the post-warm-up window."""
    rng = np.random.default_rng(seed)
    total_s = warmup_s + duration_s
    times = np.cumsum(rng.exponential(1.0 / rate_rps, int(rate_rps * total_s * 1.2) + 10))
    times = times[times < total_s]
    futures = []
    start = time.monotonic()
    for t in times:
        delay = start + t - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        futures.append(runtime.submit(model, None))
    wait(futures, timeout=60)
    counted = [f for f, t in zip(futures, times) if t >= warmup_s]
    ok = sum(1 for f in counted if f.done() and f.exception() is None and f.result().met_deadline)
    reasons: dict[str, int] = {}
    for f in counted:
        if not f.done():
            reasons["unanswered"] = reasons.get("unanswered", 0) + 1
        elif f.exception() is not None:
            r = getattr(f.exception(), "reason", type(f.exception()).__name__)
            reasons[r] = reasons.get(r, 0) + 1
        elif not f.result().met_deadline:
            reasons["late"] = reasons.get("late", 0) + 1
    return ok / max(1, len(counted)), len(counted), reasons


def http_attainment(url: str, model: str, rate_rps: float, duration_s: float, warmup_s: float,
                    seed: int) -> tuple[float, int, dict]:
    """Same, but every request is an HTTP POST (JSON) from an asyncio open-loop generator."""
    import httpx

    body = json.dumps({"inputs": [{"name": "INPUT__0", "shape": [1, 1], "datatype": "FP32",
                                   "data": [0.0]}]}).encode()
    rng = np.random.default_rng(seed)
    total_s = warmup_s + duration_s
    times = np.cumsum(rng.exponential(1.0 / rate_rps, int(rate_rps * total_s * 1.2) + 10))
    times = times[times < total_s]

    async def run():
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
        async with httpx.AsyncClient(base_url=f"http://{url}", limits=limits,
                                     timeout=30.0) as client:
            async def one(t):
                try:
                    r = await client.post(f"/v2/models/{model}/infer", content=body,
                                          headers={"Content-Type": "application/json"})
                except httpx.TransportError as exc:  # the generator itself fell behind
                    return t, f"client {type(exc).__name__}"
                if r.status_code != 200:
                    return t, r.json().get("reason", str(r.status_code))
                met = float(r.headers["X-PPipe-Latency-Ms"]) <= slo_ms
                return t, "ok" if met else "late"

            tasks = []
            start = time.monotonic()
            for t in times:
                delay = start + t - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(t)))
            return await asyncio.gather(*tasks)

    slo_ms = httpx.get(f"http://{url}/v2/models/{model}").json()["parameters"]["slo_ms"]
    outcomes = [o for t, o in asyncio.run(run()) if t >= warmup_s]
    reasons: dict[str, int] = {}
    for o in outcomes:
        if o != "ok":
            reasons[o] = reasons.get(o, 0) + 1
    return sum(o == "ok" for o in outcomes) / max(1, len(outcomes)), len(outcomes), reasons


def part_a(args, lines: list[str]) -> None:
    from ppipe_trt.serving.local import emulated_plan
    from ppipe_trt.serving.runtime import measure_hop_overhead_us
    from ppipe_trt.simulator import SimConfig, search_load_factor

    profiles = load_profiles(args.profiles, [args.model])
    cluster = load_cluster(args.emulate) if args.emulate else paper_testbed()
    plan = emulated_plan(profiles, cluster, [args.model])
    mp = plan.models[0]
    hop = measure_hop_overhead_us()
    sim = search_load_factor(plan, profiles, SimConfig(duration_s=args.sim_duration, warmup_s=2.0,
                                                       hop_overhead_us=hop),
                             target=0.99, start=1.2, step=args.step)
    sim_factor = sim.per_model_load_factor[args.model]
    lines += [
        f"## Part A: live server vs simulator, EMULATED cluster {cluster.label} "
        f"(timing-only workers)", "",
        f"model `{args.model}`, SLO {mp.slo_ms:.1f} ms, plan throughput "
        f"{mp.throughput_rps:.1f} req/s, measured hop overhead {hop:.0f} us (given to both); "
        f"pipelines: " + "; ".join(
            f"batch {p.batch_size}: " + " -> ".join(
                f"{s.workers}x {s.gpu_class}/MPS{s.mps_share} blocks {s.first_block}..{s.last_block}"
                for s in p.stages) for p in mp.pipelines), "",
        f"open-loop Poisson, live runs of {args.duration:.0f} s (+{args.warmup:.0f} s warm-up) "
        f"per load factor; simulator runs of {args.sim_duration:.0f} s.  `late` = answered "
        f"after the deadline (runtime latency); `deadline_unreachable` = dropped at once.", "",
        "| live via | load factor | offered req/s | simulator attainment | live attainment "
        "| live requests | live misses by reason |", "|---|---|---|---|---|---|---|"]
    sim_by_factor = {round(r.load_factor, 6): r.models[0].attainment for r in sim.runs}
    summary = [f"| simulator | {sim_factor:.3f} | {sim_factor * mp.throughput_rps:.1f} | - |"]
    for via in args.via.split(","):
        live_factor = live_search(args, via, plan, profiles, hop, sim_factor, sim_by_factor,
                                  lines)
        ratio = live_factor / sim_factor if sim_factor else float("nan")
        summary.append(f"| live server (emulated, via {via}) | {live_factor:.3f} | "
                       f"{live_factor * mp.throughput_rps:.1f} | **{ratio:.3f}** |")
    lines += ["", "| | max load factor at 99 % attainment | req/s | live / simulator "
              "(target >= 0.95) |", "|---|---|---|---|", *summary, "",
              "The live search starts at the simulator's factor and steps down by "
              f"{args.step / 2:g}, so a ratio of 1.000 means *at least* the simulator's load.", ""]
    if args.perf_analyzer:
        # perf_analyzer stops at the first failed request, so it runs below the knee
        lines += perf_analyzer_run(args, plan, profiles, hop, 0.65 * mp.throughput_rps)


def perf_analyzer_run(args, plan, profiles, hop, rate_rps: float) -> list[str]:
    """Triton's perf_analyzer, unchanged, against the emulated server (Poisson rate mode)."""
    import subprocess

    from ppipe_trt.serving.assembly import RuntimeOptions

    server = _Server(plan, profiles, None, RuntimeOptions(hop_overhead_us=hop), args.port + 2)
    cmd = [str(args.perf_analyzer), "-m", args.model, "-u", f"127.0.0.1:{args.port + 2}",
           "-i", "http", "--request-rate-range", f"{rate_rps:.0f}", "--request-distribution",
           "poisson", "--max-threads", "64", "--measurement-interval", "5000",
           "--stability-percentage", "20"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    finally:
        server.stop()
    keep = [ln.strip() for ln in proc.stdout.splitlines()
            if any(k in ln for k in ("Request count", "Throughput", "p50 latency",
                                     "p99 latency", "Avg latency", "WARNING"))]
    return ["### perf_analyzer (tritonclient 2.51.0 binary, unchanged) against the emulated "
            "server", "", f"`{' '.join(cmd[1:])}` (exit {proc.returncode})", "", "```",
            *(keep or proc.stdout.splitlines()[-15:] + proc.stderr.splitlines()[-5:]), "```", ""]


def live_search(args, via, plan, profiles, hop, sim_factor, sim_by_factor, lines) -> float:
    """Step down from the simulator's factor until the live server reaches 99 %."""
    from ppipe_trt.serving.assembly import RuntimeOptions, build_runtime

    mp = plan.models[0]
    options = RuntimeOptions(hop_overhead_us=hop)
    server = runtime = None
    if via == "http":
        server = _Server(plan, profiles, None, options, args.port)
    else:
        runtime = build_runtime(plan, profiles, None, options).start()
    live_factor = 0.0
    factor = round(sim_factor, 6)
    tried = 0
    try:
        while factor >= args.step - 1e-9 and tried < args.max_live_runs:
            rate = factor * mp.throughput_rps
            if runtime is not None:
                att, n, reasons = live_attainment(runtime, args.model, rate, args.duration,
                                                  args.warmup, seed=tried)
            else:  # the generator runs in its own process: it must not share the GIL
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
                    att, n, reasons = ex.submit(http_attainment, f"127.0.0.1:{args.port}",
                                                args.model, rate, args.duration, args.warmup,
                                                tried).result()
            tried += 1
            simatt = sim_by_factor.get(factor)
            lines.append(f"| {via} | {factor:.3f} | {rate:.1f} | "
                         f"{'-' if simatt is None else f'{simatt:.4f}'} | {att:.4f} | {n} | "
                         f"{reasons or '-'} |")
            print(lines[-1], flush=True)
            if att >= 0.99:
                live_factor = factor
                break
            factor = round(factor - args.step / 2, 6)
    finally:
        if runtime is not None:
            runtime.stop()
        if server is not None:
            server.stop()
    return live_factor


class _Server:
    """uvicorn with the real app, in a thread of this process."""

    def __init__(self, plan, profiles, built, options, port):
        import uvicorn

        from api.app import create_app
        from ppipe_trt.serving.assembly import build_runtime

        app = create_app(lambda: build_runtime(plan, profiles, built, options))
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


# ---- part B: the front end -------------------------------------------------------------------

def sample_jpeg(width=640, height=480) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((width, height), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def part_b(args, lines: list[str]) -> None:
    import httpx

    from api.frames import decode_frame
    from ppipe_trt.engines import build_model_engines
    from ppipe_trt.serving.runtime import ImageSpec

    jpeg = sample_jpeg()
    spec = ImageSpec("image", 224, 224)
    for _ in range(5):
        decode_frame(jpeg, spec)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 2.0:
        decode_frame(jpeg, spec)
        n += 1
    decode_fps = n / (time.perf_counter() - t0)

    built = build_model_engines("demo_resnet", "cpu", store_root=args.engines, progress=False)
    from ppipe_trt.serving.assembly import RuntimeOptions
    from ppipe_trt.serving.local import pipeline_plan

    profiles = load_profiles(built.profile_path)
    # batch 1, one stage: the runtime adds no batching wait, so the gap is the front end's
    plan = pipeline_plan(profiles, "demo_resnet", cuts=[], gpu_class="cpu", batch_size=1,
                         slo_ms=1000.0)
    server = _Server(plan, profiles, {"demo_resnet": built}, RuntimeOptions(), args.port + 1)
    url = f"http://127.0.0.1:{args.port + 1}"
    x = np.zeros((1, 3, 224, 224), np.float32)
    header = json.dumps({"inputs": [{"name": "image", "shape": [1, 3, 224, 224],
                                     "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            overheads, rtts = [], []
            for i in range(args.overhead_requests + 10):
                t = time.perf_counter()
                r = c.post("/v2/models/demo_resnet/infer", content=header + x.tobytes(),
                           headers={"Inference-Header-Content-Length": str(len(header))})
                rtt = (time.perf_counter() - t) * 1000
                assert r.status_code == 200, r.text
                if i >= 10:
                    rtts.append(rtt)
                    overheads.append(rtt - float(r.headers["X-PPipe-Latency-Ms"]))
            frames_rtt = []
            for i in range(30):
                t = time.perf_counter()
                r = c.post("/v2/models/demo_resnet/frames", content=jpeg,
                           headers={"Content-Type": "image/jpeg"})
                assert r.status_code == 200, r.text
                frames_rtt.append((time.perf_counter() - t) * 1000)
        fps = http_frames_fps(url, jpeg, args.frames_seconds, args.concurrency)
    finally:
        server.stop()
    lines += [
        "## Part B: front end on this machine (real model `demo_resnet`, ONNX Runtime CPU)", "",
        "| measure | value |", "|---|---|",
        f"| JPEG 640x480 decode + resize + normalize (one thread) | {decode_fps:.0f} frames/s |",
        f"| HTTP frames throughput (decode + inference, {args.concurrency} clients, "
        f"closed loop) | {fps:.0f} frames/s |",
        f"| frames round trip, one client (median) | {statistics.median(frames_rtt):.2f} ms |",
        f"| v2 infer round trip, binary tensors, one client (median) | "
        f"{statistics.median(rtts):.2f} ms |",
        f"| front-end overhead per request = round trip - runtime latency (median) | "
        f"{statistics.median(overheads):.2f} ms |",
        f"| same, p90 | {np.percentile(overheads, 90):.2f} ms |", ""]


def http_frames_fps(url: str, jpeg: bytes, seconds: float, concurrency: int) -> float:
    import httpx

    async def run():
        stop = time.monotonic() + seconds
        count = 0
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async def worker():
                nonlocal count
                while time.monotonic() < stop:
                    r = await client.post("/v2/models/demo_resnet/frames", content=jpeg,
                                          headers={"Content-Type": "image/jpeg"})
                    if r.status_code == 200:
                        count += 1
            t0 = time.monotonic()
            await asyncio.gather(*[worker() for _ in range(concurrency)])
            return count / (time.monotonic() - t0)

    return asyncio.run(run())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profiles", type=Path, default=default_profiles_dir())
    p.add_argument("--model", default="colorization-v2")
    p.add_argument("--emulate", type=Path, help="cluster YAML (default 4 L4 + 12 T4)")
    p.add_argument("--via", default="runtime,http",
                   help="comma list: runtime (in-process generator) and/or http (through the "
                        "FastAPI front end)")
    p.add_argument("--duration", type=float, default=20.0, help="live seconds per load factor")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--sim-duration", type=float, default=30.0)
    p.add_argument("--step", type=float, default=0.02, help="load-factor step of the search")
    p.add_argument("--max-live-runs", type=int, default=8)
    p.add_argument("--engines", type=Path, default=ROOT / "engines")
    p.add_argument("--port", type=int, default=18700)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--frames-seconds", type=float, default=8.0)
    p.add_argument("--overhead-requests", type=int, default=200)
    p.add_argument("--perf-analyzer", type=Path,
                   default=os.environ.get("PERF_ANALYZER") or shutil.which("perf_analyzer"),
                   help="perf_analyzer binary (or $PERF_ANALYZER); run against the emulated "
                        "server when given")
    p.add_argument("--skip-a", action="store_true")
    p.add_argument("--skip-b", action="store_true")
    p.add_argument("--out", type=Path, help="also write the markdown here")
    args = p.parse_args(argv)
    sys.setswitchinterval(0.0005)
    lines = ["# Serving benchmark (`scripts/bench_serve.py`)", "",
             f"Run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"command: `python scripts/bench_serve.py {' '.join(argv or sys.argv[1:])}`.  "
             "Part A figures are **emulated** GPU classes (timing-only workers on this CPU "
             "machine).  The machine has 2 cores shared with other work: timings are noisy.", ""]
    if not args.skip_a:
        part_a(args, lines)
    if not args.skip_b:
        part_b(args, lines)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
