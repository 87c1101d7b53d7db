#!/usr/bin/env python
"""CPU the live data plane spends per request, against the floor of the protocol library.

Plans a paper configuration (``ppipe plan --paper-group G --paper-cluster C``; default group 5
on L4-P4: 25 L4 + 75 P4 = 100 GPUs, 2,611 req/s planned), serves it with ``ppipe serve --plan
P --profiles DIR --emulate`` (timing-only emulated workers: every figure is EMULATED) and, for
each protocol (HTTP, gRPC) and load factor, drives every model at once with one Triton
``perf_analyzer`` per model (``--request-distribution poisson --request-rate-range R``, binary
tensors, one FP32 element per sample).  Over a fixed window after a warm-up it measures:

* offered, arrived and answered req/s, and attainment: results by the deadline (the runtime's
  latency, as ``scripts/bench_serve.py`` counts it) / offered, from the server's ``/metrics``
  before and after the window;
* server CPU us per request = (utime + stime of the server's process tree, from /proc, over
  the window) / requests answered in the window; the load generator's CPU the same way;
* p50/p99 round trip as perf_analyzer saw it (requests sent in the window);

and the same for the **floor** of each protocol, at the same offered rates: a bare
``grpc.aio`` servicer on tritonclient's ``service_pb2_grpc`` and a raw ASGI app under ``ppipe
serve``'s uvicorn settings, both echoing a 4-byte output (``--echo-server grpc|http``, started
as subprocesses of this script).  Then the largest load factor with >= 99 % attainment live,
next to the simulator's on the same plan (``ppipe simulate PLAN --search``).

With ``--repeats N`` every point is measured N times, live and floor interleaved (live, floor,
live, floor, ...; each a fresh window, each pair back to back): the CPU of this shared machine
moves +-10-15 % from one window to the next.  Rows then give the median over the repeats of
every figure, ratio = the median of the N per-pair ratios live / floor, and the samples.

perf_analyzer gives up at its first failed request, and the live server drops (503 /
UNAVAILABLE) requests whose deadline it cannot meet: each model's perf_analyzer is restarted
until the window ends, the restarts are counted, and offered counts only the time one ran.

    .venv/bin/python scripts/bench_dataplane.py                    # defaults, ~9 min
    .venv/bin/python scripts/bench_dataplane.py --load-factors 0.3 --window-s 5 \\
        --protocols http --out /tmp/dp.md --json /tmp/dp.json      # a quick check
    .venv/bin/python scripts/bench_dataplane.py --server-commit HEAD  # without work in progress
    .venv/bin/python scripts/bench_dataplane.py --repeats 5        # medians of 5 interleaved pairs

The server, the load generator and anything else running share the machine's cores: the load
generator's CPU share is reported beside every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_GROUP, DEFAULT_CLUSTER = 5, "L4-P4"
DEFAULT_PERF_ANALYZER = ROOT / ".tools" / "perf_analyzer" / "perf_analyzer"
CLK_TCK = os.sysconf("SC_CLK_TCK")
TARGET_ATTAINMENT = 0.99
NOTES_MARKER = "<!-- notes -->"


# ---- processes ---------------------------------------------------------------------------------

class Children:
    """Every subprocess this script starts, each in its own process group; ``stop_all`` ends
    the groups (SIGTERM, then SIGKILL) and is called on every exit path."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()

    def start(self, cmd: list[str], log_path: Path, cwd: Path = ROOT,
              env: dict | None = None) -> subprocess.Popen:
        log = open(log_path, "wb")
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                    start_new_session=True)
        finally:
            log.close()
        with self._lock:
            self._procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
        if proc.returncode is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue
            except ChildProcessError:  # reaped by a load driver (os.wait4)
                return

    def stop_all(self) -> None:
        with self._lock:
            procs, self._procs = self._procs, []
        for proc in reversed(procs):
            self.stop(proc, grace_s=5.0)


CHILDREN = Children()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as fh:
        text = fh.read()
    return text[text.rindex(")") + 2:].split()  # fields from 3 (state) on; comm may hold spaces


def process_cpu_s(pid: int, with_reaped_children: bool = True) -> float:
    """utime + stime of ``pid`` (all its threads), plus its reaped children's; seconds."""
    f = _stat_fields(pid)
    ticks = int(f[11]) + int(f[12]) + ((int(f[13]) + int(f[14])) if with_reaped_children else 0)
    return ticks / CLK_TCK


def descendants(root: int) -> list[int]:
    """``root`` and every live descendant (front-end processes, workers), root first."""
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                parent[int(name)] = int(_stat_fields(int(name))[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, frontier = [root], [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in tree]
        tree.extend(kids)
        frontier.extend(kids)
    return tree


def tree_cpu_s(root: int) -> float:
    """CPU seconds of ``root`` and every live descendant (with their reaped children)."""
    total = 0.0
    for pid in descendants(root):
        try:
            total += process_cpu_s(pid)
        except (OSError, ValueError):
            if pid == root:
                raise
    return total


# ---- echo servers: the floor of each protocol ------------------------------------------------

def _echo_metadata(model: str) -> dict:
    return {"name": model, "versions": ["1"], "platform": "echo",
            "inputs": [{"name": "INPUT__0", "datatype": "FP32", "shape": [-1, 1]}],
            "outputs": [{"name": "OUTPUT__0", "datatype": "FP32", "shape": [-1, 1]}]}


def _echo_statistics(model: str, count: int) -> dict:
    zero = {"count": 0, "ns": 0}
    done = {"count": count, "ns": 0}
    return {"name": model, "version": "1", "last_inference": 0, "inference_count": count,
            "execution_count": count,
            "inference_stats": {"success": done, "fail": zero, "queue": done,
                                "compute_input": done, "compute_infer": done,
                                "compute_output": done, "cache_hit": zero, "cache_miss": zero},
            "batch_stats": []}


def echo_asgi_app(models: list[str]):
    """A raw ASGI app answering what perf_analyzer asks over HTTP: metadata, config, stats,
    readiness, and binary-tensor infer requests (the JSON header is parsed; the first 4 bytes
    of the binary input are echoed as ``OUTPUT__0``)."""
    counts = dict.fromkeys(models, 0)
    metadata = {m: json.dumps(_echo_metadata(m)).encode() for m in models}
    config = {m: json.dumps({"name": m, "platform": "echo", "backend": "echo",
                             "max_batch_size": 1,
                             "input": [{"name": "INPUT__0", "data_type": "TYPE_FP32",
                                        "format": "FORMAT_NONE", "dims": [1]}],
                             "output": [{"name": "OUTPUT__0", "data_type": "TYPE_FP32",
                                         "dims": [1]}]}).encode() for m in models}
    outputs = [{"name": "OUTPUT__0", "datatype": "FP32", "shape": [1, 1],
                "parameters": {"binary_data_size": 4}}]
    json_type = (b"content-type", b"application/json")

    async def reply(send, status: int, body: bytes, headers=(json_type,)) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        parts = scope["path"].strip("/").split("/")
        if len(parts) >= 5 and parts[3] == "versions":
            del parts[3:5]
        if parts[:2] == ["v2", "health"] or parts == ["v2"]:
            return await reply(send, 200, b'{"ready": true}')
        if parts == ["v2", "models", "stats"]:
            return await reply(send, 200, json.dumps(
                {"model_stats": [_echo_statistics(m, n) for m, n in counts.items()]}).encode())
        if len(parts) < 3 or parts[1] != "models" or parts[2] not in counts:
            return await reply(send, 404, b'{"error": "unknown model"}')
        model, action = parts[2], (parts[3] if len(parts) > 3 else "")
        if action == "infer":
            headers = dict(scope["headers"])
            n = int(headers.get(b"inference-header-content-length", len(body)))
            request = json.loads(body[:n])
            answer = {"model_name": model, "model_version": "1", "outputs": outputs}
            if "id" in request:  # perf_analyzer matches answers to requests by id
                answer["id"] = request["id"]
            header = json.dumps(answer).encode()
            counts[model] += 1
            return await reply(send, 200, header + body[n:n + 4].ljust(4, b"\0"), (
                (b"content-type", b"application/octet-stream"),
                (b"inference-header-content-length", str(len(header)).encode())))
        if action == "":
            return await reply(send, 200, metadata[model])
        if action == "config":
            return await reply(send, 200, config[model])
        if action == "ready":
            return await reply(send, 200, b'{"ready": true}')
        if action == "stats":
            return await reply(send, 200, json.dumps(
                {"model_stats": [_echo_statistics(model, counts[model])]}).encode())
        return await reply(send, 404, b'{"error": "not found"}')

    return app


def serve_echo_http(port: int, models: list[str]) -> None:
    import uvicorn

    sys.setswitchinterval(0.0005)  # as ppipe serve
    uvicorn.run(echo_asgi_app(models), host="127.0.0.1", port=port, log_level="warning")


def serve_echo_grpc(port: int, models: list[str]) -> None:
    import grpc
    from tritonclient.grpc import model_config_pb2 as mc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    counts = dict.fromkeys(models, 0)

    class EchoServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
        """ModelInfer echoing 4 bytes, and the metadata calls perf_analyzer makes."""

        async def ServerLive(self, request, context):
            return pb.ServerLiveResponse(live=True)

        async def ServerReady(self, request, context):
            return pb.ServerReadyResponse(ready=True)

        async def ModelReady(self, request, context):
            return pb.ModelReadyResponse(ready=request.name in counts)

        async def ServerMetadata(self, request, context):
            return pb.ServerMetadataResponse(name="echo", version="1")

        async def ModelMetadata(self, request, context):
            if request.name not in counts:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.name!r}")
            t = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=request.name, versions=["1"], platform="echo",
                inputs=[t(name="INPUT__0", datatype="FP32", shape=[-1, 1])],
                outputs=[t(name="OUTPUT__0", datatype="FP32", shape=[-1, 1])])

        async def ModelConfig(self, request, context):
            if request.name not in counts:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.name!r}")
            return pb.ModelConfigResponse(config=mc.ModelConfig(
                name=request.name, platform="echo", backend="echo", max_batch_size=1,
                input=[mc.ModelInput(name="INPUT__0", data_type=mc.TYPE_FP32,
                                     format=mc.ModelInput.FORMAT_NONE, dims=[1])],
                output=[mc.ModelOutput(name="OUTPUT__0", data_type=mc.TYPE_FP32, dims=[1])]))

        async def ModelStatistics(self, request, context):
            from google.protobuf import json_format

            names = [request.name] if request.name else list(counts)
            return pb.ModelStatisticsResponse(model_stats=[
                json_format.ParseDict(_echo_statistics(n, counts.get(n, 0)),
                                      pb.ModelStatistics()) for n in names])

        async def ModelInfer(self, request, context):
            counts[request.model_name] += 1
            raw = request.raw_input_contents[0][:4] if request.raw_input_contents else b""
            return pb.ModelInferResponse(
                model_name=request.model_name, model_version="1", id=request.id,
                outputs=[pb.ModelInferResponse.InferOutputTensor(
                    name="OUTPUT__0", datatype="FP32", shape=[1, 1])],
                raw_output_contents=[raw.ljust(4, b"\0")])

    async def main() -> None:
        # the options api/grpc_server.py gives the live gRPC front end
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 32 << 20),
                                          ("grpc.max_send_message_length", -1),
                                          ("grpc.so_reuseport", 0)])
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(EchoServicer(), server)
        if not server.add_insecure_port(f"127.0.0.1:{port}"):
            raise SystemExit(f"echo gRPC: cannot listen on 127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    sys.setswitchinterval(0.0005)  # as ppipe serve
    try:  # ppipe serve runs its gRPC server on uvicorn's loop, uvloop where installed
        import uvloop
        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


# ---- talking to the servers --------------------------------------------------------------------

def http_get(url: str, timeout_s: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return r.read()


def wait_ready(proc: subprocess.Popen, check, what: str, log_path: Path,
               timeout_s: float) -> None:
    """Poll ``check()`` until it returns true; fail naming the log when the process exits or
    the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with code {proc.returncode} before it was ready; "
                             f"see {log_path}:\n{tail(log_path)}")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.25)
    raise SystemExit(f"{what} was not ready within {timeout_s:.0f} s; see {log_path}")


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def grpc_ready(port: int) -> bool:
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        return stub.ServerReady(pb.ServerReadyRequest(), timeout=2.0).ready


_METRIC = re.compile(r'^(\w+)\{([^}]*)\}\s+(\S+)$')
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass(slots=True)
class Counters:
    """Per model: requests that arrived, answers with a result, results by the deadline,
    dropped + failed (answered with an error), and the runtime-latency histogram
    (cumulative counts by upper bound in seconds)."""

    arrived: dict[str, float] = field(default_factory=dict)
    completed: dict[str, float] = field(default_factory=dict)
    within_deadline: dict[str, float] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    latency_buckets: dict[str, dict[float, float]] = field(default_factory=dict)


def live_counters(http_port: int) -> Counters:
    c = Counters()
    # under overload the scrape queues behind the backlog of requests: wait for it
    text = http_get(f"http://127.0.0.1:{http_port}/metrics", timeout_s=60.0).decode()
    for line in text.splitlines():
        m = _METRIC.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), dict(_LABEL.findall(m.group(2))), float(m.group(3))
        model = labels.get("model")
        if model is None:
            continue
        target = {"ppipe_requests_total": c.arrived, "ppipe_completions_total": c.completed,
                  "ppipe_completions_within_deadline_total": c.within_deadline}.get(name)
        if target is not None:
            target[model] = target.get(model, 0.0) + value
        elif name in ("ppipe_drops_total", "ppipe_failures_total"):
            c.errors[model] = c.errors.get(model, 0.0) + value
        elif name == "ppipe_request_latency_seconds_bucket":
            le = float("inf") if labels["le"] == "+Inf" else float(labels["le"])
            b = c.latency_buckets.setdefault(model, {})
            b[le] = b.get(le, 0.0) + value
    if not c.arrived or not c.within_deadline:
        raise SystemExit("the server's /metrics has no ppipe_requests_total or "
                         "ppipe_completions_within_deadline_total per model; this benchmark "
                         "reads attainment from them")
    return c


def echo_counters(protocol: str, port: int, models: list[str]) -> Counters:
    """The echo servers' answer counts, from the statistics call of their own protocol."""
    if protocol == "http":
        doc = json.loads(http_get(f"http://127.0.0.1:{port}/v2/models/stats"))
        counts = {s["name"]: float(s["inference_count"]) for s in doc["model_stats"]}
    else:
        import grpc
        from tritonclient.grpc import service_pb2 as pb
        from tritonclient.grpc import service_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
                pb.ModelStatisticsRequest(), timeout=5.0)
        counts = {s.name: float(s.inference_count) for s in reply.model_stats}
    counts = {m: counts.get(m, 0.0) for m in models}
    return Counters(arrived=dict(counts), completed=dict(counts), within_deadline={},
                    errors=dict.fromkeys(models, 0.0))


def histogram_quantile(buckets: dict[float, float], q: float) -> float | None:
    """Quantile ``q`` (0..1) of a cumulative histogram, interpolated within its bucket."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for b in bounds:
        if buckets[b] >= rank:
            if math.isinf(b):
                return lower
            inside = buckets[b] - below
            return lower + (b - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = b, buckets[b]
    return lower


# ---- the load generator ---------------------------------------------------------------------

@dataclass(slots=True)
class LoadRun:
    """One perf_analyzer process.  ``cpu_end_s``: its CPU seconds when it was reaped."""

    proc: subprocess.Popen
    started: float                       # monotonic
    started_wall_ns: int                 # the clock of perf_analyzer's export timestamps
    log_path: Path
    export_path: Path
    cpu_end_s: float | None = None
    returncode: int | None = None
    ended: float | None = None           # monotonic, when it was reaped
    gave_up: float | None = None         # monotonic, when it said a request failed
    lock: threading.Lock = field(default_factory=threading.Lock)

    def cpu_s(self) -> float:
        """CPU seconds so far (final once reaped)."""
        for _ in range(200):
            with self.lock:
                if self.cpu_end_s is not None:
                    return self.cpu_end_s
                try:
                    return process_cpu_s(self.proc.pid, with_reaped_children=False)
                except (OSError, ValueError):
                    pass  # just reaped: the driver is about to record its final figure
            time.sleep(0.001)
        return 0.0


class ModelLoad(threading.Thread):
    """Keeps one perf_analyzer driving ``model`` at ``rate_rps`` until ``stop_at``
    (monotonic): each run is asked for the requests that fill the time left, and a run that
    stops early (perf_analyzer gives up at the first dropped request) is replaced until
    ``window_end``."""

    def __init__(self, args, model: str, port: int, protocol: str, rate_rps: float,
                 window_end: float, stop_at: float, workdir: Path, tag: str):
        super().__init__(daemon=True, name=f"load-{model}")
        self.args, self.model, self.port, self.protocol = args, model, port, protocol
        self.rate_rps, self.window_end, self.stop_at = rate_rps, window_end, stop_at
        self.workdir, self.tag = workdir, tag
        self.runs: list[LoadRun] = []
        self.runs_lock = threading.Lock()
        self.closed = threading.Event()
        self.error: str | None = None

    def command(self, count: int, span_s: float, export: Path) -> list[str]:
        cmd = [str(self.args.perf_analyzer), "-m", self.model, "-u", f"127.0.0.1:{self.port}",
               "-i", self.protocol, "--async", "--request-distribution", "poisson",
               "--request-rate-range", f"{self.rate_rps:.3f}", "--request-count", str(count),
               # the Poisson schedule covers measurement-interval x max-trials, then repeats
               "--measurement-interval", "1000", "--max-trials", str(int(span_s) + 5),
               "--max-threads", str(self.args.max_threads), "--input-data", "zero",
               "--profile-export-file", str(export)]
        if self.protocol == "http":
            cmd += ["--input-tensor-format", "binary", "--output-tensor-format", "binary"]
        return cmd

    def run(self) -> None:
        failures = 0
        current: LoadRun | None = None
        lingering: list[LoadRun] = []  # gave up; waiting for their requests in flight
        while True:
            for run in [*([current] if current else []), *lingering]:
                self.reap(run)
            lingering = [r for r in lingering if r.returncode is None]
            if current is not None and current.returncode is not None:
                if current.returncode != 0 and not self.closed.is_set() \
                        and "Failed to " not in tail(current.log_path, 40):
                    failures += 1  # not a failed request: a usage error, no server, ...
                    if failures >= 3:
                        self.error = (f"perf_analyzer for {self.model} failed 3 times (exit "
                                      f"{current.returncode}); see {current.log_path}:\n"
                                      f"{tail(current.log_path, 5)}")
                        return
                else:
                    failures = 0
                current = None
            elif current is not None and "Failed to " in tail(current.log_path, 5):
                # It gave up at a failed request and now waits for its requests in flight
                # (seconds, on a backlogged server), sending nothing: replace it now.
                current.gave_up = time.monotonic()
                lingering.append(current)
                current = None
            now = time.monotonic()
            if current is None and now < self.window_end and not self.closed.is_set():
                current = self.launch(now)
            if current is None and not lingering and (
                    now >= self.window_end or self.closed.is_set()):
                return
            time.sleep(0.1)

    def launch(self, now: float) -> LoadRun | None:
        """Start a run asked for the requests that fill the time left until ``stop_at``."""
        left_s = self.stop_at - now
        k = len(self.runs)
        export = self.workdir / f"{self.tag}-{self.model}-{k}.json"
        log_path = self.workdir / f"{self.tag}-{self.model}-{k}.log"
        export.unlink(missing_ok=True)  # perf_analyzer refuses to overwrite one
        # perf_analyzer wants at least one second's worth of requests
        count = math.ceil(self.rate_rps * max(1.0, left_s))
        with self.runs_lock:
            if self.closed.is_set():
                return None
            proc = CHILDREN.start(self.command(count, left_s, export), log_path)
            run = LoadRun(proc, time.monotonic(), time.time_ns(), log_path, export)
            self.runs.append(run)
        return run

    @staticmethod
    def reap(run: LoadRun) -> None:
        """Record ``run``'s exit status and CPU time if it has exited."""
        if run.returncode is not None:
            return
        pid, status, usage = os.wait4(run.proc.pid, os.WNOHANG)
        if pid:
            with run.lock:
                run.cpu_end_s = usage.ru_utime + usage.ru_stime
                run.returncode = run.proc.returncode = os.waitstatus_to_exitcode(status)
                run.ended = time.monotonic()

    def stop(self) -> None:
        """End the running perf_analyzer (after the window) and keep none from starting."""
        with self.runs_lock:
            self.closed.set()
            live = [r.proc for r in self.runs if r.returncode is None]
        for proc in live:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def cpu_s(self) -> dict[int, float]:
        with self.runs_lock:
            runs = list(self.runs)
        return {id(r): r.cpu_s() for r in runs}


def abort_reason(log_path: Path) -> str:
    """The first failed request's error as perf_analyzer printed it (a run ended before it
    printed one: its "Failed to ..." line)."""
    lines = tail(log_path, 40).splitlines()
    for line in lines:
        if "had error" in line:
            return line.split("had error:", 1)[1].strip().split(":")[0][:60]
    for line in lines:
        if line.startswith("Failed to "):
            return line.strip().rstrip(".")[:60]
    return "exit"


class OpenLoopLoad:
    """``scripts/loadgen.py`` driving every model at once (``--load-generator open-loop``):
    independent Poisson arrivals per model at a fixed rate for the whole point, kept through
    errors (perf_analyzer gives up at the first one), every answer logged with its status."""

    def __init__(self, args, port: int, protocol: str, rates: dict[str, float],
                 duration_s: float, workdir: Path, tag: str):
        self.out = workdir / f"{tag}-loadgen.json"
        self.log_path = workdir / f"{tag}-loadgen.log"
        self.out.unlink(missing_ok=True)
        self.cmd = [sys.executable, str(ROOT / "scripts" / "loadgen.py"), "--url",
                    f"127.0.0.1:{port}", "--protocol", protocol, "--duration-s",
                    f"{duration_s:.3f}", "--drain-s", f"{args.drain_s:g}", "--out", str(self.out),
                    *[a for m, r in rates.items() for a in ("--model", f"{m}={r:.3f}")]]
        self.proc: subprocess.Popen | None = None
        self.error: str | None = None  # it raises instead (finish)

    def start(self) -> None:
        self.proc = CHILDREN.start(self.cmd, self.log_path)

    def cpu_s(self) -> dict[int, float]:
        """CPU seconds so far (all its threads), keyed like ``ModelLoad.cpu_s``."""
        try:
            return {self.proc.pid: process_cpu_s(self.proc.pid, with_reaped_children=False)}
        except (OSError, ValueError):
            return {}

    def finish(self, timeout_s: float) -> dict:
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            Children.stop(self.proc)
            raise SystemExit(f"the load generator ran past its end by {timeout_s:.0f} s; see "
                             f"{self.log_path}:\n{tail(self.log_path, 5)}") from None
        if rc != 0 or not self.out.is_file():
            raise SystemExit(f"the load generator failed (exit {rc}); see {self.log_path}:\n"
                             f"{tail(self.log_path, 15)}")
        return json.loads(self.out.read_text())


def open_loop_stats(result: dict, t0_ns: int, t1_ns: int, slo_ms: dict[str, float]) -> dict:
    """From a load generator's log, the requests it sent in [t0, t1): per model how many
    (offered), their round trips (answers with a result), how many were answered with a
    result within the model's SLO, and the errors by status and first message."""
    sent, on_time, latencies, errors = {}, {}, [], {}
    for m, r in result["models"].items():
        n = ok = 0
        for ts, ms, status in zip(r["sent_ns"], r["latency_ms"], r["status"]):
            if not t0_ns <= ts < t1_ns:
                continue
            n += 1
            if status == 200:
                latencies.append(ms)
                ok += ms <= slo_ms[m]
            else:
                # status 0: the connection failed (its message says how); -1: no answer came
                key = ("no answer" if status == -1 else
                       f"{status} {_short_reason(r['errors'].get(str(status), ''))}".strip())
                errors[key] = errors.get(key, 0) + 1
        sent[m], on_time[m] = n, ok
    lag_p99 = max(r["send_lag_ms"]["p99"] for r in result["models"].values())
    return {"sent": sent, "on_time": on_time, "latencies": latencies, "errors": errors,
            "kept_rate": bool(result.get("kept_rate")), "lag_p99_ms": lag_p99}


def _short_reason(text: str) -> str:
    """'request dropped (deadline_unreachable)' out of an error body or gRPC details."""
    m = re.search(r"\(([a-z_]+)\)", text)
    return f"({m.group(1)})" if m else text[:40]


def read_export(path: Path, t0_ns: int, t1_ns: int) -> tuple[int | None, list[float]]:
    """From a finished perf_analyzer run's export: when it sent its first request (epoch
    ns), and the round trips (ms) of the requests it sent in [t0, t1)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, []
    first, out = None, []
    for exp in doc.get("experiments", []):
        for r in exp.get("requests", []):
            ts, answers = r.get("timestamp", 0), r.get("response_timestamps") or []
            first = ts if first is None else min(first, ts)
            if t0_ns <= ts < t1_ns and answers:
                out.append((answers[-1] - ts) / 1e6)
    return first, out


class StartupDelays:
    """How long perf_analyzer takes from its start to its first request, per protocol
    (seconds; from the exports of runs that finished): the part of a run's life in which it
    offers nothing.  Its metadata calls queue behind a backlogged server, so this varies."""

    def __init__(self) -> None:
        self.seen: dict[str, list[float]] = {}

    def add(self, protocol: str, delay_s: float) -> None:
        self.seen.setdefault(protocol, []).append(delay_s)

    def typical_s(self, protocol: str) -> float:
        seen = self.seen.get(protocol)
        return statistics.median(seen) if seen else 0.0

    def shortest_s(self, protocol: str) -> float:
        return min(self.seen.get(protocol, [0.0]))


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# ---- one measurement ---------------------------------------------------------------------------

@dataclass(slots=True)
class Measurement:
    """One server, one protocol, one load factor, over ``window_s``."""

    target: str                      # "live" or "floor"
    protocol: str
    load_factor: float
    window_s: float
    target_rps: float                # asked of the load generator
    offered_rps: float               # target x the fraction of the window it was running
    arrived_rps: float               # requests that reached the runtime (floor: the echo)
    answered_rps: float              # answers (results and errors)
    attainment: float | None         # results by the deadline / offered (live only)
    per_model_attainment: dict[str, float]
    runtime_attainment: float | None  # results by the deadline / arrived (bench_serve's)
    cpu_us_per_request: float
    server_cpu_share: float          # of all the machine's cores
    loadgen_cpu_share: float
    loadgen_cpu_us_per_request: float
    p50_ms: float | None             # perf_analyzer's, runs that finished
    p99_ms: float | None
    latency_samples: int
    client_on_time: float | None     # of those samples: client latency <= the model's SLO
    per_model_client_on_time: dict[str, float | None]
    runtime_p50_ms: float | None     # the live runtime's histogram (arrival to last stage)
    runtime_p99_ms: float | None
    loadgen_runs: int
    loadgen_aborts: dict[str, int]
    loadgen_startup_s: float         # typical start-to-first-request of perf_analyzer
    counters_wait_s: float           # how long the closing /metrics (or stats) call took
    loadgen: str = "perf_analyzer"   # or "open-loop" (scripts/loadgen.py)


def measure(args, target: str, protocol: str, load_factor: float, rates: dict[str, float],
            slo_ms: dict[str, float], server_pid: int, infer_port: int, counters,
            delays: StartupDelays, workdir: Path, repeat: int = 1) -> Measurement:
    """Drive every model at ``rates`` (req/s) for warm-up + window; sample CPU and counters
    at the window's edges.  ``repeat`` (1-based, of ``args.repeats``) names the logs."""
    tag = f"{target}-{protocol}-{load_factor:g}"
    if args.repeats > 1:
        tag += f"-r{repeat}"
    start = time.monotonic()
    window_end = start + args.warmup_s + args.window_s
    stop_at = window_end + 1.0  # the load goes on a little past the window's end
    if args.load_generator == "open-loop":
        loads = [OpenLoopLoad(args, infer_port, protocol, rates, stop_at - start, workdir,
                              tag)]
    else:
        loads = [ModelLoad(args, m, infer_port, protocol, r, window_end, stop_at, workdir, tag)
                 for m, r in rates.items()]
    open_loop: dict | None = None
    try:
        for load in loads:
            load.start()
        time.sleep(args.warmup_s)
        w0 = time.time_ns()  # the open-loop window: sends between the two counter scrapes
        c0 = counters()
        t0_ns, s0 = time.time_ns(), tree_cpu_s(server_pid)
        g0 = {k: v for load in loads for k, v in load.cpu_s().items()}
        t0 = time.monotonic()
        time.sleep(max(0.0, t0 + args.window_s - time.monotonic()))
        scrape_start, w1 = time.monotonic(), time.time_ns()
        c1 = counters()  # as at t0, each CPU sample follows its counter snapshot
        scrape_s = time.monotonic() - scrape_start
        g1 = {k: v for load in loads for k, v in load.cpu_s().items()}
        s1, t1_ns = tree_cpu_s(server_pid), time.time_ns()
        elapsed_s = time.monotonic() - t0
        if args.load_generator == "open-loop":
            open_loop = open_loop_stats(
                loads[0].finish(max(0.0, stop_at - time.monotonic()) + args.drain_s + 30.0),
                w0, w1, slo_ms)
        for load in loads:  # each run is asked for requests up to stop_at; then it drains
            if isinstance(load, ModelLoad):
                load.join(max(0.0, stop_at - time.monotonic()) + args.drain_s)
    finally:
        for load in loads:
            if isinstance(load, ModelLoad):
                load.stop()
        for load in loads:
            if isinstance(load, ModelLoad):
                load.join(15.0)
    errors = [load.error for load in loads if load.error]
    if errors:
        raise SystemExit("\n".join(errors))

    def delta(a: dict, b: dict) -> dict:
        return {m: b.get(m, 0.0) - a.get(m, 0.0) for m in rates}

    arrived, completed = delta(c0.arrived, c1.arrived), delta(c0.completed, c1.completed)
    errs = delta(c0.errors, c1.errors)
    answered = sum(completed.values()) + sum(errs.values())
    if open_loop is not None:  # one process, every request logged with its send time
        offered = {m: float(n) for m, n in open_loop["sent"].items()}
        latencies, aborts, runs = open_loop["latencies"], open_loop["errors"], 1
        on_time, timed = open_loop["on_time"], open_loop["sent"]
        if not open_loop["kept_rate"]:
            aborts[f"generator behind (send lag p99 {open_loop['lag_p99_ms']:.0f} ms)"] = 1
    else:
        latencies, aborts, runs = [], {}, 0
        timed, on_time = dict.fromkeys(rates, 0), dict.fromkeys(rates, 0)
        first_request: dict[int, float] = {}  # id(run) -> monotonic time of its first request
        for load in loads:
            for run in load.runs:
                runs += 1
                if run.returncode == 0:
                    first_ns, got = read_export(run.export_path, t0_ns, t1_ns)
                    if first_ns is not None:
                        delay_s = (first_ns - run.started_wall_ns) / 1e9
                        delays.add(protocol, delay_s)
                        first_request[id(run)] = run.started + delay_s
                    latencies += got
                    timed[load.model] += len(got)
                    on_time[load.model] += sum(1 for x in got if x <= slo_ms[load.model])
                elif run.gave_up or run.returncode not in (-9, None):  # -9 alone: by us
                    reason = abort_reason(run.log_path)
                    aborts[reason] = aborts.get(reason, 0) + 1
        # Offered: what each model's load generator was asked for while one of its
        # perf_analyzer processes was sending (restarts after an abort leave gaps that are
        # not the server's).  A run without an export (aborted) is taken to start as fast as
        # any did: an upper bound.
        t1, fastest_s = t0 + elapsed_s, delays.shortest_s(protocol)
        offered = {load.model: load.rate_rps * sum(
            max(0.0, min(t1, r.gave_up or r.ended or t1)
                - max(t0, first_request.get(id(r), r.started + fastest_s)))
            for r in load.runs)
            for load in loads}
    attainment = runtime_attainment = None
    per_model = {}
    if target == "live":
        within = delta(c0.within_deadline, c1.within_deadline)
        # Out of what?  Normally the requests that arrived (or the answers, when requests in
        # flight at the window's edges make them more).  But requests the front end has not
        # passed on yet never arrive: when arrivals fall short of the offered count by more
        # than Poisson noise (2 sigma), the noise-reduced offered count stands in.  The
        # open-loop generator logs every request it sent: its count is exact, no noise.
        noise = 0.0 if open_loop is not None else 2.0
        base = {m: max(1.0, arrived[m], completed[m] + errs[m],
                       offered[m] - noise * math.sqrt(offered[m])) for m in rates}
        per_model = {m: within[m] / base[m] for m in rates}
        attainment = sum(within.values()) / sum(base.values())
        runtime_attainment = sum(within.values()) / max(1.0, sum(arrived.values()), answered)
    server_cpu = s1 - s0
    loadgen_cpu = sum(g1.get(k, 0.0) - g0.get(k, 0.0) for k in g1)
    runtime_p50 = runtime_p99 = None
    if target == "live":
        hist: dict[float, float] = {}
        for m in rates:
            for le, n in c1.latency_buckets.get(m, {}).items():
                hist[le] = hist.get(le, 0.0) + n - c0.latency_buckets.get(m, {}).get(le, 0.0)
        p50, p99 = histogram_quantile(hist, 0.5), histogram_quantile(hist, 0.99)
        runtime_p50 = None if p50 is None else p50 * 1000
        runtime_p99 = None if p99 is None else p99 * 1000
    cores = os.cpu_count() or 1
    per_req = 1e6 / max(1.0, answered)
    return Measurement(
        target, protocol, load_factor, elapsed_s, sum(rates.values()),
        sum(offered.values()) / elapsed_s, sum(arrived.values()) / elapsed_s,
        answered / elapsed_s, attainment, per_model, runtime_attainment,
        server_cpu * per_req, server_cpu / (elapsed_s * cores), loadgen_cpu / (elapsed_s * cores),
        loadgen_cpu * per_req, quantile(latencies, 0.5), quantile(latencies, 0.99),
        len(latencies),
        sum(on_time.values()) / sum(timed.values()) if sum(timed.values()) else None,
        {m: on_time[m] / timed[m] if timed[m] else None for m in rates}, runtime_p50,
        runtime_p99, runs, aborts, delays.typical_s(protocol), scrape_s, args.load_generator)


# ---- plan, simulator, servers -------------------------------------------------------------------

def ppipe(*words: str) -> list[str]:
    """The ``ppipe`` command line run from ``--server-tree``."""
    return [sys.executable, "-m", "ppipe_trt.cli", *words]


def tree_env(args) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(args.server_tree), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_ppipe(args, *words: str, timeout_s: float = 600.0) -> str:
    cmd = ppipe(*words)
    try:
        proc = subprocess.run(cmd, cwd=args.server_tree, env=tree_env(args), capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"`{shlex.join(cmd)}` ran past {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        raise SystemExit(f"`{shlex.join(cmd)}` failed (exit {proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return proc.stdout


def export_commit(rev: str, workdir: Path, option: str = "--server-commit") -> Path:
    """A read-only copy (``git archive``) of this repository at ``rev``, under ``workdir``
    (``tree-<short hash>``); errors name ``option``, the command-line option that gave it."""
    got = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--short=12",
                          f"{rev}^{{commit}}"], capture_output=True, text=True, timeout=30)
    if got.returncode != 0:
        raise SystemExit(f"{option} {rev!r}: not a commit of {ROOT} "
                         f"({got.stderr.strip()})")
    dest = workdir / f"tree-{got.stdout.strip()}"
    if not (dest / "ppipe_trt" / "cli.py").is_file():
        partial = workdir / f"{dest.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", got.stdout.strip()],
                                   stdout=subprocess.PIPE)
        untar = subprocess.run(["tar", "-x", "-C", str(partial)], stdin=archive.stdout,
                               timeout=120)
        archive.stdout.close()
        if archive.wait(60) != 0 or untar.returncode != 0:
            raise SystemExit(f"{option} {rev!r}: git archive | tar failed")
        build_native(partial)
        partial.rename(dest)
    return dest


def build_native(tree: Path) -> None:
    """Compile the copy's scheduler in place (``setup.py build_ext --inplace``), as the
    install does for a checkout; where that fails the copy serves on the Python reference
    and the report says so (``/v2/status``'s ``scheduler``)."""
    if not (tree / "setup.py").is_file():
        return   # a commit from before the compiled scheduler
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                          cwd=tree, capture_output=True, text=True, timeout=600)
    built = list((tree / "ppipe_trt" / "_native").glob("*.so"))
    if proc.returncode != 0 or not built:
        print(f"warning: could not compile the hot path of {tree.name} (Cython and a C "
              f"compiler are needed); it serves on the Python references:\n"
              f"{(proc.stdout + proc.stderr)[-1500:]}", file=sys.stderr)


def describe_tree(tree: Path) -> str:
    """Which code served: the tree, and its commit when it is a git checkout."""
    try:
        head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--",
                                "api", "ppipe_trt"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return f"`{tree}`"
    if head.returncode != 0:
        if tree.name.startswith("tree-"):
            return f"commit {tree.name[5:]} of this repository (`git archive` copy in `{tree}`)"
        return f"`{tree}` (not a git checkout)"
    return (f"`{tree}` at commit {head.stdout.strip()}"
            + (" with uncommitted changes in api/ or ppipe_trt/" if dirty.stdout.strip() else ""))


def scheduler_line(status: dict) -> str:
    """Which scheduler served (``/v2/status``; older servers do not say)."""
    sched = status.get("scheduler")
    if not isinstance(sched, dict):
        return "not reported (a server from before the compiled scheduler: Python)"
    impl = sched.get("implementation", "?")
    detail = sched.get("detail", "")
    line = f"{sched.get('policy', '?')}, **{impl}**" + (
        f" ({detail})" if impl != "compiled" and detail else "")
    timed = sched.get("timing_only_workers")
    if timed:
        line += f"; timing-only workers **{timed}**"
    return line


def make_plan(args, workdir: Path) -> Path:
    if args.plan:
        return args.plan.resolve()
    path = (workdir / f"plan-g{args.group}-{args.cluster}.json").resolve()
    run_ppipe(args, "plan", "--paper-group", str(args.group), "--paper-cluster", args.cluster,
              "--profiles", str(args.profiles), "-o", str(path))
    return path


def simulator_figures(args, plan_path: Path, hop_us: float, workdir: Path) -> dict:
    """The simulator on the same plan: ``ppipe simulate PLAN --search`` (from 1.0 down by
    0.05) and ``ppipe simulate PLAN --load F`` at each measured load factor."""
    common = ["--profiles", str(args.profiles), "--duration", f"{args.sim_duration_s:g}s",
              "--warmup", "2s", "--hop-overhead-us", f"{hop_us:.1f}"]
    out = workdir / "sim-search.json"
    run_ppipe(args, "simulate", str(plan_path), "--search", "--target", str(TARGET_ATTAINMENT),
              "--json", str(out), *common)
    search = json.loads(out.read_text())
    at = {}
    for lf in args.load_factors:
        out = workdir / f"sim-{lf:g}.json"
        run_ppipe(args, "simulate", str(plan_path), "--load", f"{lf:g}", "--json", str(out),
                  *common)
        res = json.loads(out.read_text())
        at[lf] = {"per_model": {m["model"]: m["attainment"] for m in res["models"]},
                  "overall": sum(m["completed"] for m in res["models"])
                  / max(1, sum(m["requests"] for m in res["models"]))}
    return {"per_model_load_factor": search["per_model_load_factor"],
            "load_factor": search["load_factor"], "attainment_at": at}


def start_live(args, plan_path: Path, workdir: Path) -> tuple[subprocess.Popen, int, int, dict]:
    http_port, grpc_port = free_port(), free_port()
    log_path = workdir / "ppipe-serve.log"
    cmd = ppipe("serve", "--plan", str(plan_path), "--profiles", str(args.profiles),
                "--emulate", "--host", "127.0.0.1", "--port", str(http_port),
                "--grpc-port", str(grpc_port),
                *(("--frontends", str(args.frontends)) if args.frontends > 1 else ()))
    proc = CHILDREN.start(cmd, log_path, cwd=args.server_tree, env=tree_env(args))
    wait_ready(proc, lambda: json.loads(http_get(
        f"http://127.0.0.1:{http_port}/v2/health/ready"))["ready"], "ppipe serve", log_path,
        args.start_timeout_s)
    wait_ready(proc, lambda: grpc_ready(grpc_port), "ppipe serve (gRPC)", log_path,
               args.start_timeout_s)
    status = json.loads(http_get(f"http://127.0.0.1:{http_port}/v2/status"))
    return proc, http_port, grpc_port, status


def check_models(http_port: int, models: list[str]) -> None:
    """The echo floors answer what the timing-only models take: one FP32 element a sample."""
    for m in models:
        md = json.loads(http_get(f"http://127.0.0.1:{http_port}/v2/models/{m}"))
        ins = [(i["name"], i["datatype"], i["shape"]) for i in md["inputs"]]
        outs = [(o["name"], o["datatype"], o["shape"]) for o in md["outputs"]]
        if ins != [("INPUT__0", "FP32", [-1, 1])] or outs != [("OUTPUT__0", "FP32", [-1, 1])]:
            raise SystemExit(f"model {m}: inputs {ins}, outputs {outs}; this benchmark expects "
                             "timing-only models (INPUT__0/OUTPUT__0, FP32, shape [-1, 1])")


def start_echo(args, protocol: str, models: list[str], workdir: Path
               ) -> tuple[subprocess.Popen, int]:
    port = free_port()
    log_path = workdir / f"echo-{protocol}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--echo-server", protocol,
           "--port", str(port), "--models", ",".join(models)]
    proc = CHILDREN.start(cmd, log_path)
    check = (lambda: grpc_ready(port)) if protocol == "grpc" else \
        (lambda: json.loads(http_get(f"http://127.0.0.1:{port}/v2/health/ready"))["ready"])
    wait_ready(proc, check, f"echo {protocol} server", log_path, args.start_timeout_s)
    return proc, port


# ---- report ----------------------------------------------------------------------------------

def fmt(v, spec: str = ".1f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def live_factor(per_lf: dict[float, dict[str, float]], models: list[str]) -> dict[str, float]:
    """Per model: the largest load factor whose attainment is >= 99 % (0 if none)."""
    return {m: max([lf for lf, att in per_lf.items() if att.get(m, 0.0) >= TARGET_ATTAINMENT],
                   default=0.0) for m in models}


def median_or_none(values) -> float | None:
    """The median of the values that are not None; None when none is."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


# Measurement fields that name the point rather than measure it; counts (load generator runs
# and aborts, requests timed) add up over the repeats; every other field is a median.
_SAME_OVER_REPEATS = ("target", "protocol", "load_factor", "loadgen")


def median_measurement(repeats: list[Measurement]) -> Measurement:
    """One measurement standing for ``repeats`` of the same target, protocol and load factor:
    each figure is the median over the repeats (per model for the per-model dicts; a figure
    missing (None) in a repeat is left out), and ``latency_samples`` (the requests timed),
    ``loadgen_runs`` / ``loadgen_aborts`` are totals.  One repeat comes back unchanged."""
    if not repeats:
        raise ValueError("median_measurement: no measurement given")
    values: dict[str, object] = {}
    for f in fields(Measurement):
        got = [getattr(m, f.name) for m in repeats]
        if f.name in _SAME_OVER_REPEATS:
            if any(g != got[0] for g in got):
                raise ValueError(f"median_measurement: {f.name} differs between the repeats "
                                 f"({got}); expected the repeats of one point")
            values[f.name] = got[0]
        elif f.name in ("loadgen_runs", "latency_samples"):
            values[f.name] = sum(got)
        elif f.name == "loadgen_aborts":
            totals: dict[str, int] = {}
            for aborts in got:
                for reason, n in aborts.items():
                    totals[reason] = totals.get(reason, 0) + n
            values[f.name] = totals
        elif isinstance(got[0], dict):
            keys = dict.fromkeys(k for g in got for k in g)
            values[f.name] = {k: median_or_none(g.get(k) for g in got) for k in keys}
        else:
            values[f.name] = median_or_none(got)
    return Measurement(**values)


def _rounded(values, digits: int) -> list:
    return [None if v is None else round(v, digits) for v in values]


def build_rows(measured: list[Measurement], sim: dict | None, models: list[str]
               ) -> tuple[list[dict], dict]:
    """One row per protocol and load factor, and a summary per protocol.  ``measured`` may
    hold several repeats of a point: its i-th live and i-th floor measurement (in the order
    measured) are a pair.  A row's figures are the medians over the repeats
    (``median_measurement``); ``ratio`` is the median of the per-pair ratios live / floor,
    ``ratio_of_medians`` the median live over the median floor; the ``*_samples`` lists give
    each repeat's figure.  The largest load factor at >= 99 % attainment is taken on each
    model's median attainment."""
    rows, summary = [], {}
    protocols = list(dict.fromkeys(m.protocol for m in measured))
    for protocol in protocols:
        live_repeats: dict[float, list[Measurement]] = {}
        floor_repeats: dict[float, list[Measurement]] = {}
        for m in measured:
            if m.protocol == protocol:
                by_lf = live_repeats if m.target == "live" else floor_repeats
                by_lf.setdefault(m.load_factor, []).append(m)
        lives = {lf: median_measurement(ms) for lf, ms in live_repeats.items()}
        floors = {lf: median_measurement(ms) for lf, ms in floor_repeats.items()}
        per_model = live_factor({lf: m.per_model_attainment for lf, m in lives.items()}, models)
        live_lf = sum(per_model.values()) / len(per_model)
        by_client = live_factor({lf: {k: v for k, v in m.per_model_client_on_time.items()
                                      if v is not None} for lf, m in lives.items()}, models)
        s = {"live_per_model_load_factor": per_model, "live_load_factor": live_lf,
             "live_client_per_model_load_factor": by_client,
             "live_client_load_factor": sum(by_client.values()) / len(by_client)}
        if sim is not None:
            sim_grid = live_factor({lf: a["per_model"] for lf, a in sim["attainment_at"].items()
                                    if lf in lives}, models)
            sim_grid_lf = sum(sim_grid.values()) / len(sim_grid)
            s.update(sim_load_factor=sim["load_factor"], sim_grid_load_factor=sim_grid_lf,
                     live_over_sim=live_lf / sim["load_factor"] if sim["load_factor"] else None,
                     live_over_sim_grid=live_lf / sim_grid_lf if sim_grid_lf else None)
        summary[protocol] = s
        for lf in sorted(lives):
            live, floor = lives[lf], floors.get(lf)
            live_each, floor_each = live_repeats[lf], floor_repeats.get(lf, [])
            ratios = [lv.cpu_us_per_request / fl.cpu_us_per_request
                      for lv, fl in zip(live_each, floor_each) if fl.cpu_us_per_request]
            sim_att = None
            if sim is not None and lf in sim["attainment_at"]:
                sim_att = sim["attainment_at"][lf]["overall"]
            rows.append({
                "load_factor": lf, "protocol": protocol, "emulated": True,
                "target_rps": live.target_rps, "offered_rps": live.offered_rps,
                "arrived_rps": live.arrived_rps, "answered_rps": live.answered_rps,
                "attainment": live.attainment,
                "per_model_attainment": live.per_model_attainment,
                "runtime_attainment": live.runtime_attainment,
                "sim_attainment": sim_att,
                "cpu_us_per_request": live.cpu_us_per_request,
                "floor_cpu_us_per_request": floor.cpu_us_per_request if floor else None,
                "ratio": statistics.median(ratios) if ratios else None,
                "ratio_of_medians": (live.cpu_us_per_request / floor.cpu_us_per_request
                                     if floor and floor.cpu_us_per_request else None),
                "repeats": len(live_each),
                "cpu_us_samples": _rounded((m.cpu_us_per_request for m in live_each), 1),
                "floor_cpu_us_samples": _rounded((m.cpu_us_per_request for m in floor_each), 1),
                "ratio_samples": _rounded(ratios, 3),
                "attainment_samples": _rounded((m.attainment for m in live_each), 4),
                "p50_ms": live.p50_ms, "p99_ms": live.p99_ms,
                "latency_samples": live.latency_samples,
                "client_on_time": live.client_on_time,
                "per_model_client_on_time": live.per_model_client_on_time,
                "runtime_p50_ms": live.runtime_p50_ms, "runtime_p99_ms": live.runtime_p99_ms,
                "server_cpu_share": live.server_cpu_share,
                "loadgen_cpu_share": live.loadgen_cpu_share,
                "loadgen_cpu_us_per_request": live.loadgen_cpu_us_per_request,
                "loadgen": live.loadgen,
                "loadgen_runs": live.loadgen_runs, "loadgen_aborts": live.loadgen_aborts,
                "loadgen_startup_s": live.loadgen_startup_s,
                "counters_wait_s": live.counters_wait_s,
                "floor": asdict(floor) if floor else None,
                "live_over_sim": s.get("live_over_sim"),
                "live_load_factor": live_lf, "sim_load_factor": s.get("sim_load_factor"),
            })
    return rows, summary


def findings(rows: list[dict], planned_rps: float) -> list[str]:
    """One line per protocol, from the rows: CPU per request live and floor (medians over the
    load factors), what the plan's rate would cost in cores at that price, and up to which
    load the server took in the whole target load.  With repeats, each row's figure is
    already its point's median over them."""
    out = []
    for protocol in dict.fromkeys(r["protocol"] for r in rows):
        mine = [r for r in rows if r["protocol"] == protocol]
        live = statistics.median(r["cpu_us_per_request"] for r in mine)
        floors = [r["floor_cpu_us_per_request"] for r in mine if r["floor_cpu_us_per_request"]]
        kept_up = [r["load_factor"] for r in mine
                   if r["arrived_rps"] >= 0.95 * r["target_rps"] and not r["loadgen_aborts"]]
        repeats = max(r.get("repeats", 1) for r in mine)
        over = ("load factors" if repeats == 1 else
                f"load factors of each point's median over {repeats} repeats")
        line = (f"* **{protocol}**: the live server spends **{live:.0f} us** of CPU per request "
                f"(median over {over})")
        if floors:
            floor = statistics.median(floors)
            line += (f", {live / floor:.1f}x the floor's {floor:.0f} us; the plan's "
                     f"{planned_rps:.0f} req/s would take {planned_rps * live / 1e6:.1f} cores "
                     f"of this machine for the data plane alone (the floor: "
                     f"{planned_rps * floor / 1e6:.1f})")
        failed = "no request failed" + ("" if repeats == 1 else " in any repeat")
        line += (f".  It took in the whole target load (arrivals >= 95 % of target, {failed}) "
                 f"up to load factor {max(kept_up):g}" if kept_up else
                 ".  It did not take in the whole target load at any load factor")
        out.append(line + ".")
    return out


OPEN_LOOP_NOTES = {
    "offered": [
        "* offered = the requests the open-loop generator (`scripts/loadgen.py`) sent between "
        "the two counter scrapes: every send is logged, so it is exact (no bounds).  It never "
        "stops at an error: it offers what the simulator offers.  arrived = requests that "
        "reached the runtime (`ppipe_requests_total`); answered = results + drops + failures "
        "(`/metrics`, before and after the window)."],
    "p50": [
        "* p50 / p99: client round trip of the results, over the requests sent in the window.  "
        "client on time: of those requests, the fraction answered with a result within the "
        "model's SLO (errors and unanswered requests count as misses).  The last column of "
        "the details counts the answers by status and reason, and says when the generator "
        "itself fell behind its schedule (send lag p99 > 5 ms).  The runtime's histogram "
        "(arrival to last stage, interpolated in its buckets) is given for every live row."],
}


def markdown(argv: list[str], header: list[str], rows: list[dict], summary: dict,
             wall_s: float, planned_rps: float) -> str:
    repeats = max((r.get("repeats", 1) for r in rows), default=1)
    spread_head = "" if repeats == 1 else "| ratio min-max over repeats "
    lines = ["# Data-plane CPU per request (`scripts/bench_dataplane.py`)", "",
             f"Run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, command: "
             f"`.venv/bin/python scripts/bench_dataplane.py {shlex.join(argv)}` "
             f"(wall time {wall_s:.0f} s).", "", *header, "",
             "## CPU per request, live (EMULATED) vs the protocol's floor", "",
             "| protocol | load | offered req/s | arrived req/s | answered req/s | attainment "
             f"| server CPU us/req | floor CPU us/req | ratio {spread_head}| p50 / p99 ms "
             "| loadgen CPU share (live / floor) | server CPU share (live / floor) |",
             "|---" * (12 if repeats == 1 else 13) + "|"]
    for r in rows:
        spread = ""
        if repeats > 1:
            rs = r.get("ratio_samples") or []
            spread = f"{min(rs):.2f}-{max(rs):.2f} | " if rs else "- | "
        f = r["floor"] or {}
        share = (lambda v: "-" if v is None else f"{100 * v:.0f} %")
        # perf_analyzer's aborts leave gaps whose start is not known; the open-loop
        # generator logs every send, its errors are answers like any other
        bound = (("<= ", ">= ") if r["loadgen_aborts"] and r["loadgen"] == "perf_analyzer"
                 else ("", ""))
        lines.append(
            f"| {r['protocol']} | {r['load_factor']:g} | {bound[0]}{r['offered_rps']:.0f} | "
            f"{r['arrived_rps']:.0f} | {r['answered_rps']:.0f} | "
            f"{bound[1]}{fmt(r['attainment'], '.4f')} | "
            f"**{r['cpu_us_per_request']:.0f}** | {fmt(r['floor_cpu_us_per_request'], '.0f')} | "
            f"**{fmt(r['ratio'], '.2f')}** | {spread}{fmt(r['p50_ms'])} / {fmt(r['p99_ms'])} | "
            f"{share(r['loadgen_cpu_share'])} / {share(f.get('loadgen_cpu_share'))} | "
            f"{share(r['server_cpu_share'])} / {share(f.get('server_cpu_share'))} |")
    lines += ["", "## Details", "",
              "| protocol | load | target req/s | runtime attainment | sim attainment "
              "| client on time (samples) | runtime p50 / p99 ms | floor offered / answered req/s "
              "| floor p50 / p99 ms | loadgen CPU us/req (live / floor) "
              "| load generator runs (aborts or errors, by reason) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r["floor"] or {}
        aborts = ", ".join(f"{n}x {k}" for k, n in r["loadgen_aborts"].items()) or "none"
        lines.append(
            f"| {r['protocol']} | {r['load_factor']:g} | {r['target_rps']:.0f} | "
            f"{fmt(r['runtime_attainment'], '.4f')} | {fmt(r['sim_attainment'], '.4f')} | "
            f"{fmt(r['client_on_time'], '.4f')} ({r['latency_samples']}) | "
            f"{fmt(r['runtime_p50_ms'])} / {fmt(r['runtime_p99_ms'])} | "
            f"{fmt(f.get('offered_rps'), '.0f')} / {fmt(f.get('answered_rps'), '.0f')} | "
            f"{fmt(f.get('p50_ms'))} / {fmt(f.get('p99_ms'))} | "
            f"{r['loadgen_cpu_us_per_request']:.0f} / "
            f"{fmt(f.get('loadgen_cpu_us_per_request'), '.0f')} | "
            f"{r['loadgen_runs']} ({aborts}) |")
    lines += ["", "## Largest load factor at >= 99 % attainment", "",
              "| protocol | live (mean over models; per model) | simulator search "
              "| **live_over_sim** | simulator on the same grid | live / sim grid "
              "| live, by client round trip |",
              "|---|---|---|---|---|---|---|"]
    for protocol, s in summary.items():
        per = ", ".join(f"{m.split('_')[0]} {v:g}" for m, v in
                        s["live_per_model_load_factor"].items())
        lines.append(f"| {protocol} | {s['live_load_factor']:.3f} ({per}) | "
                     f"{fmt(s.get('sim_load_factor'), '.3f')} | "
                     f"**{fmt(s.get('live_over_sim'), '.3f')}** | "
                     f"{fmt(s.get('sim_grid_load_factor'), '.3f')} | "
                     f"{fmt(s.get('live_over_sim_grid'), '.3f')} | "
                     f"{s['live_client_load_factor']:.3f} |")
    cores = os.cpu_count() or 1
    open_loop = any(r.get("loadgen") == "open-loop" for r in rows)
    lines += ["", "## In short", "", *findings(rows, planned_rps), "", "## How to read it", "",
              "* **EMULATED**: timing-only workers hold each batch for its profiled latency; "
              "no GPU, no tensor math.  The CPU measured is the data plane's own: protocol, "
              "validation, scheduler, worker threads, hand-offs, answers.",
              "* server CPU us/req = (utime + stime of the server's process tree over the "
              "window, from /proc) / answers in the window (results and errors).  The floor is "
              "the same figure for a bare echo server of the same protocol at the same offered "
              "rates: a raw ASGI app under uvicorn with `ppipe serve`'s settings, and a "
              "`grpc.aio` servicer on tritonclient's `service_pb2_grpc` (ModelInfer and the "
              "metadata calls perf_analyzer makes), both echoing a 4-byte output.  "
              "ratio = live / floor.",
              *([] if repeats == 1 else [
                  f"* **{repeats} repeats**: each point was measured {repeats} times, live and "
                  "floor interleaved (live, floor, live, floor, ...; each a fresh warm-up and "
                  "window, each pair back to back).  Every figure in the tables is the **median "
                  "over the repeats** (per model for per-model attainment; a figure a repeat "
                  "lacks is left out), except load generator runs and aborts and the requests "
                  "timed (client on time's samples), which are totals over the repeats (a row is "
                  "marked as having aborts if any repeat had one).  "
                  "ratio = the **median of the per-pair ratios** live_i / floor_i, not the "
                  "ratio of the two medians shown (the JSON gives both: `ratio`, "
                  "`ratio_of_medians`); \"ratio min-max over repeats\" is the spread of the "
                  "per-pair ratios.  The JSON rows list every repeat's figures "
                  "(`cpu_us_samples`, `floor_cpu_us_samples`, `ratio_samples`, "
                  "`attainment_samples`)."]),
              *(OPEN_LOOP_NOTES["offered"] if open_loop else [
                  "* offered = each model's target rate x the part of the window in which one of "
                  "its perf_analyzer processes was sending: from its first request until it "
                  "finished or printed that a request failed (it is then replaced at once and left "
                  "to wait for its requests in flight).  Target req/s is in the details.  An "
                  "aborted run leaves no record of its first request (its start plus the shortest "
                  "start-up seen is used), and some of its threads stop at the failed request, "
                  "before it says so: on rows with aborts, offered is an upper bound and attainment"
                  " a lower bound (marked <= and >=), and runtime attainment an upper bound.  "
                  "arrived = requests that reached the runtime (`ppipe_requests_total`); answered ="
                  " results + drops + failures (`/metrics`, before and after the window).",
              ]),
              "* attainment = results by the deadline (the runtime's latency, as "
              "`bench_serve.py` counts it) / offered (or arrived or answered where larger: the "
              "window's edges): a request stuck in the front end counts as a miss.  runtime "
              "attainment = the same over arrived, i.e. `bench_serve.py`'s figure, blind to "
              "the front end's backlog.  sim attainment: the simulator on the same plan and "
              "load factor.  client on time: of the requests the load generator timed (below), "
              "the fraction whose round trip was within the model's SLO.",
              *(OPEN_LOOP_NOTES["p50"] if open_loop else [
                  "* p50 / p99: client round trip as perf_analyzer saw it, over requests sent in "
                  "the window by perf_analyzer runs that finished.  perf_analyzer gives up at the "
                  "first failed request, and the live server drops (503) requests whose deadline it"
                  " cannot meet: such a run is replaced (a gap in that model's load: the "
                  "replacement's start-up, tens of ms, or seconds when its metadata calls queue "
                  "behind a backlogged server) and its requests are not timed.  Rows whose runs all"
                  " aborted have no client figures; the runtime's histogram (arrival to last stage,"
                  " interpolated in its buckets) is given for every live row.",
              ]),
              f"* CPU shares are of all {cores} cores.  The load generator ("
              + ("one `scripts/loadgen.py` process" if open_loop else "one perf_analyzer per "
                 "model")
              + ") runs on the **same cores** as the server, and so do other people's "
              "jobs: figures are noisy, and past the point where server + load generator need "
              "every core, the server is starved rather than slow.",
              "* live max load factor: per model, the largest measured load factor at which its "
              "attainment is >= 99 %"
              + ("" if repeats == 1 else
                 f" (its median attainment over the {repeats} repeats)")
              + "; the mean over models (the simulator's search reports the "
              "same mean).  \"by client round trip\": the same rule on client on time"
              + (" (" if repeats == 1 else " (its median over the repeats; ")
              + "a load factor with no timed requests counts as failed).  The simulator "
              "searches from 1.0 down by 0.05, as `ppipe simulate PLAN --search`; \"on the "
              "same grid\" applies the live rule to the simulator's attainment at the "
              "measured load factors.",
              "* perf_analyzer seeds its Poisson schedule the same way in every process: each "
              "model's arrivals are a time-scaled copy of the others'." if not open_loop else
              "* The generator's arrival processes are independent per model.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", type=int, default=DEFAULT_GROUP, help="paper model group (1-6)")
    p.add_argument("--cluster", default=DEFAULT_CLUSTER,
                   help="paper cluster: L4-T4, L4-P4, V100-T4 or V100-P4 (100 GPUs each)")
    p.add_argument("--plan", type=Path, help="serve this plan.json instead of planning")
    p.add_argument("--profiles", type=Path, default=None,
                   help="profile folder (default: $PPIPE_PROFILES or ../shared/ppipe-profiles)")
    p.add_argument("--protocols", default="http,grpc", help="comma list of http, grpc")
    p.add_argument("--load-factors", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9],
                   help="fractions of each model's planned rate")
    p.add_argument("--window-s", type=float, default=20.0, help="measured seconds per point")
    p.add_argument("--warmup-s", type=float, default=3.0, help="load before each window")
    p.add_argument("--drain-s", type=float, default=3.0,
                   help="longest wait for perf_analyzer to finish after its last request")
    p.add_argument("--settle-s", type=float, default=1.0, help="pause between points")
    p.add_argument("--repeats", type=int, default=1, metavar="N",
                   help="measure every point N times, live and floor interleaved (live, "
                        "floor, live, floor, ...); rows give the medians and the samples.  "
                        "An odd N makes each median one of the samples (with N even it is the "
                        "mean of the middle two, and one disturbed window moves it)")
    p.add_argument("--idle-s", type=float, default=3.0,
                   help="seconds of the server's CPU sampled with no load, after start-up")
    p.add_argument("--load-generator", choices=("perf_analyzer", "open-loop"),
                   default="perf_analyzer",
                   help="perf_analyzer (one per model, restarted when it gives up at a failed "
                        "request) or open-loop (scripts/loadgen.py: one process, independent "
                        "Poisson arrivals per model kept through errors, every answer logged)")
    p.add_argument("--max-threads", type=int, default=4, help="perf_analyzer --max-threads")
    p.add_argument("--frontends", type=int, default=1,
                   help="ppipe serve --frontends N: processes answering the protocols (the "
                        "server's CPU is that of all of them)")
    p.add_argument("--no-floor", action="store_true", help="skip the echo floors")
    p.add_argument("--no-sim", action="store_true", help="skip the simulator")
    p.add_argument("--sim-duration-s", type=float, default=30.0)
    p.add_argument("--start-timeout-s", type=float, default=180.0)
    p.add_argument("--perf-analyzer", type=Path,
                   default=os.environ.get("PERF_ANALYZER") or (
                       DEFAULT_PERF_ANALYZER if DEFAULT_PERF_ANALYZER.exists()
                       else shutil.which("perf_analyzer")),
                   help="perf_analyzer binary (default: $PERF_ANALYZER, "
                        ".tools/perf_analyzer/perf_analyzer, or on PATH)")
    code = p.add_mutually_exclusive_group()
    code.add_argument("--server-tree", type=Path, default=ROOT,
                      help="source tree whose `ppipe plan/serve/simulate` run (default: this "
                           "checkout, uncommitted changes included)")
    code.add_argument("--server-commit", metavar="REV",
                      help="run `ppipe` from a `git archive` copy of this repository at REV "
                           "(e.g. HEAD: the last commit, without work in progress)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_dataplane"),
                   help="plan, logs and perf_analyzer exports go here")
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "dataplane.md",
                   help="markdown table (default docs/benchmarks/dataplane.md)")
    p.add_argument("--echo-server", choices=("http", "grpc"), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--models", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.echo_server:  # a floor server, started by this script
        serve = serve_echo_grpc if args.echo_server == "grpc" else serve_echo_http
        serve(args.port, args.models.split(","))
        return 0

    protocols = [x.strip() for x in args.protocols.split(",") if x.strip()]
    if not protocols or any(x not in ("http", "grpc") for x in protocols):
        p.error(f"--protocols {args.protocols!r}: expected a comma list of http, grpc")
    if any(not 0 < lf <= 2 for lf in args.load_factors):
        p.error(f"--load-factors {args.load_factors}: expected values in (0, 2]")
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: expected an integer >= 1")
    pa_version = None
    if args.load_generator == "perf_analyzer":
        if not args.perf_analyzer or not Path(args.perf_analyzer).is_file() \
                or not os.access(args.perf_analyzer, os.X_OK):
            p.error(f"perf_analyzer not found (got {args.perf_analyzer}); fetch it with "
                    "scripts/fetch_perf_analyzer.sh, give --perf-analyzer PATH / "
                    "$PERF_ANALYZER, or use --load-generator open-loop")
        version = subprocess.run([str(args.perf_analyzer), "--version"], capture_output=True,
                                 text=True, timeout=30)
        pa_version = (version.stdout or version.stderr).strip().removeprefix("Perf Analyzer ")
        if version.returncode != 0:
            p.error(f"{args.perf_analyzer} --version failed (exit {version.returncode}): "
                    f"{(version.stderr or version.stdout).strip()[:300]}")
    if args.profiles is None:  # as ppipe_trt.profiles.default_profiles_dir
        args.profiles = Path(os.environ.get("PPIPE_PROFILES")
                             or ROOT.parent / "shared" / "ppipe-profiles")
    args.profiles = args.profiles.resolve()
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.server_commit:
        args.server_tree = export_commit(args.server_commit, args.workdir)
    args.server_tree = args.server_tree.resolve()
    if not (args.server_tree / "ppipe_trt" / "cli.py").is_file():
        p.error(f"--server-tree {args.server_tree}: no ppipe_trt/cli.py there")

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    t_start = time.monotonic()
    try:
        return run(args, argv, protocols, pa_version, t_start)
    finally:
        CHILDREN.stop_all()


def run(args, argv, protocols, pa_version: str, t_start: float) -> int:
    code = describe_tree(args.server_tree)  # before the run: the tree may change meanwhile
    plan_path = make_plan(args, args.workdir)
    plan = json.loads(plan_path.read_text())
    rates_1 = {m["model"]: float(m["throughput_rps"]) for m in plan["models"]}
    slo_ms = {m["model"]: float(m["slo_ms"]) for m in plan["models"]}
    models = list(rates_1)
    gpus = sum(n for m in plan["models"] for n in m["gpus_used"].values())
    what = (f"paper group {args.group} on {args.cluster}" if not args.plan
            else f"plan {args.plan}")
    print(f"config: {what}, cluster {plan['cluster'].get('name', '?')}, "
          f"{gpus} GPUs used; planned {sum(rates_1.values()):.0f} req/s in all "
          f"({', '.join(f'{m} {r:.0f}' for m, r in rates_1.items())}); plan saved to "
          f"{plan_path}", flush=True)

    server, http_port, grpc_port, status = start_live(args, plan_path, args.workdir)
    check_models(http_port, models)
    hop_us = float(status.get("hop_overhead_us") or 0.0)
    cores = os.cpu_count() or 1
    c0, t0 = tree_cpu_s(server.pid), time.monotonic()
    time.sleep(args.idle_s)  # what the server burns with no request at all
    idle_share = (tree_cpu_s(server.pid) - c0) / ((time.monotonic() - t0) * cores)
    print(f"ppipe serve ready (EMULATED, timing-only workers): HTTP {http_port}, gRPC "
          f"{grpc_port}, hop overhead {hop_us:.0f} us, idle CPU {100 * idle_share:.1f} % "
          f"of {cores} cores; scheduler: {scheduler_line(status)}", flush=True)

    def live_counter():
        return live_counters(http_port)

    measured: list[Measurement] = []
    delays = StartupDelays()
    for protocol in protocols:
        echo = None
        if not args.no_floor:
            echo, echo_port = start_echo(args, protocol, models, args.workdir)
        try:
            for lf in args.load_factors:
                rates = {m: lf * r for m, r in rates_1.items()}
                # the pairs interleaved, so that a slow spell of the shared machine falls
                # on one pair rather than on every live or every floor window
                for repeat in range(1, args.repeats + 1):
                    live = measure(args, "live", protocol, lf, rates, slo_ms, server.pid,
                                   http_port if protocol == "http" else grpc_port,
                                   live_counter, delays, args.workdir, repeat)
                    measured.append(live)
                    report_point(live, repeat, args.repeats)
                    time.sleep(args.settle_s)
                    if echo is not None:
                        floor = measure(args, "floor", protocol, lf, rates, slo_ms, echo.pid,
                                        echo_port,
                                        lambda: echo_counters(protocol, echo_port, models),
                                        delays, args.workdir, repeat)
                        measured.append(floor)
                        report_point(floor, repeat, args.repeats)
                        time.sleep(args.settle_s)
        finally:
            if echo is not None:
                Children.stop(echo)
    Children.stop(server)

    sim = None
    if not args.no_sim:
        print("simulator: searching the same plan ...", flush=True)
        sim = simulator_figures(args, plan_path, hop_us, args.workdir)
    rows, summary = build_rows(measured, sim, models)
    wall_s = time.monotonic() - t_start
    cl = plan["cluster"]
    header = [
        f"Configuration: **{what}** (cluster `{cl.get('name', '?')}`, {gpus} GPUs used by the "
        f"plan), planned rate at load factor 1.0: {sum(rates_1.values()):.0f} req/s in all ("
        + ", ".join(f"`{m}` {r:.0f}" for m, r in rates_1.items()) + ").  Served by `ppipe "
        "serve --plan P --emulate"
        + (f" --frontends {args.frontends}` ({args.frontends} processes answer the protocols; "
           "server CPU is all of them)" if args.frontends > 1 else "`")
        + ": **EMULATED**, timing-only workers (every figure below); "
        f"code: {code}; scheduler: {scheduler_line(status)}.  With no load, the server used "
        f"{100 * idle_share:.1f} % of the machine's CPU ({args.idle_s:g} s sample).",
        "",
        (f"Load: one `perf_analyzer` ({pa_version}) per model, `--async "
         f"--request-distribution poisson --request-rate-range R --max-threads "
         f"{args.max_threads}`, binary tensors, one FP32 element per sample; "
         if pa_version else
         "Load: **open loop** (`--load-generator open-loop`: `scripts/loadgen.py`, one process, "
         "an independent Poisson arrival process per model at a fixed rate for the whole "
         "point, kept through errors; every request logged with its send time, round trip "
         "and status), binary tensors over HTTP / `raw_input_contents` over gRPC, one FP32 "
         "element per sample; ")
        + f"{args.warmup_s:g} s warm-up, then a {args.window_s:g} s "
        + ("window per point, each point live then floor." if args.repeats == 1 else
           f"window per measurement, each point measured {args.repeats} times, live and floor "
           "interleaved (live, floor, live, floor, ...); medians over the repeats.")
        + f"  Machine: {os.cpu_count()} cores, "
        "shared with the load generator and with other engineers' jobs: figures are noisy.",
        "", f"Simulator: `search_load_factor` on the same plan ({args.sim_duration_s:g} s "
        f"simulated, 2 s warm-up, hop overhead {hop_us:.0f} us as measured by the server)."
        if sim else "Simulator: skipped (--no-sim)."]
    text = markdown(argv, header, rows, summary, wall_s, sum(rates_1.values()))
    print(text, flush=True)
    if args.out:  # notes written by hand below the marker survive a re-run
        args.out.parent.mkdir(parents=True, exist_ok=True)
        old = args.out.read_text() if args.out.is_file() else ""
        notes = old.split(NOTES_MARKER, 1)[1] if NOTES_MARKER in old else "\n"
        args.out.write_text(text + "\n" + NOTES_MARKER + notes)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": argv, "config": what, "plan": str(plan_path),
                                         "summary": summary, "simulator": sim, "rows": rows,
                                         "wall_s": wall_s}, indent=1, default=str))
    print(f"wall time {wall_s:.0f} s", flush=True)
    return 0


def report_point(m: Measurement, repeat: int = 1, repeats: int = 1) -> None:
    which = "" if repeats == 1 else f"repeat {repeat}/{repeats} "
    print(f"  {which}{m.target:5s} {m.protocol:4s} load {m.load_factor:g}: target "
          f"{m.target_rps:.0f} "
          f"offered {m.offered_rps:.0f} arrived {m.arrived_rps:.0f} answered "
          f"{m.answered_rps:.0f} req/s, attainment "
          f"{fmt(m.attainment, '.4f')}, CPU {m.cpu_us_per_request:.0f} us/req (server "
          f"{100 * m.server_cpu_share:.0f} %, loadgen {100 * m.loadgen_cpu_share:.0f} %), "
          f"p50/p99 {fmt(m.p50_ms)}/{fmt(m.p99_ms)} ms ({m.latency_samples}), runs "
          f"{m.loadgen_runs} (start-up {m.loadgen_startup_s:.2f} s) aborts "
          f"{m.loadgen_aborts or '-'}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
