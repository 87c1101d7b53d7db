#!/usr/bin/env python
"""ppipe-trt side by side with Ray Serve (issue 6, acceptance 3).

The same built-in model (default ``demo_resnet``) on this machine's CPU, the same open-loop
Poisson HTTP load generator (``ppipe_trt.serving.ray_backend.loadgen``, run in this process)
and the same SLO, against three servers, each started as its own process tree:

(a) ppipe-trt local: the server ``ppipe serve --model M --slo-ms S`` builds (stage workers are
    threads of the API process), started by this script so that the runtime's deadline
    margin (``--margin``, a fraction of the SLO; default the runtime's 10 %) can be set,
(b) ppipe-trt on Ray: the same with ``--cluster ray`` (stage workers are actors of a local
    Ray instance started by the server),
(c) a Ray Serve deployment of the unsplit model (ONNX Runtime, default threads) with
    ``@serve.batch(max_batch_size=M, batch_wait_timeout_s=W)``: M = the planner's maximum
    batch (8), W = 10 % of the SLO -- what a user would pick (``--rs-batch``/``--rs-wait-ms``).

For each server the offered rate is doubled until fewer than 99 % of the requests are answered
within the SLO, then bisected; the table shows the highest rate that kept >= 99 % attainment,
its goodput (answers within the SLO per second) and the client latency percentiles there.
Before the load, each server's process tree is left idle for a few seconds and its CPU use
is measured (Ray's own processes: GCS, raylet, Serve controller and proxy).

Timings on a shared 2-core machine are noisy; other work on the machine moves them.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ppipe_trt.serving.ray_backend.loadgen import (HttpRequest, kserve_binary_request,  # noqa
                                                   poisson_arrivals, run_open_loop, summarize)


# ---- the Ray Serve server (run as a subprocess of this script) ---------------------------

def rayserve_main(port: int, onnx_path: str, input_name: str, shape: list[int],
                  max_batch: int, wait_s: float) -> None:
    import onnxruntime as ort
    import ray
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    temp_dir = tempfile.mkdtemp(prefix="bench-rayserve-")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             _temp_dir=temp_dir)
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    @serve.deployment(max_ongoing_requests=4 * max_batch)
    class UnsplitModel:
        def __init__(self) -> None:
            self.session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=wait_s)
        async def infer(self, xs: list[np.ndarray]) -> list[bytes]:
            out = self.session.run(None, {input_name: np.concatenate(xs)})[0]
            return [out[i:i + 1].tobytes() for i in range(len(xs))]

        async def __call__(self, request: Request) -> Response:
            x = np.frombuffer(await request.body(), np.float32).reshape([1] + shape)
            return Response(await self.infer(x), media_type="application/octet-stream")

    serve.run(UnsplitModel.bind(), route_prefix="/")
    print("READY", flush=True)

    def stop(*_):
        serve.shutdown()
        ray.shutdown()
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        time.sleep(3600)


def ppipe_main(cluster: str, port: int, model: str, engines: str, slo_ms: float,
               margin_fraction: float) -> None:
    """What ``ppipe serve --model M --engines E --slo-ms S [--cluster ray]`` does, with the
    runtime's deadline margin (a fraction of the SLO) set explicitly."""
    from types import SimpleNamespace

    import uvicorn

    from api.app import ApiSettings, create_app
    from ppipe_trt.serving.assembly import RuntimeOptions, build_runtime
    from ppipe_trt.server.prepare import prepare

    sys.setswitchinterval(0.0005)  # as ppipe serve
    cli_args = SimpleNamespace(models=[model], plan=None, profiles=None, emulate=None,
                               engines=Path(engines), slots=1, slo_ms=slo_ms)
    plan, profiles, built, what = prepare(cli_args)
    options = RuntimeOptions(deadline_margin_fraction=margin_fraction)
    if cluster == "local":
        factory = lambda: build_runtime(plan, profiles, built, options)  # noqa: E731
    else:
        from ppipe_trt.serving.ray_backend.cli import ray_runtime_factory

        factory = ray_runtime_factory(cluster, plan, profiles, built, options, {})
    uvicorn.run(create_app(factory, ApiSettings()), host="127.0.0.1", port=port,
                log_level="error")


# ---- process-tree helpers ------------------------------------------------------------------

def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_seconds(pids) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in pids:
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


class Server:
    """A server process tree started with ``argv``; ready when ``probe()`` succeeds."""

    def __init__(self, name: str, argv: list[str], url: str, probe_request: HttpRequest):
        self.name, self.argv, self.url, self.probe_request = name, argv, url, probe_request
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        import httpx

        env = dict(os.environ, RAY_AUTH_MODE="disabled")
        self.log = tempfile.NamedTemporaryFile("w+", prefix="bench-server-", suffix=".log")
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.monotonic() + 300
        req = self.probe_request
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{self.name} exited:\n{self.log.read()[-3000:]}")
            try:
                r = httpx.post(self.url + req.path, content=req.content, headers=req.headers,
                               timeout=5)
                if r.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after 300 s")

    def idle_cpu_fraction(self, seconds: float = 4.0) -> tuple[float, int]:
        """(CPU use of the whole process tree while idle, in cores; number of processes)."""
        pids = descendants(self.proc.pid)
        c0 = cpu_seconds(pids)
        time.sleep(seconds)
        return (cpu_seconds(pids) - c0) / seconds, len(pids)

    def __exit__(self, *exc) -> None:
        pids = descendants(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        time.sleep(1.0)
        for p in pids:  # anything of this tree that outlived its parent (only ours)
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass


# ---- the measurement -------------------------------------------------------------------------

def measure(server: Server, request: HttpRequest, rate: float, args) -> tuple:
    total = args.warmup + args.duration
    arrivals = poisson_arrivals(rate, total, seed=int(rate * 1000) % 2**31)
    outcomes = run_open_loop(server.url, arrivals, lambda i: request, timeout_s=10.0)
    return summarize(outcomes, args.slo_ms / 1000.0, args.warmup, total)


def max_rate(server: Server, request: HttpRequest, args, log) -> tuple:
    """Highest offered rate with >= 99 % attainment (doubling, then bisection)."""
    best, bad, rate = None, None, args.start_rps
    while rate <= args.max_rps:
        s = measure(server, request, rate, args)
        log(f"  {server.name}: {rate:7.1f} rps offered -> attainment {s.attainment:.3f}, "
            f"goodput {s.goodput_rps:.1f}, p99 {s.p99_ms:.1f} ms")
        if s.attainment >= 0.99:
            best = (rate, s)
            rate *= 2
        else:
            bad = rate
            break
    if best is None:
        return None
    lo = best[0]
    for _ in range(args.bisect):
        if bad is None:
            break
        mid = (lo + bad) / 2
        s = measure(server, request, mid, args)
        log(f"  {server.name}: {mid:7.1f} rps offered -> attainment {s.attainment:.3f}, "
            f"goodput {s.goodput_rps:.1f}, p99 {s.p99_ms:.1f} ms")
        if s.attainment >= 0.99:
            lo, best = mid, (mid, s)
        else:
            bad = mid
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo_resnet")
    ap.add_argument("--slo-ms", type=float, default=50.0)
    ap.add_argument("--engines", type=Path, default=None, help="engine store (default: temp)")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per rate")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--start-rps", type=float, default=25.0)
    ap.add_argument("--max-rps", type=float, default=3200.0)
    ap.add_argument("--bisect", type=int, default=3)
    ap.add_argument("--rs-batch", type=int, default=8, help="Ray Serve max_batch_size")
    ap.add_argument("--rs-wait-ms", type=float, default=None,
                    help="Ray Serve batch_wait_timeout_s in ms (default 10 %% of the SLO)")
    ap.add_argument("--only", action="append", choices=["local", "ray", "rayserve"])
    ap.add_argument("--out", type=Path, help="also write the markdown table here")
    ap.add_argument("--margin", type=float, action="append", dest="margins",
                    help="ppipe-trt deadline margin as a fraction of the SLO (repeatable: one "
                         "ppipe row pair per value; default: the runtime's default, 0.1)")
    ap.add_argument("--_rayserve", nargs=6, help=argparse.SUPPRESS)
    ap.add_argument("--_ppipe", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._ppipe:
        cluster, port, model, engines, slo, margin = args._ppipe
        ppipe_main(cluster, int(port), model, engines, float(slo), float(margin))
        return 0
    if args._rayserve:
        port, onnx, name, shape, mb, wait = args._rayserve
        rayserve_main(int(port), onnx, name, [int(d) for d in shape.split(",")], int(mb),
                      float(wait))
        return 0

    from ppipe_trt.engines import build_model_engines

    engines = args.engines or Path(tempfile.mkdtemp(prefix="bench-engines-"))
    built = build_model_engines(args.model, "cpu", store_root=engines, progress=False)
    spec = built.inputs[0]
    shape = [int(d) for d in spec.shape[1:]]
    x = np.random.default_rng(0).standard_normal([1] + shape).astype(np.float32)
    ppipe_req = kserve_binary_request(args.model, spec.name, x)
    raw_req = HttpRequest("/", x.tobytes(), {"Content-Type": "application/octet-stream"})
    wait_ms = args.rs_wait_ms if args.rs_wait_ms is not None else 0.1 * args.slo_ms
    from ppipe_trt.serving.assembly import RuntimeOptions

    margins = args.margins or [RuntimeOptions().deadline_margin_fraction]
    systems: dict[str, tuple] = {}
    port = 18400
    for kind, label in (("local", "ppipe-trt local"), ("ray", "ppipe-trt on Ray")):
        for m in margins:
            port += 1
            name = label + (f", margin {m:.0%}" if len(margins) > 1 else "")
            systems[f"{kind}@{m}"] = (name, [sys.executable, __file__, "--_ppipe", kind,
                                             str(port), args.model, str(engines),
                                             str(args.slo_ms), str(m)],
                                      f"http://127.0.0.1:{port}", ppipe_req)
    systems["rayserve"] = ("Ray Serve (@serve.batch)",
                           [sys.executable, __file__, "--_rayserve", "18499",
                            str(built.full_onnx), spec.name, ",".join(map(str, shape)),
                            str(args.rs_batch), str(wait_ms / 1000.0)],
                           "http://127.0.0.1:18499", raw_req)
    chosen = [k for k in systems if not args.only or k.split("@")[0] in args.only]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results = {}
    for key in chosen:
        name, cmd, url, req = systems[key]
        log(f"{name}: starting")
        with Server(name, cmd, url, req) as srv:
            run_open_loop(url, poisson_arrivals(20.0, 2.0, 99), lambda i: req)  # warm-up
            idle, nproc = srv.idle_cpu_fraction()
            best = max_rate(srv, req, args, log)
        results[key] = (name, best, idle, nproc)

    lines = [f"# ppipe-trt vs Ray Serve ({args.model}, CPU, SLO {args.slo_ms:.0f} ms)", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()}"
             " CPU cores, one run; open-loop Poisson load over HTTP from one generator process "
             f"({args.duration:.0f} s measured + {args.warmup:.0f} s warm-up per rate). Goodput "
             "= requests answered 200 within the SLO per second, at the highest offered rate "
             "with >= 99 % attainment. Ray Serve: one replica of the unsplit model, "
             f"`@serve.batch(max_batch_size={args.rs_batch}, batch_wait_timeout_s="
             f"{wait_ms / 1000.0:.4f})`, `max_ongoing_requests={4 * args.rs_batch}`. "
             "ppipe-trt: the server of `ppipe serve --model M --slo-ms S [--cluster ray]` "
             "(planner: 1 CPU worker slot), deadline margin 1 ms + the stated fraction of the "
             "SLO. "
             "Idle CPU: the server's whole process tree left idle for 4 s (in cores).", "",
             "| system | max rate @99% (req/s) | goodput (req/s) | p50 ms | p90 ms | p99 ms | "
             "goodput vs Ray Serve | idle CPU (cores) | processes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = results.get("rayserve")
    base_good = base[1][1].goodput_rps if base and base[1] else None
    for key in chosen:
        name, best, idle, nproc = results[key]
        if best is None:
            lines.append(f"| {name} | < {args.start_rps:.0f} | - | - | - | - | - | {idle:.2f} | "
                         f"{nproc} |")
            continue
        rate, s = best
        ratio = f"{s.goodput_rps / base_good:.2f}x" if base_good else "-"
        lines.append(f"| {name} | {rate:.0f} | {s.goodput_rps:.1f} | {s.p50_ms:.1f} | "
                     f"{s.p90_ms:.1f} | {s.p99_ms:.1f} | {ratio} | {idle:.2f} | {nproc} |")
    lines.append("")
    for m in margins:
        loc, ray_ = results.get(f"local@{m}"), results.get(f"ray@{m}")
        tag = f" (margin {m:.0%})" if len(margins) > 1 else ""
        if loc and ray_ and loc[1] and ray_[1]:
            lines.append(f"- ppipe-trt on Ray / local goodput{tag}: "
                         f"{ray_[1][1].goodput_rps / loc[1][1].goodput_rps:.2f} (goal >= 0.80)")
        if loc and loc[1] and base_good:
            lines.append(f"- ppipe-trt local / Ray Serve goodput{tag}: "
                         f"{loc[1][1].goodput_rps / base_good:.2f} (goal >= 2.0)")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
