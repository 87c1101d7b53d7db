"""Profile data types: what the planner, the scheduler and the simulator know about a model.

All latencies are in microseconds, all sizes in bytes *per sample* (the batch dimension is
excluded).  Blocks are numbered ``0 .. num_blocks-1`` in model (topological) order; a *block
range* ``(first, last)`` is inclusive on both ends.  An MPS share ``m`` means the GPU is shared
by ``m`` processes running at once, so a table with ``mps_share=m`` holds the latency a worker
sees when it owns ``1/m`` of the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from ppipe_trt.errors import ProfileFormatError


@dataclass(frozen=True, slots=True)
class BlockLatencyTable:
    """Latency of each block of one model on one GPU class at one MPS share.

    ``latency_us[b][k]`` is the latency of block ``b`` at batch size ``k + 1``.  Every row has
    the same length (``max_batch``); tables at higher MPS shares are often profiled only up to
    a smaller batch size.
    """

    model: str
    gpu_class: str
    mps_share: int
    latency_us: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        where = f"{self.model} on {self.gpu_class} (MPS share {self.mps_share})"
        if self.mps_share < 1:
            raise ProfileFormatError(f"{where}: MPS share must be >= 1, got {self.mps_share}")
        if not self.latency_us:
            raise ProfileFormatError(f"{where}: latency table has no blocks")
        widths = {len(row) for row in self.latency_us}
        if len(widths) != 1 or 0 in widths:
            raise ProfileFormatError(
                f"{where}: ragged latency table, rows have {sorted(widths)} batch sizes; "
                "expected every block profiled at the same batch sizes 1..N"
            )
        for b, row in enumerate(self.latency_us):
            for k, value in enumerate(row):
                if not value > 0:  # also rejects NaN
                    raise ProfileFormatError(
                        f"{where}: block {b} batch {k + 1} latency {value!r} us; expected > 0"
                    )
            for k in range(1, len(row)):
                if row[k] < row[k - 1]:
                    raise ProfileFormatError(
                        f"{where}: block {b} latency decreases from batch {k} ({row[k - 1]} us) "
                        f"to batch {k + 1} ({row[k]} us); expected non-decreasing in batch size"
                    )

    @property
    def num_blocks(self) -> int:
        return len(self.latency_us)

    @property
    def max_batch(self) -> int:
        return len(self.latency_us[0])

    def range_latency_us(self, first: int, last: int, batch: int) -> float:
        """Latency of blocks ``first..last`` (inclusive) run back to back at ``batch``."""
        if not 0 <= first <= last < self.num_blocks:
            raise ProfileFormatError(
                f"block range {first}..{last} outside 0..{self.num_blocks - 1} for {self.model}"
            )
        if not 1 <= batch <= self.max_batch:
            raise ProfileFormatError(
                f"batch {batch} outside 1..{self.max_batch} profiled for {self.model} on "
                f"{self.gpu_class} (MPS share {self.mps_share})"
            )
        return sum(self.latency_us[b][batch - 1] for b in range(first, last + 1))


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """Everything profiled about one model, over all GPU classes and MPS shares.

    ``cut_bytes_per_sample[i]`` is the size of the activations crossing the cut between block
    ``i`` and block ``i + 1`` (so it has ``num_blocks - 1`` entries).  ``input_bytes_per_sample``
    and ``output_bytes_per_sample`` are the model's own inputs and outputs (0 when unknown).
    ``full_model_latency_us`` maps a GPU class to the whole model's batch-1 latency (used for
    the SLO: the paper's SLO is 5 x the L4 value).
    """

    model: str
    num_blocks: int
    cut_bytes_per_sample: tuple[int, ...]
    tables: Mapping[tuple[str, int], BlockLatencyTable]
    full_model_latency_us: Mapping[str, float] = field(default_factory=dict)
    input_bytes_per_sample: int = 0
    output_bytes_per_sample: int = 0

    def __post_init__(self) -> None:
        if self.num_blocks < 1:
            raise ProfileFormatError(f"{self.model}: num_blocks must be >= 1, got {self.num_blocks}")
        if len(self.cut_bytes_per_sample) != self.num_blocks - 1:
            raise ProfileFormatError(
                f"{self.model}: {len(self.cut_bytes_per_sample)} cut sizes for {self.num_blocks} "
                f"blocks; expected {self.num_blocks - 1} (one per cut between blocks)"
            )
        for i, nbytes in enumerate(self.cut_bytes_per_sample):
            if nbytes < 0:
                raise ProfileFormatError(f"{self.model}: cut {i} has negative size {nbytes} bytes")
        if not self.tables:
            raise ProfileFormatError(f"{self.model}: no latency tables")
        for (gpu, mps), table in self.tables.items():
            if table.num_blocks != self.num_blocks:
                raise ProfileFormatError(
                    f"{self.model}: table for {gpu} MPS {mps} has {table.num_blocks} blocks; "
                    f"expected {self.num_blocks}"
                )
            if (table.gpu_class, table.mps_share) != (gpu, mps):
                raise ProfileFormatError(f"{self.model}: table keyed ({gpu}, {mps}) is for "
                                         f"({table.gpu_class}, {table.mps_share})")

    @property
    def gpu_classes(self) -> tuple[str, ...]:
        return tuple(sorted({gpu for gpu, _ in self.tables}))

    def mps_shares(self, gpu_class: str) -> tuple[int, ...]:
        """MPS shares profiled on ``gpu_class``, ascending (1 = the whole GPU)."""
        return tuple(sorted(m for gpu, m in self.tables if gpu == gpu_class))

    def table(self, gpu_class: str, mps_share: int = 1) -> BlockLatencyTable:
        try:
            return self.tables[(gpu_class, mps_share)]
        except KeyError:
            have = ", ".join(f"{g}/MPS{m}" for g, m in sorted(self.tables)) or "none"
            raise ProfileFormatError(
                f"no profile of {self.model} on {gpu_class} at MPS share {mps_share}; have {have}"
            ) from None

    def max_batch(self, gpu_class: str, mps_share: int = 1) -> int:
        return self.table(gpu_class, mps_share).max_batch

    def range_latency_us(self, gpu_class: str, mps_share: int, first: int, last: int,
                         batch: int) -> float:
        """Latency of blocks ``first..last`` on one worker of ``gpu_class`` at ``mps_share``."""
        return self.table(gpu_class, mps_share).range_latency_us(first, last, batch)

    def batch1_latency_us(self, gpu_class: str) -> float:
        """Whole-model batch-1 latency: the measured full-model figure, else the block sum."""
        if gpu_class in self.full_model_latency_us:
            return self.full_model_latency_us[gpu_class]
        return self.range_latency_us(gpu_class, 1, 0, self.num_blocks - 1, 1)

    def bytes_into_block(self, block: int) -> int:
        """Bytes per sample that enter ``block`` (the model input for block 0)."""
        return self.input_bytes_per_sample if block == 0 else self.cut_bytes_per_sample[block - 1]

    def bytes_out_of_block(self, block: int) -> int:
        """Bytes per sample that leave ``block`` (the model output for the last block)."""
        if block == self.num_blocks - 1:
            return self.output_bytes_per_sample
        return self.cut_bytes_per_sample[block]


@dataclass(frozen=True, slots=True)
class ProfileSet:
    """Profiles of several models, keyed by model name."""

    models: Mapping[str, ModelProfile]
    source: str = ""

    def __getitem__(self, model: str) -> ModelProfile:
        try:
            return self.models[model]
        except KeyError:
            raise ProfileFormatError(
                f"no profile for model {model!r} in {self.source or 'the profile set'}; "
                f"have {len(self.models)} models: {', '.join(sorted(self.models)[:8])}"
                + (", ..." if len(self.models) > 8 else "")
            ) from None

    def __contains__(self, model: str) -> bool:
        return model in self.models

    def __iter__(self):
        return iter(sorted(self.models))

    def __len__(self) -> int:
        return len(self.models)

    def subset(self, names: Iterable[str]) -> "ProfileSet":
        return ProfileSet({n: self[n] for n in names}, self.source)

    def merged(self, other: "ProfileSet") -> "ProfileSet":
        """A set with the models of both; ``other`` wins on a name clash."""
        return ProfileSet({**self.models, **other.models}, f"{self.source}+{other.source}")
