"""Request arrival processes for the simulator.

An :class:`ArrivalSpec` names a process: ``poisson`` (exponential inter-arrivals),
``gamma:CV`` (gamma-distributed inter-arrivals with coefficient of variation ``CV``: 1 is
Poisson, above 1 is burstier; shape ``k = 1/CV^2``, scale ``mean/k``), ``mmpp:ON_MS:OFF_MS``
(an on/off Markov-modulated Poisson process: exponential ON and OFF periods of the given
means, Poisson arrivals at ``rate x (ON + OFF) / ON`` while on and none while off; plain
``mmpp`` is ``mmpp:10:10``), or ``trace:FILE`` (a
text file of arrival timestamps in seconds, one per line, ``#`` comments allowed).  A trace
is replayed with its timestamps scaled so that its mean rate equals the requested rate, and
looped when shorter than the window; each model starts at a different offset into it.

Named bursty processes (:data:`NAMED_ARRIVALS`) stand in for the paper's Azure Functions
2021 trace, which is not available here: ``gamma-cv2``, ``gamma-cv4``, ``mmpp``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ppipe_trt.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ArrivalSpec:
    kind: str                 # "poisson" | "gamma" | "trace" | "mmpp"
    cv: float = 1.0           # gamma only
    trace_path: str = ""      # trace only
    on_ms: float = 10.0       # mmpp only: mean ON period
    off_ms: float = 10.0      # mmpp only: mean OFF period

    @classmethod
    def parse(cls, text: str) -> "ArrivalSpec":
        """Parse ``poisson``, ``gamma:CV``, ``mmpp[:ON_MS:OFF_MS]``, ``trace:FILE`` or a
        name of :data:`NAMED_ARRIVALS`."""
        text = NAMED_ARRIVALS.get(text, text)
        kind, _, arg = text.partition(":")
        if kind == "mmpp":
            try:
                on_ms, off_ms = (float(x) for x in arg.split(":")) if arg else (10.0, 10.0)
            except ValueError:
                raise ConfigError(f"arrivals {text!r}: expected mmpp:ON_MS:OFF_MS with two "
                                  "numbers > 0") from None
            if not (on_ms > 0 and off_ms > 0):
                raise ConfigError(f"arrivals {text!r}: ON and OFF means must be > 0 ms")
            return cls("mmpp", on_ms=on_ms, off_ms=off_ms)
        if kind == "poisson" and not arg:
            return cls("poisson")
        if kind == "gamma":
            try:
                cv = float(arg)
            except ValueError:
                raise ConfigError(f"arrivals {text!r}: expected gamma:CV with a number CV > 0"
                                  ) from None
            if not cv > 0:
                raise ConfigError(f"arrivals {text!r}: CV must be > 0, got {cv}")
            return cls("gamma", cv=cv)
        if kind == "trace" and arg:
            if not Path(arg).is_file():
                raise ConfigError(f"arrivals {text!r}: no such trace file {arg}")
            return cls("trace", trace_path=arg)
        raise ConfigError(f"arrivals {text!r}: expected poisson, gamma:CV, mmpp:ON_MS:OFF_MS, "
                          f"trace:FILE or one of {', '.join(NAMED_ARRIVALS)}")

    def __str__(self) -> str:
        if self.kind == "gamma":
            return f"gamma:{self.cv:g}"
        if self.kind == "trace":
            return f"trace:{self.trace_path}"
        if self.kind == "mmpp":
            return f"mmpp:{self.on_ms:g}:{self.off_ms:g}"
        return "poisson"


#: Bursty stand-ins for the paper's Azure Functions 2021 trace (name -> spec).
NAMED_ARRIVALS = {"gamma-cv2": "gamma:2", "gamma-cv4": "gamma:4", "mmpp": "mmpp:10:10"}


def load_trace(path: str | Path) -> np.ndarray:
    """Sorted arrival timestamps (seconds) from a text file; at least two are needed."""
    values = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            values.append(float(line.split(",")[0]))
        except ValueError:
            raise ConfigError(f"{path}:{lineno}: expected a timestamp in seconds, got "
                              f"{line!r}") from None
    ts = np.sort(np.asarray(values, dtype=float))
    if len(ts) < 2 or ts[-1] <= ts[0]:
        raise ConfigError(f"{path}: a trace needs at least two distinct timestamps")
    return ts


def arrival_times_us(spec: ArrivalSpec, rate_rps: float, start_us: float, end_us: float,
                     rng: np.random.Generator, stream: int = 0) -> list[float]:
    """Arrival times (us, ascending) in ``[start_us, end_us)`` at mean rate ``rate_rps``."""
    if rate_rps <= 0 or end_us <= start_us:
        return []
    mean_gap = 1e6 / rate_rps
    n_guess = int((end_us - start_us) / mean_gap * 1.2) + 64
    if spec.kind == "trace":
        ts = load_trace(spec.trace_path)
        gaps = np.diff(ts)
        gaps = gaps * (mean_gap / (gaps.mean() * 1e6)) * 1e6  # scaled, in us
        offset = (stream * 7919) % len(gaps)
        reps = n_guess // len(gaps) + 2
        gaps = np.tile(np.roll(gaps, -offset), reps)
        times = start_us + np.cumsum(gaps)
        return times[times < end_us].tolist()
    if spec.kind == "mmpp":
        return _mmpp_times_us(spec, rate_rps, start_us, end_us, rng)
    out = []
    t = start_us
    while t < end_us:
        if spec.kind == "poisson":
            gaps = rng.exponential(mean_gap, n_guess)
        else:
            k = 1.0 / (spec.cv * spec.cv)
            gaps = rng.gamma(k, mean_gap / k, n_guess)
        times = t + np.cumsum(gaps)
        t = float(times[-1])
        out.extend(times[times < end_us].tolist())
    return out


def _mmpp_times_us(spec: ArrivalSpec, rate_rps: float, start_us: float, end_us: float,
                   rng: np.random.Generator) -> list[float]:
    """On/off MMPP arrivals; the first period is ON with the stationary probability."""
    on_us, off_us = spec.on_ms * 1e3, spec.off_ms * 1e3
    on_rate_per_us = rate_rps * 1e-6 * (on_us + off_us) / on_us
    out: list[float] = []
    t = start_us
    on = rng.random() < on_us / (on_us + off_us)
    while t < end_us:
        if not on:
            t += rng.exponential(off_us)
            on = True
            continue
        period_end = min(t + rng.exponential(on_us), end_us)
        n = rng.poisson(on_rate_per_us * (period_end - t))
        if n:
            out.extend(np.sort(rng.uniform(t, period_end, n)).tolist())
        t = period_end
        on = False
    return out
