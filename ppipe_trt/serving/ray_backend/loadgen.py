"""A small open-loop Poisson HTTP load generator (shared by the Ray tests and
``scripts/bench_vs_rayserve.py``; it needs no Ray).

Requests are sent at their arrival times whatever the server's answers (open loop), from one
asyncio loop with ``httpx.AsyncClient``; every request's outcome is kept: HTTP status, the
``reason`` of a rejection, client-side latency.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True, slots=True)
class HttpRequest:
    path: str
    content: bytes
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request: sent ``sent_s`` after the run's start; ``status`` 0 when no HTTP answer
    came (connection error, client timeout); ``reason`` of a rejection body if any."""

    index: int
    sent_s: float
    latency_s: float
    status: int
    reason: str | None = None
    error: str | None = None

    @property
    def answered(self) -> bool:
        return self.status != 0


def poisson_arrivals(rate_rps: float, duration_s: float, seed: int = 0) -> np.ndarray:
    """Arrival times (seconds from 0) of a Poisson process of ``rate_rps`` over
    ``duration_s``."""
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1.0 / rate_rps, int(rate_rps * duration_s * 1.3) + 20))
    return times[times < duration_s]


def kserve_binary_request(model: str, input_name: str, x: np.ndarray) -> HttpRequest:
    """A KServe v2 infer request with the binary tensor extension (one FP32 input)."""
    header = json.dumps({"inputs": [{"name": input_name, "shape": list(x.shape),
                                     "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return HttpRequest(f"/v2/models/{model}/infer", header + x.astype(np.float32).tobytes(),
                       {"Inference-Header-Content-Length": str(len(header)),
                        "Content-Type": "application/octet-stream"})


async def _open_loop(base_url: str, arrivals_s, request_for: Callable[[int], HttpRequest],
                     timeout_s: float, on_tick: Callable[[float], None] | None) -> list[Outcome]:
    import httpx

    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        start = time.perf_counter()

        async def one(i: int, at: float) -> Outcome:
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            req = request_for(i)
            sent = time.perf_counter()
            try:
                r = await client.post(req.path, content=req.content, headers=req.headers)
            except Exception as exc:  # no answer: counted as unanswered, never hidden
                return Outcome(i, sent - start, time.perf_counter() - sent, 0,
                               error=f"{type(exc).__name__}: {exc}")
            latency = time.perf_counter() - sent
            reason = None
            if r.status_code != 200:
                try:
                    reason = r.json().get("reason") or r.json().get("error")
                except Exception:
                    reason = r.text[:200]
            return Outcome(i, sent - start, latency, r.status_code, reason)

        async def ticker() -> None:
            while True:
                await asyncio.sleep(0.01)
                on_tick(time.perf_counter() - start)

        tick = asyncio.ensure_future(ticker()) if on_tick else None
        try:
            return list(await asyncio.gather(*(one(i, float(t))
                                               for i, t in enumerate(arrivals_s))))
        finally:
            if tick is not None:
                tick.cancel()


def run_open_loop(base_url: str, arrivals_s, request_for: Callable[[int], HttpRequest],
                  timeout_s: float = 30.0,
                  on_tick: Callable[[float], None] | None = None) -> list[Outcome]:
    """Send ``request_for(i)`` at ``arrivals_s[i]`` (seconds after start) to ``base_url``
    (e.g. ``http://127.0.0.1:8000``); returns one outcome per request, in order.
    ``on_tick(elapsed_s)`` is called about every 10 ms from the generator's loop (e.g. to
    inject a fault at a given moment)."""
    return asyncio.run(_open_loop(base_url, arrivals_s, request_for, timeout_s, on_tick))


@dataclass(frozen=True, slots=True)
class LoadSummary:
    """Over the measured window: offered rate, goodput (answers 200 within ``slo_s`` per
    second), attainment (fraction of requests so answered), client latency percentiles of
    the 200 answers (milliseconds)."""

    offered_rps: float
    goodput_rps: float
    attainment: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    errors: int


def summarize(outcomes: list[Outcome], slo_s: float, warmup_s: float,
              duration_s: float) -> LoadSummary:
    window = [o for o in outcomes if o.sent_s >= warmup_s]
    span = max(1e-9, duration_s - warmup_s)
    good = [o for o in window if o.status == 200 and o.latency_s <= slo_s]
    lat = sorted(o.latency_s * 1000.0 for o in window if o.status == 200)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

    return LoadSummary(len(window) / span, len(good) / span, len(good) / max(1, len(window)),
                       statistics.median(lat) if lat else float("nan"), pct(0.9), pct(0.99),
                       len(window), sum(1 for o in window if o.status != 200))
