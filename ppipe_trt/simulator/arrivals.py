"""Request arrival processes for the simulator.

An :class:`ArrivalSpec` names a process: ``poisson`` (exponential inter-arrivals),
``gamma:CV`` (gamma-distributed inter-arrivals with coefficient of variation ``CV``: 1 is
Poisson, above 1 is burstier; shape ``k = 1/CV^2``, scale ``mean/k``), or ``trace:FILE`` (a
text file of arrival timestamps in seconds, one per line, ``#`` comments allowed).  A trace
is replayed with its timestamps scaled so that its mean rate equals the requested rate, and
looped when shorter than the window; each model starts at a different offset into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ppipe_trt.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ArrivalSpec:
    kind: str                 # "poisson" | "gamma" | "trace"
    cv: float = 1.0           # gamma only
    trace_path: str = ""      # trace only

    @classmethod
    def parse(cls, text: str) -> "ArrivalSpec":
        """Parse ``poisson``, ``gamma:CV`` or ``trace:FILE``."""
        kind, _, arg = text.partition(":")
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
        raise ConfigError(f"arrivals {text!r}: expected poisson, gamma:CV or trace:FILE")

    def __str__(self) -> str:
        if self.kind == "gamma":
            return f"gamma:{self.cv:g}"
        if self.kind == "trace":
            return f"trace:{self.trace_path}"
        return "poisson"


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
