"""Re-planning from measured latencies (ppipe_trt.serving.recalibrate): the profiles scaled to
what was measured, on the toy plan of the scheduler tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scheduler"))

from toys import schedulers, toy_profiles  # noqa: E402

from ppipe_trt.errors import ConfigError  # noqa: E402
from ppipe_trt.scheduler.tables import with_stage_latency  # noqa: E402
from ppipe_trt.serving.recalibrate import ReplanOptions, measured_profiles  # noqa: E402


def test_blocks_are_scaled_by_the_measured_ratio_of_their_class():
    scheds, _ = schedulers()
    planned = scheds["toy"].pipelines
    # pipeline 0 (whole model on H, share 1): measured 2x at every batch size
    row = planned[0].stages[0].latency_us
    measured = with_stage_latency(planned, 0, 0, [0.0] + [2.0 * x for x in row[1:]])
    profiles = toy_profiles()
    out = measured_profiles(profiles, {"toy": list(zip(planned, measured))})
    before = profiles["toy"].tables[("H", 1)].latency_us
    after = out["toy"].tables[("H", 1)].latency_us
    for b_row, a_row in zip(before, after):
        assert a_row == pytest.approx(tuple(2.0 * v for v in b_row))
    # a class no stage of that share was measured slower keeps its profile
    assert out["toy"].tables[("L", 1)] == profiles["toy"].tables[("L", 1)]
    assert out["other"] == profiles["other"]


def test_scaled_rows_stay_non_decreasing_in_batch_size():
    scheds, _ = schedulers()
    planned = scheds["toy"].pipelines
    row = list(planned[0].stages[0].latency_us)
    # batch 1 measured 3x, batch 2 as profiled: a larger batch must not look faster
    row[1] *= 3.0
    measured = with_stage_latency(planned, 0, 0, row)
    out = measured_profiles(toy_profiles(), {"toy": list(zip(planned, measured))})
    for block_row in out["toy"].tables[("H", 1)].latency_us:
        assert list(block_row) == sorted(block_row)


@pytest.mark.parametrize("bad", [{"shortfall": 0.0}, {"shortfall": 1.0},
                                 {"min_executions": 0}, {"check_every_s": 0.0}])
def test_bad_options_are_refused(bad):
    with pytest.raises(ConfigError, match="replan"):
        ReplanOptions(**bad)
