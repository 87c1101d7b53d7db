"""Fixtures for the serving tests: built-in models built for the CPU class on first use."""

from __future__ import annotations

import pytest


class _LazyBuilds(dict):
    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, model):
        from ppipe_trt.engines import build_model_engines

        self[model] = build_model_engines(model, "cpu", store_root=self.root, progress=False)
        return self[model]


@pytest.fixture(scope="session")
def cpu_builds(tmp_path_factory):
    """{model: BuiltModel} for the CPU class (same store as tests/api, built idempotently)."""
    return _LazyBuilds(tmp_path_factory.getbasetemp() / "engines")


def with_class(profile, gpu_class: str, latency_us: float):
    """A copy of ``profile`` that also holds ``gpu_class`` with every block at
    ``latency_us`` for every batch size (an emulated class of known speed)."""
    from dataclasses import replace

    from ppipe_trt.profiles.types import BlockLatencyTable

    base = next(iter(profile.tables.values()))
    table = BlockLatencyTable(profile.model, gpu_class, 1,
                              tuple((latency_us,) * base.max_batch for _ in range(base.num_blocks)))
    return replace(profile, tables={**profile.tables, (gpu_class, 1): table})


@pytest.fixture(scope="session")
def emulated_class():
    return with_class
