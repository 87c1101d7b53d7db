"""``ppipe serve`` beside a real Triton Inference Server on the same ONNX model, the same
client and the same cores: goodput against offered load.

Per model (:func:`compare_model`):

1. build ppipe's engines (``ppipe engines build``, reused when up to date) and write the
   Triton twin of the model (:mod:`ppipe_trt.bench.triton_twin`: Python backend running ONNX
   Runtime, N instances of one thread each, dynamic batching);
2. start Triton, warm it up, and search its capacity: the largest offered rate with >= 99 %
   of requests answered within the SLO (:mod:`ppipe_trt.bench.capacity`, short points), unless
   given;
3. start ``ppipe serve --slots N`` (Triton stays up, idle), warm it up;
4. for each repeat and each load factor (a multiple of Triton's capacity) load each server in
   turn with the same Poisson schedule (same seed), the order alternating from point to
   point; only one server is loaded at a time, and each point ends when the loaded server is
   quiet again (its backlog worked off) before the next starts.

The idle server's CPU during each point is recorded (``peer_idle_cpu_pct``): it is what the
"one server at a time" assumption costs (``tritonserver`` idles at 0, ``ppipe serve`` at about
1 % of a core); a warning is issued when either goes above :data:`IDLE_WARN_PCT`.

The client shares the cores with the server (~0.7 ms of CPU per 600 KB ResNet request):
under overload a server that takes both cores starves it, it falls behind its schedule and
the point measures the client.  Both servers therefore run niced (``server_nice``, default 10:
nothing changes while a core is free) and every point records the client's send lag; points
where it exceeds :data:`CLIENT_LAG_MS` or a tenth of the SLO are flagged.

Server CPU is that of the server's whole process tree (:mod:`ppipe_trt.bench.procs`) from
the start of a point until it is quiet again, per successful answer; the client's is this
process's over the point (``client_cpu_pct``, % of one core).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

from ppipe_trt.bench.capacity import CapacityResult, search_capacity
from ppipe_trt.bench.errors import BenchError
from ppipe_trt.bench.openloop import (LoadSpec, PointSummary, infer_request, model_ready,
                                      random_inputs, run_open_loop, serial_requests)
from ppipe_trt.bench.ppipe_peer import PpipeServer, build_engines
from ppipe_trt.bench.procs import (idle_share, read_host, read_self, read_tree,
                                   wait_for_quiet_host, wait_until_quiet)
from ppipe_trt.bench.triton_peer import TritonServer, ensure_triton
from ppipe_trt.bench.triton_twin import write_twin_repository

TRITON, PPIPE = "triton", "ppipe"
CAPACITY_TARGET = 0.99  # the capacity: the largest rate with this fraction within the SLO
PROBE_TRIES = 3  # a failing capacity probe is measured again (see _search)
PROBE_RETRY_OTHER_PCT = 25.0  # other processes above this % of a core disturb a probe
DRAIN_TIMEOUT_S = 30.0  # after a point, wait at most this long for the server to be quiet
CLIENT_LAG_MS = 5.0  # a send lag p99 above this (or a tenth of the SLO) marks a point
IDLE_WARN_PCT = 2.0  # % of one core an idle server may use before the report warns
OTHER_WARN_PCT = 10.0  # % of one core other processes may take before the report warns
CPU_GPU_CLASS = "cpu"


class ServerUnderTest(Protocol):
    """What a load point needs from a server: its gRPC address and its process tree."""

    @property
    def grpc_url(self) -> str: ...

    @property
    def pid(self) -> int: ...


@dataclass(frozen=True, slots=True)
class CompareOptions:
    """One comparison run; see ``scripts/bench_vs_triton.py`` for the meaning of each."""

    repository: Path
    models: tuple[str, ...]
    work_dir: Path
    workers: int = 2
    load_factors: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
    seconds: float = 10.0
    repeats: int = 3
    capacity_rps: float | None = None
    search_seconds: float = 3.0
    search_probes: int = 8
    slo_ms: float | None = None
    ppipe_args: tuple[str, ...] = ()
    seed: int = 0
    warmup_requests: int = 50
    build_engines: bool = True
    triton_cache: Path | None = None
    quiet_host_pct: float = 25.0     # before a point, wait until the rest of the machine uses
    quiet_host_timeout_s: float = 60.0  # less than this (% of a core), at most this long
    server_nice: int = 10            # both servers run niced: the client keeps its schedule
    triton_queue_timeout: float | None = None  # x the SLO: Triton rejects what waited longer


@dataclass(frozen=True, slots=True)
class PointRecord:
    """One server at one load point in one repeat."""

    model: str
    server: str
    repeat: int
    load_factor: float
    summary: PointSummary
    server_cpu_s: float
    server_cpu_pct: float           # % of one core, from the point's start until quiet
    cpu_us_per_request: float | None  # server CPU per successful answer
    peer_idle_cpu_pct: float | None   # the other (idle) server meanwhile
    drain_s: float                    # waited after the point for the server to be quiet
    other_cpu_pct: float              # the rest of the machine meanwhile (% of one core)
    waited_quiet_s: float = 0.0       # waited before the point for the machine to be quiet


@dataclass(slots=True)
class ModelResult:
    """Everything measured for one model."""

    model: str
    slo_ms: float
    slo_source: str
    workers: int
    capacity_rps: float
    capacity: CapacityResult | None
    triton_version: str | None = None
    ppipe_capacity_line: str | None = None
    ppipe_banner_slo_ms: float | None = None
    startup_s: dict[str, float] = field(default_factory=dict)
    idle_cpu_pct: dict[str, float] = field(default_factory=dict)
    serial_ms: dict[str, float] = field(default_factory=dict)
    points: list[PointRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    server_nice: int = 0
    triton_queue_timeout_ms: float | None = None


def resolve_slo_ms(entry, override_ms: float | None, engines_dir: Path) -> tuple[float, str]:
    """(SLO in ms, where it came from): ``--slo-ms``, the config's ``slo_ms``, or what
    ``ppipe serve`` derives from the engine store's profile (5 x batch-1, at least 50 ms)."""
    if override_ms:
        return float(override_ms), "--slo-ms"
    if entry.slo_ms:
        return float(entry.slo_ms), f"slo_ms of {entry.config_path.name}"
    from ppipe_trt.profiles import load_profiles
    from ppipe_trt.serving.local import default_slo_ms

    profiles = load_profiles(engines_dir, [entry.name])
    return (default_slo_ms(profiles, entry.name, CPU_GPU_CLASS, min_slo_ms=50.0),
            "derived from the cpu profile as ppipe serve does (5 x batch-1, >= 50 ms)")


def measure_point(server: ServerUnderTest, name: str, model: str, request, spec: LoadSpec,
                  load_factor: float, repeat: int, peer_pid: int | None,
                  quiet_host_pct: float = 0.0, quiet_host_timeout_s: float = 60.0
                  ) -> PointRecord:
    """Load ``server`` with one point, wait until it is quiet, and account its CPU, the idle
    peer's (``peer_pid``) and the rest of the machine's.  With ``quiet_host_pct`` > 0, first
    wait (at most ``quiet_host_timeout_s``) until other processes use less than that."""
    waited = 0.0
    if quiet_host_pct > 0:
        roots = [server.pid] + ([peer_pid] if peer_pid else [])
        waited, _ = wait_for_quiet_host(roots, quiet_host_pct / 100.0, window_s=0.5,
                                        timeout_s=quiet_host_timeout_s)
    host_before, self_before = read_host(), read_self()
    before = read_tree(server.pid)
    peer_before = read_tree(peer_pid) if peer_pid else None
    _records, summary = run_open_loop(server.grpc_url, request, spec)
    drain_s = wait_until_quiet(server.pid, timeout_s=DRAIN_TIMEOUT_S)
    after = read_tree(server.pid)
    peer_share = read_tree(peer_pid).share_since(peer_before) if peer_before else 0.0
    self_share = read_self().share_since(self_before)
    host_share = read_host().share_since(host_before)
    server_share = after.share_since(before)
    cpu_s = after.cpu_s - before.cpu_s
    per_request = cpu_s * 1e6 / summary.answered if summary.answered else None
    other = max(0.0, host_share - server_share - peer_share - self_share)
    return PointRecord(model, name, repeat, load_factor, summary, cpu_s, 100.0 * server_share,
                       per_request, 100.0 * peer_share if peer_before else None, drain_s,
                       100.0 * other, waited)


def _ready(server, name: str, label: str, model: str, request, options, result,
           progress: Callable[[str], None], extra: str = "") -> None:
    """Warm ``server`` up, measure its idle CPU, and say how it came up."""
    _warm_up(server, name, model, request, options.warmup_requests, result, progress)
    result.idle_cpu_pct[name] = 100.0 * idle_share(server.pid, 1.0)
    progress(f"{model}: {label} up in {result.startup_s[name]:.1f} s, serial round trip "
             f"{_ms(result.serial_ms.get(name))}, idle CPU "
             f"{result.idle_cpu_pct[name]:.1f} % of a core{extra}")


def _warm_up(server: ServerUnderTest, name: str, model: str, request, count: int,
             result: "ModelResult", progress: Callable[[str], None],
             timeout_s: float = 120.0) -> None:
    """Wait for the model, send ``count`` requests one by one; their median round trip goes
    to ``result.serial_ms`` (absent when none was answered), error answers to its warnings."""
    deadline = time.monotonic() + timeout_s
    while not model_ready(server.grpc_url, model):
        if time.monotonic() > deadline:
            raise BenchError(f"{name}: model {model!r} not ready on {server.grpc_url} within "
                             f"{timeout_s:.0f} s")
        time.sleep(0.5)
    serial = serial_requests(server.grpc_url, request, count)
    if serial.latencies_ms:
        result.serial_ms[name] = statistics.median(serial.latencies_ms)
    if serial.errors:
        result.warnings.append(f"{name} answered {sum(serial.errors.values())} of {count} "
                               f"warm-up requests (sent one at a time) with an error: "
                               f"{serial.first_error}")
        progress(f"{model}: warning: {result.warnings[-1]}")


def compare_model(options: CompareOptions, model: str,
                  progress: Callable[[str], None] = print) -> ModelResult:
    """Run the whole comparison for ``model`` (see the module docstring)."""
    from ppipe_trt.repository import load_model_entry

    work = options.work_dir / model
    work.mkdir(parents=True, exist_ok=True)
    if options.build_engines:
        progress(f"{model}: ppipe engines build (reused when up to date)")
        build_engines(options.repository, [model])
    install = ensure_triton(options.triton_cache)
    entry = load_model_entry(options.repository / model)
    slo_ms, slo_source = resolve_slo_ms(entry, options.slo_ms, _engines_dir())
    timeout_us = (round(options.triton_queue_timeout * slo_ms * 1000)
                  if options.triton_queue_timeout else None)
    write_twin_repository(options.repository, work / "twin", [model], options.workers,
                          queue_timeout_us={model: timeout_us} if timeout_us else None)
    request = infer_request(model, random_inputs(
        [(t.name, t.dtype, t.dims) for t in entry.inputs], options.seed),
        [t.name for t in entry.outputs])
    with TritonServer(install, work / "twin", work, nice=options.server_nice) as triton:
        result = ModelResult(model, slo_ms, slo_source, options.workers, 0.0, None,
                             triton_version=triton.server_version(),
                             server_nice=options.server_nice,
                             triton_queue_timeout_ms=timeout_us / 1000 if timeout_us else None)
        result.startup_s[TRITON] = triton.startup_s or 0.0
        _ready(triton, TRITON, f"tritonserver {result.triton_version}", model, request,
               options, result, progress, f"; SLO {slo_ms:g} ms")
        if options.capacity_rps:
            result.capacity_rps = float(options.capacity_rps)
        else:
            if TRITON not in result.serial_ms:
                raise BenchError(f"tritonserver answered none of the warm-up requests: "
                                 f"{result.warnings[-1]}")
            result.capacity = _search(triton, model, request, slo_ms, options,
                                      result.serial_ms[TRITON], progress)
            result.capacity_rps = result.capacity.capacity_rps
        progress(f"{model}: Triton 99 % capacity {result.capacity_rps:.1f} req/s")
        ppipe_args = ["--slo-ms", f"{slo_ms:g}", *options.ppipe_args]
        with PpipeServer(options.repository, [model], options.workers, work,
                         ppipe_args, nice=options.server_nice) as ppipe:
            result.startup_s[PPIPE] = ppipe.startup_s or 0.0
            result.ppipe_capacity_line = ppipe.capacity_line()
            result.ppipe_banner_slo_ms = ppipe.slo_ms(model)
            _ready(ppipe, PPIPE, f"ppipe serve ({result.ppipe_capacity_line})", model, request,
                   options, result, progress)
            if (result.ppipe_banner_slo_ms is not None
                    and abs(result.ppipe_banner_slo_ms - slo_ms) > 1e-6):
                result.warnings.append(f"ppipe serve states SLO {result.ppipe_banner_slo_ms} "
                                       f"ms for {model}, the benchmark judges {slo_ms} ms")
            servers = {TRITON: triton, PPIPE: ppipe}
            _sweep(servers, model, request, slo_ms, result, options, progress)
    behind = [p for p in result.points if client_fell_behind(p.summary, slo_ms)]
    if behind:
        result.warnings.append(
            f"the client sent late in {len(behind)} of {len(result.points)} points (send lag "
            f"p99 up to {max(p.summary.send_lag_p99_ms for p in behind):.0f} ms; rows marked "
            "!): the offered load reached the server that much later than scheduled, and the "
            "latency counted from the schedule includes the lag")
    stuck = [p for p in result.points if p.drain_s >= DRAIN_TIMEOUT_S - 0.5]
    if stuck:
        result.warnings.append(
            f"{len(stuck)} points left their server busy for more than {DRAIN_TIMEOUT_S:g} s "
            "after the load stopped: the next point started on a busy server")
    busy = [p for p in result.points if p.other_cpu_pct > OTHER_WARN_PCT]
    if busy:
        worst = max(p.other_cpu_pct for p in busy)
        result.warnings.append(
            f"other processes took more than {OTHER_WARN_PCT:g} % of a core during "
            f"{len(busy)} of {len(result.points)} points (up to {worst:.0f} %): the machine "
            "was shared, those figures are low")
    for name, pct in result.idle_cpu_pct.items():
        if pct > IDLE_WARN_PCT:
            result.warnings.append(f"{name} used {pct:.1f} % of a core idle (1 s with no "
                                   "requests), as it does beside the other server's points")
    return result


def _engines_dir() -> Path:
    from ppipe_trt.bench.ppipe_peer import CHECKOUT

    return CHECKOUT / "engines"


def _search(triton: TritonServer, model: str, request, slo_ms: float, options: CompareOptions,
            serial_ms: float, progress: Callable[[str], None]) -> CapacityResult:
    # the start: half of what the instances would do one request at a time
    start = max(1.0, 0.5 * options.workers * 1000.0 / max(serial_ms, 0.1))
    count = [0]

    def within_slo_at(rate: float) -> float:
        count[0] += 1
        spec = LoadSpec(rate, options.search_seconds, slo_ms, seed=options.seed + 90_000
                        + count[0])
        # one disturbed probe would misplace the capacity, and every load point with it;
        # disturbances only lower the fraction, so a failing probe is measured again and the
        # best try counts: up to PROBE_TRIES tries, two undisturbed failures settle it
        best, clean_failures = 0.0, 0
        for _ in range(PROBE_TRIES):
            point = measure_point(triton, TRITON, model, request, spec, 0.0, -1, None,
                                  options.quiet_host_pct, options.quiet_host_timeout_s)
            best = max(best, point.summary.within_slo)
            disturbed = point.other_cpu_pct > PROBE_RETRY_OTHER_PCT
            clean_failures += not disturbed
            progress(f"{model}: capacity probe {count[0]}: {rate:.1f} req/s -> "
                     f"{100 * point.summary.within_slo:.2f} % within SLO "
                     f"(p99 {_ms(point.summary.p99_ms)}; other processes "
                     f"{point.other_cpu_pct:.0f} % of a core{_waited(point)})")
            if best >= CAPACITY_TARGET or clean_failures == 2:
                break
        return best

    return search_capacity(within_slo_at, start, target=CAPACITY_TARGET,
                           max_probes=options.search_probes)


def _sweep(servers: dict, model: str, request, slo_ms: float, result: ModelResult,
           options: CompareOptions, progress: Callable[[str], None]) -> None:
    names = list(servers)
    index = 0
    for repeat in range(options.repeats):
        for li, factor in enumerate(options.load_factors):
            rate = factor * result.capacity_rps
            spec = LoadSpec(rate, options.seconds, slo_ms, seed=options.seed + 1000 * repeat + li)
            order = names if index % 2 == 0 else names[::-1]
            index += 1
            for name in order:
                peer = next(s for n, s in servers.items() if n != name)
                point = measure_point(servers[name], name, model, request, spec, factor,
                                      repeat, peer.pid, options.quiet_host_pct,
                                      options.quiet_host_timeout_s)
                result.points.append(point)
                s = point.summary
                progress(f"{model} r{repeat} x{factor:g} {rate:7.1f} req/s {name:6s}: goodput "
                         f"{s.goodput_rps:7.1f}, within SLO {100 * s.within_slo:6.2f} %, "
                         f"rejected {sum(s.rejections.values())}, unanswered {s.unanswered}, "
                         f"p99 {_ms(s.p99_ms)}, CPU {_num(point.cpu_us_per_request)} us/req, "
                         f"other processes {point.other_cpu_pct:.0f} %{_waited(point)}")


def client_fell_behind(summary: PointSummary, slo_ms: float) -> bool:
    """Whether the client sent late enough to distort the point (see :data:`CLIENT_LAG_MS`)."""
    return summary.send_lag_p99_ms > max(CLIENT_LAG_MS, 0.1 * slo_ms)


def _waited(point: PointRecord) -> str:
    return f", waited {point.waited_quiet_s:.0f} s for a quiet machine" if (
        point.waited_quiet_s >= 1.5) else ""


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def aggregate(result: ModelResult) -> list[dict]:
    """One record per (server, load factor): medians over the repeats of every figure, the
    per-repeat samples beside them.  Keys: model, server, load_factor, offered_rps,
    goodput_rps, within_slo, p50_ms, p99_ms, cpu_us_per_request, plus extras."""
    groups: dict[tuple[str, float], list[PointRecord]] = {}
    for point in result.points:
        groups.setdefault((point.server, point.load_factor), []).append(point)
    records = []
    for (server, factor), points in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        sums = [p.summary for p in points]
        codes = sorted({c for s in sums for c in s.rejections})
        records.append({
            "model": result.model, "server": server, "load_factor": factor,
            "offered_rps": sums[0].offered_rps, "slo_ms": result.slo_ms,
            "goodput_rps": _median([s.goodput_rps for s in sums]),
            "within_slo": _median([s.within_slo for s in sums]),
            "p50_ms": _median([s.p50_ms for s in sums]),
            "p99_ms": _median([s.p99_ms for s in sums]),
            "cpu_us_per_request": _median([p.cpu_us_per_request for p in points]),
            "server_cpu_pct": _median([p.server_cpu_pct for p in points]),
            "client_cpu_pct": _median([s.client_cpu_pct for s in sums]),
            "rejected": _median([sum(s.rejections.values()) for s in sums]),
            "rejections": {c: _median([s.rejections.get(c, 0) for s in sums]) for c in codes},
            "unanswered": _median([s.unanswered for s in sums]),
            "sent": _median([s.sent for s in sums]),
            "send_lag_p99_ms": _median([s.send_lag_p99_ms for s in sums]),
            "client_fell_behind": any(client_fell_behind(s, result.slo_ms) for s in sums),
            "peer_idle_cpu_pct": _median([p.peer_idle_cpu_pct for p in points]),
            "drain_s": _median([p.drain_s for p in points]),
            "other_cpu_pct": _median([p.other_cpu_pct for p in points]),
            "waited_quiet_s": _median([p.waited_quiet_s for p in points]),
            "triton_capacity_rps": result.capacity_rps, "workers": result.workers,
            "seconds": sums[0].duration_s, "repeats": len(points),
            "samples": [{**asdict(p.summary), "repeat": p.repeat,
                         "server_cpu_s": p.server_cpu_s,
                         "cpu_us_per_request": p.cpu_us_per_request,
                         "peer_idle_cpu_pct": p.peer_idle_cpu_pct, "drain_s": p.drain_s,
                         "other_cpu_pct": p.other_cpu_pct, "waited_quiet_s": p.waited_quiet_s}
                        for p in points],
        })
    return records


def compare(options: CompareOptions, progress: Callable[[str], None] = print
            ) -> list[ModelResult]:
    """:func:`compare_model` for every model of ``options``, one after the other."""
    if options.workers < 1 or options.repeats < 1 or not options.load_factors:
        raise BenchError(f"workers {options.workers}, repeats {options.repeats}, loads "
                         f"{list(options.load_factors)}; expected >= 1, >= 1, and some loads")
    return [compare_model(options, model, progress) for model in options.models]


__all__ = ["CompareOptions", "PointRecord", "ModelResult", "compare", "compare_model",
           "measure_point", "aggregate", "resolve_slo_ms", "ServerUnderTest", "TRITON", "PPIPE"]
