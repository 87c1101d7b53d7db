"""The open-loop Poisson generator (ppipe_trt/bench/openloop.py) against a gRPC server in this
process whose delays, errors and silences the test sets."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ppipe_trt.bench.errors import BenchError
from ppipe_trt.bench.openloop import (OK, UNANSWERED, LoadSpec, RequestRecord, infer_request,
                                      model_ready, poisson_schedule, random_inputs,
                                      run_open_loop, serial_requests, summarize)
from tests.bench.conftest import Behaviour


def _request():
    return infer_request("m", random_inputs([("x", "float32", [4])], seed=1), ["y"])


def test_poisson_schedule_is_seeded_and_has_the_rate():
    a = poisson_schedule(200.0, 20.0, seed=7)
    assert np.array_equal(a, poisson_schedule(200.0, 20.0, seed=7))
    assert not np.array_equal(a, poisson_schedule(200.0, 20.0, seed=8))
    assert np.all(np.diff(a) > 0) and a[-1] < 20.0
    assert abs(len(a) - 4000) < 4 * np.sqrt(4000)  # Poisson count: mean 4000, sd 63
    gaps = np.diff(a)
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.1  # exponential gaps: cv 1
    assert len(poisson_schedule(200.0, 20.0, seed=7, max_requests=100)) == 100


def test_random_inputs_shapes_and_request():
    inputs = random_inputs([("x", "float32", [3, 2]), ("k", "int64", [5])], seed=0)
    assert inputs["x"].shape == (1, 3, 2) and inputs["x"].dtype == np.float32
    assert inputs["k"].shape == (1, 5) and inputs["k"].dtype == np.int64
    request = infer_request("m", inputs, ["out"])
    assert [t.datatype for t in request.inputs] == ["FP32", "INT64"]
    assert list(request.inputs[0].shape) == [1, 3, 2]
    assert request.raw_input_contents[0] == inputs["x"].tobytes()
    with pytest.raises(BenchError, match="fixed positive dims"):
        random_inputs([("x", "float32", [-1, 4])])


def test_only_loopback_targets():
    with pytest.raises(BenchError, match="only loads servers on this machine"):
        run_open_loop("10.0.0.1:8001", _request(), LoadSpec(10, 1, 50))


def test_load_spec_rejects_empty_points():
    with pytest.raises(BenchError, match="less than one request"):
        LoadSpec(0.5, 1.0, 50)
    with pytest.raises(BenchError, match="expected all > 0"):
        LoadSpec(10, 1.0, 0)


def test_every_request_answered_on_a_fast_server(fake_server):
    spec = LoadSpec(rate_rps=100, duration_s=1.0, slo_ms=2000, seed=3)
    with fake_server(Behaviour(delay_s=0.002)) as server:
        assert model_ready(server.url, "m")
        serial = serial_requests(server.url, _request(), 3)
        assert len(serial.latencies_ms) == 3 and serial.errors == {}
        records, summary = run_open_loop(server.url, _request(), spec)
    expected = len(poisson_schedule(100, 1.0, seed=3))
    assert summary.sent == len(records) == expected
    assert summary.answered == summary.within_slo_count == expected
    assert summary.within_slo == 1.0 and summary.rejections == {} and summary.unanswered == 0
    assert summary.goodput_rps == pytest.approx(expected / 1.0)
    assert 2.0 <= summary.p50_ms <= summary.p99_ms < 2000
    assert 0 < summary.client_cpu_pct < 100


def test_open_loop_sends_on_schedule_while_answers_lag(fake_server):
    # answers take 300 ms, arrivals come every ~10 ms: a closed loop would send a handful
    spec = LoadSpec(rate_rps=100, duration_s=1.0, slo_ms=1000, seed=5)
    behaviour = Behaviour(delay_s=0.3)
    with fake_server(behaviour) as server:
        records, summary = run_open_loop(server.url, _request(), spec)
    assert summary.sent == len(behaviour.arrivals) == len(poisson_schedule(100, 1.0, seed=5))
    assert summary.answered == summary.sent
    assert summary.send_lag_p99_ms < 100  # generous: the machine may be shared
    assert all(300 <= r.latency_ms < 600 for r in records)
    # arrivals at the server follow the schedule, not the answers
    offsets = np.array(behaviour.arrivals) - behaviour.arrivals[0]
    schedule = np.array([r.scheduled_s for r in records])
    assert np.max(np.abs(offsets - (schedule - schedule[0]))) < 0.15


def test_errors_are_counted_by_code(fake_server):
    spec = LoadSpec(rate_rps=80, duration_s=1.0, slo_ms=2000, seed=2)
    with fake_server(Behaviour(fail_every=4)) as server:
        records, summary = run_open_loop(server.url, _request(), spec)
    failed = len(range(0, summary.sent, 4))
    assert summary.rejections == {"UNAVAILABLE": failed}
    assert summary.answered == summary.sent - failed
    assert summary.within_slo == pytest.approx((summary.sent - failed) / summary.sent)
    assert all(r.latency_ms is None for r in records if r.outcome != OK)


def test_serial_requests_count_drops_and_stop_at_wrong_requests(fake_server):
    with fake_server(Behaviour(fail_every=2)) as server:
        serial = serial_requests(server.url, _request(), 4)
    assert len(serial.latencies_ms) == 2 and serial.errors == {"UNAVAILABLE": 2}
    assert "UNAVAILABLE: dropped by the test" in serial.first_error


def test_outstanding_requests_are_cancelled_after_the_grace(fake_server):
    spec = LoadSpec(rate_rps=50, duration_s=1.0, slo_ms=100, seed=4)  # grace 0.2 s
    with fake_server(Behaviour(hang_after=10)) as server:
        start = time.monotonic()
        records, summary = run_open_loop(server.url, _request(), spec)
        took = time.monotonic() - start
    assert took < 1.0 + 0.2 + 1.0
    assert summary.answered == 10
    assert summary.unanswered == summary.sent - 10 > 0
    assert [r.outcome for r in records[10:]] == [UNANSWERED] * (summary.sent - 10)
    assert summary.rejections == {}


def test_summary_of_hand_built_records():
    spec = LoadSpec(rate_rps=5, duration_s=2.0, slo_ms=50)
    records = [RequestRecord(0.1 * i, 0.1 * i, ms, OK) for i, ms in
               enumerate([10, 20, 30, 40, 60, 70])]
    records += [RequestRecord(0.7, 0.7, None, "UNAVAILABLE"),
                RequestRecord(0.8, 0.8, None, "RESOURCE_EXHAUSTED"),
                RequestRecord(0.9, 0.9, None, "UNAVAILABLE"),
                RequestRecord(1.0, 1.0, None, UNANSWERED)]
    s = summarize(records, spec, client_cpu_pct=12.0)
    assert (s.sent, s.answered, s.within_slo_count) == (10, 6, 4)
    assert s.goodput_rps == pytest.approx(4 / 2.0)
    assert s.within_slo == pytest.approx(0.4)
    assert s.rejections == {"RESOURCE_EXHAUSTED": 1, "UNAVAILABLE": 2}
    assert s.unanswered == 1
    assert s.p50_ms == pytest.approx(35.0)
    assert s.p99_ms == pytest.approx(np.percentile([10, 20, 30, 40, 60, 70], 99))
    assert s.client_cpu_pct == 12.0
