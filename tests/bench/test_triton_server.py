"""A real Triton Inference Server (tritonserver from the nvidia-pytriton wheel, installed on
first use into .cache/triton) on the twin of a tiny ONNX model: its answers equal ONNX
Runtime's, also for requests its dynamic batcher runs together.

Not skipped when tritonserver cannot be installed: the benchmark needs it, and a clean
machine whose pip reaches PyPI installs it (``pip install --no-deps --target DIR
nvidia-pytriton==0.7.0``), so the test fails with the reason.  About 10 s once installed."""

from __future__ import annotations

import asyncio

import numpy as np
import onnxruntime as ort
import pytest

from ppipe_trt.bench.errors import ServerStartError, TritonUnavailableError
from ppipe_trt.bench.procs import process_tree
from ppipe_trt.bench.triton_peer import TritonServer, ensure_triton
from ppipe_trt.bench.triton_twin import write_twin_repository
from tests.bench.conftest import TINY_CONFIG

pytestmark = pytest.mark.timeout(900)  # a first install downloads a 150 MB wheel


@pytest.fixture(scope="module")
def triton_install():
    try:
        return ensure_triton()
    except TritonUnavailableError as exc:
        return exc


def _installed(found):
    if isinstance(found, Exception):
        pytest.fail(f"tritonserver is unavailable: {found}", pytrace=False)
    return found


async def _infer_all(url: str, batches: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    import tritonclient.grpc.aio as grpcclient

    async with grpcclient.InferenceServerClient(url) as client:
        async def one(x):
            inp = grpcclient.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            result = await client.infer("tiny", [inp])
            return {name: result.as_numpy(name) for name in ("y", "z")}
        return await asyncio.gather(*(one(x) for x in batches))


def test_triton_answers_as_onnx_runtime(triton_install, tiny_repository, tmp_path):
    install = _installed(triton_install)
    # declare both outputs and hold batches 50 ms, so that concurrent requests run together
    config = tiny_repository / "tiny" / "config.pbtxt"
    config.write_text(TINY_CONFIG.replace(
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 3 ] } ]',
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 3 ] }, '
        '{ name: "z" data_type: TYPE_FP32 dims: [ 4 ] } ]').replace("200 }", "50000 }"))
    twin = write_twin_repository(tiny_repository, tmp_path / "twin", ["tiny"], instances=2)
    session = ort.InferenceSession(str(twin["tiny"].entry.onnx_path))
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, 4)).astype(np.float32) for n in (1, 1, 2, 1, 1, 1, 3, 1)]
    with TritonServer(install, tmp_path / "twin", tmp_path) as server:
        assert server.server_version() == "2.51.0"
        assert len(process_tree(server.pid)) == 3  # the server and one stub per instance
        answers = asyncio.run(_infer_all(server.grpc_url, batches))
        import tritonclient.grpc as grpcclient
        stats = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics(
            "tiny").model_stats[0]
    for x, got in zip(batches, answers):
        y, z = session.run(["y", "z"], {"x": x})
        np.testing.assert_allclose(got["y"], y, rtol=1e-6)
        np.testing.assert_allclose(got["z"], z, rtol=1e-6)
    assert stats.inference_count == sum(len(b) for b in batches)
    assert stats.execution_count < len(batches)  # some requests shared one execute() call


def test_a_model_triton_cannot_load_fails_with_the_log(triton_install, tiny_repository,
                                                      tmp_path):
    install = _installed(triton_install)
    twin = write_twin_repository(tiny_repository, tmp_path / "twin", ["tiny"], instances=1)
    onnx_link = twin["tiny"].config_path.parent / "1" / "model.onnx"
    onnx_link.unlink()
    onnx_link.write_bytes(b"not an onnx file")
    with pytest.raises(ServerStartError, match=r"(?s)did not start:.*failed to load 'tiny' "
                       r"version 1.*INVALID_PROTOBUF.*exited with code"):
        with TritonServer(install, tmp_path / "twin", tmp_path, startup_timeout_s=120):
            pass
