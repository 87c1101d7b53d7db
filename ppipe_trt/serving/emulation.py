"""Emulated GPU classes: hold a batch for the profiled latency of another GPU.

A worker that emulates, say, a T4 at MPS share 2 runs its real sub-graph (or nothing, in
timing-only mode) and releases the batch only when the profiled latency of that class,
block range, batch size and MPS share has elapsed since it started.  If real compute takes
longer than the profile the worker cannot keep the emulated pace: it releases the batch
when compute ends and counts an *overrun*.  Figures measured this way are "emulated".
"""

from __future__ import annotations

from dataclasses import dataclass

from ppipe_trt.errors import ConfigError, ProfileFormatError
from ppipe_trt.profiles.types import ModelProfile


@dataclass(frozen=True, slots=True)
class EmulatedTiming:
    """Profiled latency of blocks ``first_block..last_block`` on one emulated worker.

    ``latency_us[k]`` is the latency at batch ``k + 1`` (microseconds).
    """

    model: str
    gpu_class: str
    mps_share: int
    first_block: int
    last_block: int
    latency_us: tuple[float, ...]

    @classmethod
    def from_profile(cls, profile: ModelProfile, gpu_class: str, mps_share: int,
                     first_block: int, last_block: int) -> "EmulatedTiming":
        try:
            table = profile.table(gpu_class, mps_share)
        except ProfileFormatError as exc:
            raise ConfigError(f"cannot emulate {gpu_class}: {exc}") from None
        return cls(profile.model, gpu_class, mps_share, first_block, last_block,
                   tuple(table.range_latency_us(first_block, last_block, b)
                         for b in range(1, table.max_batch + 1)))

    @property
    def max_batch(self) -> int:
        return len(self.latency_us)

    def hold_us(self, batch_size: int) -> float:
        """How long a batch of ``batch_size`` occupies the emulated worker (microseconds)."""
        if not 1 <= batch_size <= self.max_batch:
            raise ConfigError(
                f"batch {batch_size} outside 1..{self.max_batch} profiled for {self.model} "
                f"blocks {self.first_block}..{self.last_block} on {self.gpu_class} "
                f"(MPS share {self.mps_share})")
        return self.latency_us[batch_size - 1]

    @property
    def label(self) -> str:
        share = f"/MPS{self.mps_share}" if self.mps_share > 1 else ""
        return f"emulated {self.gpu_class}{share}"


@dataclass(frozen=True, slots=True)
class Overrun:
    """Real compute exceeded the emulated latency once (all times in microseconds)."""

    worker_id: int
    batch_id: int
    batch_size: int
    emulated_us: float
    actual_us: float
