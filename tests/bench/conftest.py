"""Fixtures of the benchmark library's tests: a tiny ONNX model in a Triton-layout repository,
and a KServe v2 gRPC server in this process whose answers the test controls."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

TINY_SLO_MS = 200


def tiny_onnx(path: Path) -> None:
    """x [N, 4] -> y = x @ W [N, 3] and z = relu(x) [N, 4] (dynamic batch)."""
    import onnx

    weights = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 7, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["x"], ["z"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4])],
        initializer=[weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


TINY_CONFIG = f'''name: "tiny"
platform: "onnxruntime_onnx"
max_batch_size: 4
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ 3 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 200 }}
parameters {{ key: "slo_ms" value: {{ string_value: "{TINY_SLO_MS}" }} }}
'''


@pytest.fixture()
def tiny_repository(tmp_path) -> Path:
    """A repository holding "tiny": its config declares only output y (z comes from the
    model, as the project resolves it)."""
    root = tmp_path / "repo"
    tiny_onnx(root / "tiny" / "1" / "model.onnx")
    (root / "tiny" / "config.pbtxt").write_text(TINY_CONFIG)
    return root


@dataclass
class Behaviour:
    """What the fake server does with request number i (0-based, in arrival order)."""

    delay_s: float = 0.0
    fail_every: int = 0          # every n-th request answered UNAVAILABLE (0: never)
    hang_after: int | None = None  # requests from this index on never answered
    arrivals: list[float] = field(default_factory=list)  # loop.time() of each arrival


class FakeInferenceServer:
    """A grpc.aio KServe v2 server on 127.0.0.1 in a thread of its own, answering
    ModelInfer for any model with one FP32 output "y" of 3 zeros per request."""

    def __init__(self, behaviour: Behaviour):
        self.behaviour = behaviour
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        import grpc
        from tritonclient.grpc import service_pb2 as pb
        from tritonclient.grpc import service_pb2_grpc

        behaviour = self.behaviour
        loop = asyncio.get_running_loop()

        class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
            async def ServerReady(self, request, context):
                return pb.ServerReadyResponse(ready=True)

            async def ModelReady(self, request, context):
                return pb.ModelReadyResponse(ready=True)

            async def ModelInfer(self, request, context):
                index = len(behaviour.arrivals)
                behaviour.arrivals.append(loop.time())
                if behaviour.hang_after is not None and index >= behaviour.hang_after:
                    await asyncio.sleep(3600)
                if behaviour.delay_s:
                    await asyncio.sleep(behaviour.delay_s)
                if behaviour.fail_every and index % behaviour.fail_every == 0:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "dropped by the test")
                return pb.ModelInferResponse(
                    model_name=request.model_name,
                    outputs=[pb.ModelInferResponse.InferOutputTensor(
                        name="y", datatype="FP32", shape=[1, 3])],
                    raw_output_contents=[np.zeros(3, np.float32).tobytes()])

        server = grpc.aio.server()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._loop, self._stop = loop, asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await server.stop(grace=None)

    def __enter__(self) -> "FakeInferenceServer":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fake gRPC server did not start")
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture()
def fake_server():
    """A factory: ``with fake_server(Behaviour(...)) as server: ...``."""
    return FakeInferenceServer
