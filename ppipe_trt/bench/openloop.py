"""An open-loop Poisson load generator for KServe v2 / Triton gRPC servers.

One load point: requests arrive as a Poisson process of rate R (fixed seed: the same seed gives
the same arrival times, so two servers see identical schedules) for D seconds; each is sent at
its scheduled time whatever is outstanding (open loop: a slow server faces a growing queue, not
a politely waiting client).  When D has passed the generator waits ``grace_factor`` x the SLO
for late answers and then cancels what is still outstanding.

Transport: ``grpc.aio`` calling the ``ModelInfer`` method of tritonclient's service
definition (``tritonclient.grpc.service_pb2``) with one ``ModelInferRequest`` built and
serialized once (``raw_input_contents``: a random tensor of batch 1 per input) and answers left
unparsed (the outcome is the call's status): the client shares the cores with the server, so
it spends its CPU on the calls only, not on re-encoding 600 KB of input each time (that saves
a fifth of its ~0.7 ms per ResNet request).  Readiness goes through
``tritonclient.grpc.aio.InferenceServerClient``.  Only loopback targets are accepted.

Per request it records the scheduled and actual send times and the outcome: ``"ok"``, the
gRPC status code's name of an error answer (``"UNAVAILABLE"``, ...), or ``"unanswered"``
(cancelled at the end).  Latency counts from the *scheduled* time to the answer, so a client
that falls behind its schedule cannot hide a server's queue; the send lag is reported apart.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Mapping, Sequence

import numpy as np

from ppipe_trt.bench.errors import BenchError
from ppipe_trt.bench.procs import read_self

UNANSWERED = "unanswered"
OK = "ok"
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1),
                    ("grpc.max_receive_message_length", -1)]
MODEL_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"


def _raw_model_infer(channel):
    """``ModelInfer`` taking the serialized request and answering undecoded bytes."""
    return channel.unary_unary(MODEL_INFER_METHOD)


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """One load point: ``rate_rps`` Poisson arrivals for ``duration_s``, answers judged
    against ``slo_ms``; at most ``max_requests`` are scheduled."""

    rate_rps: float
    duration_s: float
    slo_ms: float
    seed: int = 0
    grace_factor: float = 2.0
    max_requests: int = 200_000

    def __post_init__(self):
        if not (self.rate_rps > 0 and self.duration_s > 0 and self.slo_ms > 0):
            raise BenchError(f"load point rate {self.rate_rps} req/s, {self.duration_s} s, SLO "
                             f"{self.slo_ms} ms; expected all > 0")
        if self.rate_rps * self.duration_s < 1:
            raise BenchError(f"load point of {self.rate_rps:g} req/s for {self.duration_s:g} s "
                             "offers less than one request; raise the rate or the duration")

    @property
    def grace_s(self) -> float:
        return self.grace_factor * self.slo_ms / 1000.0


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request: times in seconds from the run's start; ``latency_ms`` from the scheduled
    time to the answer (None when it was cancelled unanswered)."""

    scheduled_s: float
    sent_s: float
    latency_ms: float | None
    outcome: str


@dataclass(frozen=True, slots=True)
class PointSummary:
    """What one load point measured.

    ``goodput_rps``: answers within the SLO per second of offered duration; ``within_slo``:
    their fraction of the requests sent; ``rejections``: error answers by gRPC status code;
    ``unanswered``: cancelled after the grace period; ``p50_ms``/``p99_ms``: latency of the
    successful answers (None when there is none); ``client_cpu_pct``: this process's CPU over
    the run's wall time, in % of one core; ``send_lag_p99_ms``: how late the client sent.
    """

    offered_rps: float
    duration_s: float
    sent: int
    answered: int
    within_slo_count: int
    goodput_rps: float
    within_slo: float
    rejections: dict[str, int] = field(default_factory=dict)
    unanswered: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    client_cpu_pct: float = 0.0
    send_lag_p99_ms: float = 0.0
    wall_s: float = 0.0


def check_loopback(target: str) -> None:
    host = target.rpartition(":")[0].strip("[]")
    if host not in _LOOPBACK_HOSTS:
        raise BenchError(f"target {target!r}: the benchmark only loads servers on this "
                         "machine (127.0.0.1:PORT)")


def poisson_schedule(rate_rps: float, duration_s: float, seed: int,
                     max_requests: int = 200_000) -> np.ndarray:
    """Arrival times (s from the start, increasing, all < ``duration_s``) of a Poisson
    process of rate ``rate_rps``; at most ``max_requests``."""
    rng = np.random.default_rng(seed)
    expected = rate_rps * duration_s
    size = min(max_requests, int(expected + 10 * math.sqrt(expected) + 10))
    times = np.cumsum(rng.exponential(1.0 / rate_rps, size))
    return times[times < duration_s]


def random_inputs(inputs: Sequence[tuple[str, str, Sequence[int]]], seed: int = 0
                  ) -> dict[str, np.ndarray]:
    """One random sample (batch 1) per input, from (name, numpy dtype, dims without the batch
    dimension): floats standard normal, integers 0..9, booleans random."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, dtype, dims in inputs:
        if any(int(d) < 1 for d in dims):
            raise BenchError(f"input {name!r} has dims {list(dims)}; the load generator needs "
                             "fixed positive dims (declare them in the model's config)")
        shape = (1, *(int(d) for d in dims))
        kind = np.dtype(dtype).kind
        if kind == "f":
            out[name] = rng.standard_normal(shape).astype(dtype)
        elif kind in "iu":
            out[name] = rng.integers(0, 10, shape).astype(dtype)
        elif kind == "b":
            out[name] = rng.integers(0, 2, shape).astype(bool)
        else:
            raise BenchError(f"input {name!r} has dtype {dtype}; expected a number or bool")
    return out


def infer_request(model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] = ()):
    """A ``ModelInferRequest`` for ``model`` carrying ``inputs`` as raw contents."""
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.utils import np_to_triton_dtype

    return pb.ModelInferRequest(
        model_name=model,
        inputs=[pb.ModelInferRequest.InferInputTensor(
            name=name, datatype=np_to_triton_dtype(arr.dtype), shape=list(arr.shape))
            for name, arr in inputs.items()],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=o) for o in outputs],
        raw_input_contents=[np.ascontiguousarray(arr).tobytes() for arr in inputs.values()])


def _outcome(future: asyncio.Future) -> str:
    import grpc

    if future.cancelled():
        return UNANSWERED
    exc = future.exception()
    if exc is None:
        return OK
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    return type(exc).__name__


async def _open_loop(target: str, request, schedule: np.ndarray, spec: LoadSpec
                     ) -> tuple[list[RequestRecord], float, float]:
    """(records, client CPU share in cores, wall seconds) of one run."""
    import grpc

    loop = asyncio.get_running_loop()
    n = len(schedule)
    sent = np.full(n, np.nan)
    done = np.full(n, np.nan)
    outcomes: list[str | None] = [None] * n
    pending: set[asyncio.Future] = set()
    finished = loop.create_future()
    left = [n]
    async with grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout=10.0)
        except asyncio.TimeoutError:
            raise BenchError(f"no gRPC server answers on {target}") from None
        infer = _raw_model_infer(channel)
        payload = request.SerializeToString()

        def answered(i: int, future: asyncio.Future) -> None:
            done[i] = loop.time()
            outcomes[i] = _outcome(future)
            pending.discard(future)
            left[0] -= 1
            if left[0] == 0 and not finished.done():
                finished.set_result(None)

        def send(i: int) -> None:
            sent[i] = loop.time()
            future = asyncio.ensure_future(infer(payload))
            pending.add(future)
            future.add_done_callback(partial(answered, i))

        cpu0 = read_self()
        start = loop.time() + 0.02
        handles = [loop.call_at(start + offset, send, i) for i, offset in enumerate(schedule)]
        if n == 0:
            finished.set_result(None)
        end = start + spec.duration_s + spec.grace_s
        try:
            await asyncio.wait_for(asyncio.shield(finished), timeout=max(0.0, end - loop.time()))
        except asyncio.TimeoutError:
            for handle in handles:  # sends a client far behind its schedule never made
                handle.cancel()
            for future in list(pending):
                future.cancel()
            await asyncio.gather(*list(pending), return_exceptions=True)
            await asyncio.sleep(0)  # let the done callbacks of the cancelled calls run
        cpu1 = read_self()
    records = []
    for i in range(n):
        outcome = outcomes[i] or UNANSWERED
        latency = (done[i] - start - schedule[i]) * 1e3 if outcome == OK else None
        records.append(RequestRecord(float(schedule[i]), float(sent[i] - start), latency, outcome))
    return records, cpu1.share_since(cpu0), cpu1.wall_s - cpu0.wall_s


def run_open_loop(target: str, request, spec: LoadSpec) -> tuple[list[RequestRecord],
                                                                  PointSummary]:
    """Run one load point against the gRPC server at ``target`` (``127.0.0.1:PORT``) with the
    prebuilt ``request`` (see :func:`infer_request`); blocks for about ``duration_s`` +
    ``grace_s``.  Returns every request's record and their summary."""
    check_loopback(target)
    schedule = poisson_schedule(spec.rate_rps, spec.duration_s, spec.seed, spec.max_requests)
    records, cpu_share, wall_s = asyncio.run(_open_loop(target, request, schedule, spec))
    return records, summarize(records, spec, 100.0 * cpu_share, wall_s)


def summarize(records: Sequence[RequestRecord], spec: LoadSpec, client_cpu_pct: float = 0.0,
              wall_s: float = 0.0) -> PointSummary:
    """The :class:`PointSummary` of one run's records."""
    slo = spec.slo_ms
    ok = [r.latency_ms for r in records if r.outcome == OK]
    within = sum(1 for ms in ok if ms <= slo)
    counts = Counter(r.outcome for r in records)
    rejections = {k: v for k, v in sorted(counts.items()) if k not in (OK, UNANSWERED)}
    lags = [max(0.0, r.sent_s - r.scheduled_s) * 1e3 for r in records if r.sent_s == r.sent_s]
    sent = len(records)
    return PointSummary(
        offered_rps=spec.rate_rps, duration_s=spec.duration_s, sent=sent, answered=len(ok),
        within_slo_count=within, goodput_rps=within / spec.duration_s,
        within_slo=within / sent if sent else 0.0, rejections=rejections,
        unanswered=counts.get(UNANSWERED, 0),
        p50_ms=float(np.percentile(ok, 50)) if ok else None,
        p99_ms=float(np.percentile(ok, 99)) if ok else None,
        client_cpu_pct=client_cpu_pct,
        send_lag_p99_ms=float(np.percentile(lags, 99)) if lags else 0.0, wall_s=wall_s)


#: Error answers that say the request itself is wrong: no load point can succeed with it.
FATAL_CODES = ("NOT_FOUND", "INVALID_ARGUMENT", "UNIMPLEMENTED", "UNAUTHENTICATED",
               "PERMISSION_DENIED")


@dataclass(frozen=True, slots=True)
class SerialResult:
    """Requests sent one after the other: round trips of the answered ones (ms), error
    answers by code, and the first error's words."""

    latencies_ms: tuple[float, ...]
    errors: dict[str, int]
    first_error: str | None = None


async def _serial(target: str, request, count: int, timeout_s: float) -> SerialResult:
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    loop = asyncio.get_running_loop()
    latencies, errors, first = [], Counter(), None
    async with grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS) as channel:
        infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        for _ in range(count):
            t0 = loop.time()
            try:
                await infer(request, timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                message = (f"{target} answered model {request.model_name!r} with "
                           f"{exc.code().name}: {exc.details()}")
                if exc.code().name in FATAL_CODES:
                    raise BenchError(message) from None
                errors[exc.code().name] += 1
                first = first or message
                continue
            latencies.append((loop.time() - t0) * 1e3)
    return SerialResult(tuple(latencies), dict(errors), first)


def serial_requests(target: str, request, count: int = 20, timeout_s: float = 30.0
                    ) -> SerialResult:
    """Send ``count`` requests one after the other (a warm-up).  Raises
    :class:`BenchError` when the server says the request itself is wrong
    (:data:`FATAL_CODES`); other errors (a server dropping requests) are counted."""
    check_loopback(target)
    return asyncio.run(_serial(target, request, count, timeout_s))


async def _model_ready(target: str, model: str) -> bool:
    from tritonclient.grpc.aio import InferenceServerClient

    async with InferenceServerClient(target) as client:
        return bool(await client.is_model_ready(model))


def model_ready(target: str, model: str) -> bool:
    """Whether the server at ``target`` says ``model`` is ready (tritonclient's aio client)."""
    check_loopback(target)
    try:
        return asyncio.run(_model_ready(target, model))
    except Exception:  # noqa: BLE001 - any transport error means "not ready yet"
        return False


__all__ = ["LoadSpec", "RequestRecord", "PointSummary", "poisson_schedule", "random_inputs",
           "infer_request", "run_open_loop", "summarize", "serial_requests", "SerialResult",
           "model_ready", "check_loopback", "OK", "UNANSWERED", "FATAL_CODES"]
