#!/usr/bin/env python
"""An open-loop Poisson load generator that keeps its offered rate through errors.

``perf_analyzer`` gives up at the first failed request, and a serving system under SLOs
answers some requests with an error by design (the reservation scheduler drops a request
whose deadline no pipeline can meet: 503 / UNAVAILABLE).  Near a plan's capacity every
perf_analyzer run therefore ends early, and a benchmark that restarts it offers less load,
with gaps, than the simulator it is compared with.  This generator measures what the
simulator measures: each model gets its own Poisson arrival process at a fixed rate for the
whole run, every request is sent on time whatever the answers before it were, and every
answer is counted -- results, errors by status, transport failures.

Protocols: KServe v2 over HTTP/1.1 with the binary tensor extension (raw keep-alive
connections, requests built once, responses parsed by ``httptools``: tens of us of CPU per
request, below perf_analyzer's ~200) and KServe v2 / Triton gRPC (``grpc.aio`` with the
service stubs ``tritonclient`` ships, ``raw_input_contents``).  Inputs are zeros of one sample
(``-1`` dims become 1), the models' metadata says their names, types and shapes.

    python scripts/loadgen.py --url 127.0.0.1:8000 --protocol http \\
        --model resnet=200 --model yolo=150 --duration-s 20 --out /tmp/load.json

Output (``--out``, JSON): per model the send times (epoch ns), round trips (ms; -1 when no
answer came) and statuses (HTTP status, or 200 / the gRPC status code's HTTP equivalent per
the KServe mapping: 400 INVALID_ARGUMENT, 404 NOT_FOUND, 503 UNAVAILABLE, 504
DEADLINE_EXCEEDED, 500 otherwise; 0: the connection failed), the first message of each error
status, and how late sends were against their schedule (the generator's own health: a lag of
milliseconds means it could not keep the rate, and the file says so).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import urllib.error
import urllib.request
import zlib

import numpy as np

#: A connection pool never grows past this many HTTP connections (requests then wait for one,
#: and their send lag says so).
MAX_CONNECTIONS = 1024
_GRPC_TO_HTTP = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "UNAVAILABLE": 503,
                 "DEADLINE_EXCEEDED": 504, "RESOURCE_EXHAUSTED": 429, "OK": 200}


class ModelRecord:
    """What one model's arrivals got: parallel lists, one entry per request sent."""

    def __init__(self, name: str, rate_rps: float):
        self.name, self.rate_rps = name, rate_rps
        self.sent_ns: list[int] = []
        self.latency_ms: list[float] = []
        self.status: list[int] = []
        self.errors: dict[str, str] = {}  # status -> the first error message seen
        self.lag_ms: list[float] = []
        self.closed = False  # past the drain: answers still in flight stay "no answer"

    def start(self) -> int:
        self.sent_ns.append(time.time_ns())
        self.latency_ms.append(-1.0)
        self.status.append(-1)
        return len(self.sent_ns) - 1

    def finish(self, i: int, status: int, latency_ms: float, error: str = "") -> None:
        if self.closed:
            return
        self.status[i] = status
        self.latency_ms[i] = latency_ms
        if status != 200 and str(status) not in self.errors:
            self.errors[str(status)] = error[:300]

    def to_json(self) -> dict:
        lag = np.asarray(self.lag_ms or [0.0])
        return {"rate_rps": self.rate_rps, "sent_ns": self.sent_ns,
                "latency_ms": [round(x, 3) for x in self.latency_ms], "status": self.status,
                "errors": self.errors,
                "send_lag_ms": {"p50": float(np.percentile(lag, 50)),
                                "p99": float(np.percentile(lag, 99)), "max": float(lag.max())}}


def model_metadata(protocol: str, url: str, model: str) -> dict:
    """The model's KServe v2 metadata (name, inputs, outputs), over the protocol used."""
    if protocol == "http":
        try:
            with urllib.request.urlopen(f"http://{url}/v2/models/{model}", timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise SystemExit(f"model {model!r}: {url} answered its metadata with {exc.code}: "
                             f"{exc.read().decode(errors='replace')[:300]}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise SystemExit(f"model {model!r}: cannot read its metadata from {url}: "
                             f"{getattr(exc, 'reason', exc)}") from None
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    with grpc.insecure_channel(url) as channel:
        try:
            md = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
                pb.ModelMetadataRequest(name=model), timeout=10.0)
        except grpc.RpcError as exc:
            raise SystemExit(f"model {model!r}: {url} answered its metadata with "
                             f"{exc.code().name}: {exc.details()}") from None
    return {"name": md.name,
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                       for t in md.inputs],
            "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                        for t in md.outputs]}


def one_sample_inputs(meta: dict) -> list[tuple[str, str, list[int], bytes]]:
    """(name, datatype, shape, zero bytes) of one sample of each input."""
    sizes = {"FP32": 4, "FP16": 2, "FP64": 8, "INT8": 1, "UINT8": 1, "INT16": 2, "INT32": 4,
             "INT64": 8, "BOOL": 1, "BF16": 2}
    out = []
    for i in meta["inputs"]:
        if i["datatype"] not in sizes:
            raise SystemExit(f"model {meta['name']}: input {i['name']} is {i['datatype']}; the "
                             f"generator sends fixed-size types only ({sorted(sizes)})")
        shape = [1 if d < 0 else d for d in i["shape"]]
        out.append((i["name"], i["datatype"], shape,
                    bytes(int(np.prod(shape)) * sizes[i["datatype"]])))
    return out


# ---- HTTP --------------------------------------------------------------------------------------

def http_request_bytes(host: str, meta: dict) -> bytes:
    inputs = one_sample_inputs(meta)
    header = json.dumps({
        "inputs": [{"name": n, "datatype": d, "shape": s,
                    "parameters": {"binary_data_size": len(b)}} for n, d, s, b in inputs],
        "outputs": [{"name": o["name"], "parameters": {"binary_data": True}}
                    for o in meta["outputs"]]}, separators=(",", ":")).encode()
    body = header + b"".join(b for *_, b in inputs)
    return (f"POST /v2/models/{meta['name']}/infer HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: {len(header)}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class HttpPool:
    """Keep-alive HTTP/1.1 connections to one server; one request in flight per connection
    (no pipelining, as perf_analyzer's HTTP client)."""

    def __init__(self, loop, host: str, port: int):
        self.loop, self.host, self.port = loop, host, port
        self.idle: list[HttpConn] = []
        self.open = 0
        self.waiting: list[tuple] = []  # requests that found no connection at the cap

    def send(self, request: bytes, record: ModelRecord, i: int, t0: float) -> None:
        if self.idle:
            self.idle.pop().send(request, record, i, t0)
        elif self.open < MAX_CONNECTIONS:
            self.open += 1
            conn = HttpConn(self)
            conn.pending = (request, record, i, t0)
            task = self.loop.create_task(
                self.loop.create_connection(lambda: conn, self.host, self.port))
            task.add_done_callback(conn.connected)
        else:
            self.waiting.append((request, record, i, t0))

    def release(self, conn: "HttpConn") -> None:
        if self.waiting:
            conn.send(*self.waiting.pop(0))
        else:
            self.idle.append(conn)


class HttpConn(asyncio.Protocol):
    def __init__(self, pool: HttpPool):
        import httptools

        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport = None
        self.pending: tuple | None = None
        self.current: tuple | None = None  # (request, record, i, t0)
        self.body: list[bytes] = []
        self.answers = 0        # responses completed on this connection
        self.answering = False  # bytes of the current response have arrived

    def connected(self, task: asyncio.Task) -> None:
        exc = task.exception()
        request, record, i, t0 = self.pending
        self.pending = None
        if exc is not None:
            self.pool.open -= 1
            record.finish(i, 0, (time.perf_counter() - t0) * 1e3, f"connect: {exc}")
        elif self.transport is None or self.transport.is_closing():
            self.pool.send(request, record, i, t0)  # lost before its first request
        else:
            self.send(request, record, i, t0)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, request: bytes, record: ModelRecord, i: int, t0: float) -> None:
        self.current = (request, record, i, t0)
        self.body.clear()
        self.answering = False
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.answering = True
        try:
            self.parser.feed_data(data)
        except Exception as exc:  # a malformed answer: the server's fault, counted as such
            self._fail(f"bad HTTP answer: {exc}")
            self.transport.close()

    def on_body(self, body: bytes) -> None:
        if self.parser.get_status_code() != 200:
            self.body.append(body)

    def on_message_complete(self) -> None:
        _, record, i, t0 = self.current
        self.current = None
        self.answers += 1
        status = self.parser.get_status_code()
        record.finish(i, status, (time.perf_counter() - t0) * 1e3,
                      b"".join(self.body).decode(errors="replace") if status != 200 else "")
        if self.parser.should_keep_alive():
            self.pool.release(self)
        else:
            self.transport.close()

    def _fail(self, why: str) -> None:
        if self.current is not None:
            _, record, i, t0 = self.current
            self.current = None
            record.finish(i, 0, (time.perf_counter() - t0) * 1e3, why)

    def connection_lost(self, exc) -> None:
        self.pool.open -= 1
        if self in self.pool.idle:
            self.pool.idle.remove(self)
        if self.current is not None and self.answers and not self.answering:
            # A kept-alive connection the server closed as the request went out (its idle
            # timeout): nothing was answered, so send it again on another connection, as
            # HTTP clients do; its round trip still counts from the first send.
            request, record, i, t0 = self.current
            self.current = None
            self.pool.send(request, record, i, t0)
            return
        self._fail(f"connection lost: {exc}")


# ---- gRPC --------------------------------------------------------------------------------------

def grpc_sender(url: str, meta: dict):
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    inputs = one_sample_inputs(meta)
    request = pb.ModelInferRequest(
        model_name=meta["name"],
        inputs=[pb.ModelInferRequest.InferInputTensor(name=n, datatype=d, shape=s)
                for n, d, s, _ in inputs],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=o["name"])
                 for o in meta["outputs"]],
        raw_input_contents=[b for *_, b in inputs])
    channel = grpc.aio.insecure_channel(url, options=[("grpc.max_receive_message_length", -1)])
    infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer

    def answered(fut, record: ModelRecord, i: int, t0: float) -> None:
        ms = (time.perf_counter() - t0) * 1e3
        exc = fut.exception()
        if exc is None:
            record.finish(i, 200, ms)
        elif isinstance(exc, grpc.aio.AioRpcError):
            record.finish(i, _GRPC_TO_HTTP.get(exc.code().name, 500), ms,
                          f"{exc.code().name}: {exc.details()}")
        else:
            record.finish(i, 0, ms, f"{type(exc).__name__}: {exc}")

    def send(record: ModelRecord, i: int, t0: float) -> None:
        fut = asyncio.ensure_future(infer(request))
        fut.add_done_callback(lambda f: answered(f, record, i, t0))

    return send, channel


# ---- the run -----------------------------------------------------------------------------------

async def run(args) -> dict:
    loop = asyncio.get_running_loop()
    host, _, port = args.url.rpartition(":")
    metas = {m: model_metadata(args.protocol, args.url, m) for m, _ in args.model}
    records = {m: ModelRecord(m, rate) for m, rate in args.model}
    senders, channels = {}, []
    if args.protocol == "http":
        pool = HttpPool(loop, host, int(port))
        for m in metas:
            request = http_request_bytes(args.url, metas[m])
            senders[m] = (lambda req: lambda rec, i, t0: pool.send(req, rec, i, t0))(request)
    else:
        for m in metas:
            senders[m], channel = grpc_sender(args.url, metas[m])
            channels.append(channel)
    start = loop.time() + 0.05
    end = start + args.duration_s

    def arrival(m: str, rng: random.Random, due: float) -> None:
        now = loop.time()
        rec = records[m]
        rec.lag_ms.append((now - due) * 1e3)
        senders[m](rec, rec.start(), time.perf_counter())
        nxt = due + rng.expovariate(rec.rate_rps)
        if nxt < end:
            loop.call_at(nxt, arrival, m, rng, nxt)

    for m, rec in records.items():
        # independent streams per model (perf_analyzer seeds every process alike)
        rng = random.Random(zlib.crc32(m.encode()) ^ args.seed)
        first = start + rng.expovariate(rec.rate_rps)
        loop.call_at(first, arrival, m, rng, first)
    await asyncio.sleep(max(0.0, end - loop.time()))
    waited = loop.time()
    while loop.time() - waited < args.drain_s and any(
            s == -1 for rec in records.values() for s in rec.status):
        await asyncio.sleep(0.05)
    for rec in records.values():
        rec.closed = True
    for channel in channels:
        await channel.close()
    out = {"protocol": args.protocol, "url": args.url, "duration_s": args.duration_s,
           "cpu_s": time.process_time(), "models": {m: r.to_json() for m, r in records.items()}}
    lag_p99 = max(r["send_lag_ms"]["p99"] for r in out["models"].values())
    out["kept_rate"] = lag_p99 < args.max_lag_ms
    return out


def parse_model(text: str) -> tuple[str, float]:
    name, sep, rate = text.rpartition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--model wants NAME=RATE (req/s), got {text!r}")
    try:
        value = float(rate)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--model {text!r}: rate {rate!r} is not a number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--model {text!r}: the rate must be > 0")
    return name, value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="HOST:PORT of the protocol's endpoint")
    ap.add_argument("--protocol", choices=("http", "grpc"), default="http")
    ap.add_argument("--model", type=parse_model, action="append", required=True,
                    metavar="NAME=RATE", help="a model and its Poisson rate (req/s); repeat")
    ap.add_argument("--duration-s", type=float, default=10.0, help="how long to send")
    ap.add_argument("--drain-s", type=float, default=10.0,
                    help="how long to wait for answers after the last send")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-lag-ms", type=float, default=5.0,
                    help="p99 send lag above which the output says the rate was not kept")
    ap.add_argument("--out", required=True, help="JSON output path")
    args = ap.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        uvloop = None
    result = uvloop.run(run(args)) if uvloop is not None else asyncio.run(run(args))
    with open(args.out, "w") as fh:
        json.dump(result, fh)
    print(summary(result))
    total = sum(len(r["status"]) for r in result["models"].values())
    ok = sum(s == 200 for r in result["models"].values() for s in r["status"])
    print(f"sent {total} requests, {ok} results, kept rate: {result['kept_rate']}, "
          f"CPU {result['cpu_s']:.2f} s", file=sys.stderr)
    return 0


def summary(result: dict) -> str:
    """A markdown table: per model what was sent, the answers by status, round trips."""
    lines = ["| model | rate req/s | sent | results | errors (status: count) | p50 / p99 ms "
             "| send lag p99 ms |", "|---|---|---|---|---|---|---|"]
    for m, r in result["models"].items():
        ok = sorted(ms for ms, st in zip(r["latency_ms"], r["status"]) if st == 200)
        errors: dict[int, int] = {}
        for st in r["status"]:
            if st != 200:
                errors[st] = errors.get(st, 0) + 1
        err = ", ".join(f"{'no answer' if st == -1 else st}: {n}"
                        for st, n in sorted(errors.items())) or "-"
        lat = (f"{ok[len(ok) // 2]:.1f} / {ok[min(len(ok) - 1, int(0.99 * len(ok)))]:.1f}"
               if ok else "-")
        lines.append(f"| {m} | {r['rate_rps']:g} | {len(r['status'])} | {len(ok)} | {err} | "
                     f"{lat} | {r['send_lag_ms']['p99']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
