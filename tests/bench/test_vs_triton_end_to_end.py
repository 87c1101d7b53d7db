"""The whole comparison (ppipe_trt/bench/vs_triton.py) on the example repository's demo_resnet:
real tritonserver and real ``ppipe serve``, one short load point each at a light load, where
both must answer everything within the SLO.  About 30 s: marked slow."""

from __future__ import annotations

import pytest

from ppipe_trt.bench.vs_triton import PPIPE, TRITON, CompareOptions, aggregate, compare_model
from ppipe_trt.repository import EXAMPLE_REPOSITORY

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_both_servers_measured_on_the_same_schedule(tmp_path):
    options = CompareOptions(repository=EXAMPLE_REPOSITORY, models=("demo_resnet",),
                             work_dir=tmp_path, workers=2, load_factors=(1.0,), seconds=1.5,
                             repeats=1, capacity_rps=20.0, warmup_requests=5)
    lines = []
    result = compare_model(options, "demo_resnet", progress=lines.append)
    assert result.slo_ms == 50.0 and result.capacity_rps == 20.0 and result.capacity is None
    assert result.triton_version == "2.51.0"
    assert result.ppipe_capacity_line and "req/s" in result.ppipe_capacity_line
    assert result.ppipe_banner_slo_ms == 50.0
    records = {r["server"]: r for r in aggregate(result)}
    assert set(records) == {TRITON, PPIPE}
    assert records[TRITON]["sent"] == records[PPIPE]["sent"] > 10  # one schedule for both
    for record in records.values():
        assert record["within_slo"] >= 0.9, record  # 20 req/s is a tenth of either's capacity
        assert record["cpu_us_per_request"] > 1000  # a ResNet sample is ~2.6 ms of one core
        assert record["peer_idle_cpu_pct"] is not None
    assert any("capacity" not in line and "goodput" in line for line in lines)
