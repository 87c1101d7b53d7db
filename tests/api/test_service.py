"""The protocol-neutral service (api/service.py) without any front end: on a real runtime of a
small real model (ONNX Runtime on CPU), and on a runtime that never answers or is not there."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

import numpy as np
import pytest

from api.codec import ParsedInfer, RequestedOutput
from api.service import AnswerTimeoutError, InferenceService, ServerNotReadyError
from ppipe_trt.engines.backends.base import TensorSpec
from ppipe_trt.errors import ModelNotFoundError
from ppipe_trt.serving.runtime import ServedModel

MODEL = "demo_detector"  # one image input, six outputs
MAX_BATCH = 4


def _parsed(x: np.ndarray, outputs: list[str], timeout_us: float | None = None,
            input_name: str = "image") -> ParsedInfer:
    return ParsedInfer("r", x.shape[0], {input_name: x},
                       [RequestedOutput(n, False) for n in outputs], timeout_us=timeout_us)


def test_infer_joins_the_samples_in_request_order(detector_runtime, detector_reference):
    x, ref = detector_reference
    service = InferenceService(lambda: detector_runtime)
    model = service.model(MODEL)
    wanted = ["cls_p5", "box_p3"]
    outcome = asyncio.run(service.infer(model, _parsed(x, wanted)))
    assert list(outcome.outputs) == wanted  # only what was asked, in the order asked
    for name in wanted:
        got = outcome.outputs[name]
        assert got.shape == ref[name].shape
        assert np.max(np.abs(got - ref[name])) <= 1e-5 * np.max(np.abs(ref[name])), name
    assert len(outcome.results) == MAX_BATCH
    worst = max(outcome.results, key=lambda r: r.latency_us)
    assert outcome.worst_latency_us == worst.latency_us > 0
    assert outcome.worst_batch_size == worst.batch_size == MAX_BATCH
    (stats,) = service.statistics(MODEL)
    assert stats["last_inference"] > 0 and stats["inference_count"] >= MAX_BATCH


def test_models_are_found_by_name_and_version(detector_runtime):
    service = InferenceService(lambda: detector_runtime)
    for version in (None, "", "1"):
        assert service.model(MODEL, version).name == MODEL
    with pytest.raises(ModelNotFoundError) as info:
        service.model("nope")
    assert str(info.value) == f"unknown model 'nope'; served models: ['{MODEL}']"
    with pytest.raises(ModelNotFoundError) as info:
        service.model_metadata(MODEL, "2")
    assert str(info.value) == f"model '{MODEL}' has no version '2'; versions: ['1']"
    meta = service.model_metadata(MODEL)
    assert [t.name for t in meta.inputs] == ["image"] and meta.inputs[0].shape == (-1, 3, 256, 256)
    assert meta.parameters["slo_ms"] == 500.0
    config = service.model_config(MODEL)
    # the example repository's max_batch_size (8), not this plan's batch (MAX_BATCH)
    assert config["max_batch_size"] == 8 != MAX_BATCH
    assert config["input"][0]["dims"] == [3, 256, 256]
    assert service.ready and service.model_ready(MODEL)
    assert [(e.name, e.state) for e in service.repository_index()] == [(MODEL, "READY")]


def test_without_a_runtime_everything_but_liveness_is_not_ready():
    service = InferenceService(lambda: None)
    assert not service.ready
    assert service.server_metadata().name == "ppipe-trt"
    for call in (lambda: service.model(MODEL), service.repository_index, service.statistics,
                 service.status):
        with pytest.raises(ServerNotReadyError, match="^server is not ready") as info:
            call()
        assert info.value.reason == "not_ready"


class _SilentRuntime:
    """A runtime that accepts requests and never answers them (and is not ready)."""

    ready = False

    def __init__(self, model: ServedModel):
        self.models = {model.name: model}

    def model(self, name: str) -> ServedModel:
        return self.models[name]

    def submit(self, model, inputs, timeout_us=None) -> Future:
        return Future()

    def submit_async(self, model, inputs, timeout_us=None) -> asyncio.Future:
        return asyncio.get_running_loop().create_future()


def test_no_answer_past_deadline_and_grace_is_a_timeout():
    spec = TensorSpec("x", "float32", (-1, 2))
    silent = _SilentRuntime(ServedModel("m", (spec,), (spec,), slo_us=1e6, max_batch=1,
                                        mode="test"))
    service = InferenceService(lambda: silent, answer_grace_s=0.01)
    parsed = _parsed(np.zeros((2, 2), np.float32), ["x"], timeout_us=20_000.0, input_name="x")
    with pytest.raises(AnswerTimeoutError) as info:
        asyncio.run(service.infer(silent.models["m"], parsed))
    assert str(info.value) == "no answer from model 'm' within 30 ms (deadline + grace)"
    assert service.repository_index()[0].state == "UNAVAILABLE"
    assert service.repository_index(ready_only=True) == []


def test_the_guard_gives_up_only_waits_past_their_time():
    """One sweep timer for every wait: a wait past its deadline + grace is given up (the
    others go on and are answered), and the guard stops its timer once nothing is watched."""
    from api.service import GUARD_TICK_S, AnswerGuard

    async def main():
        loop = asyncio.get_running_loop()
        guard = AnswerGuard(loop)
        short, long_, answered = (loop.create_future() for _ in range(3))
        w_short = guard.watch(short, 0.01)
        w_long = guard.watch(long_, 0.3)
        w_answered = guard.watch(answered, 0.01)
        answered.set_result(1)
        guard.release(w_answered)
        await asyncio.sleep(0.01 + 2 * GUARD_TICK_S)
        assert short.cancelled() and w_short[2]
        assert not long_.done() and not w_long[2]
        assert answered.result() == 1 and not w_answered[2]
        long_.set_result(2)
        guard.release(w_long)
        await asyncio.sleep(0.3 + 2 * GUARD_TICK_S)
        assert guard._timer is None and not guard._queues and not w_long[2]

    asyncio.run(main())
