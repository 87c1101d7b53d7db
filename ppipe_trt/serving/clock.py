"""The serving clock, and what a hand-off between two threads costs on it.

Only the runtime side reads the time (the runtime, its workers, the transports); the
schedulers are told it.  Times are microseconds of :func:`time.monotonic_ns`.
"""

from __future__ import annotations

import threading
import time


def monotonic_us() -> float:
    """The serving clock: monotonic time in microseconds (only the runtime side reads it)."""
    return time.monotonic_ns() / 1000.0


def measure_hop_overhead_us(samples: int = 300, quantile: float = 0.9) -> float:
    """Time a hand-off between two threads the way a stage hand-off happens (condition
    variable wake-up + queue), and return the ``quantile`` in microseconds."""
    cv = threading.Condition()
    box: list[float] = []
    done = threading.Event()
    delays: list[float] = []

    def receiver() -> None:
        for _ in range(samples):
            with cv:
                while not box:
                    cv.wait()
                sent = box.pop()
            delays.append(time.monotonic_ns() / 1000.0 - sent)
            done.set()

    t = threading.Thread(target=receiver, daemon=True)
    t.start()
    for _ in range(samples):
        done.clear()
        with cv:
            box.append(time.monotonic_ns() / 1000.0)
            cv.notify()
        done.wait(1.0)
    t.join(1.0)
    delays.sort()
    return float(delays[min(len(delays) - 1, int(quantile * len(delays)))]) if delays else 0.0
