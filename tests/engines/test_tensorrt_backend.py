"""TensorRT builder/runner up to the import boundary; the real thing on machines with it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx_fixtures import skip_model

from ppipe_trt.engines.backends.base import TensorSpec
from ppipe_trt.engines.backends.tensorrt_backend import (
    TensorRTBackend, check_engine_metadata, engine_metadata, ensure_engine, import_tensorrt,
    optimization_profile_shapes, read_engine_metadata, strip_passthrough_outputs)
from ppipe_trt.engines.build import resolve_backend
from ppipe_trt.errors import BackendUnavailableError, BadInputError, EngineMismatchError

try:
    import tensorrt  # noqa: F401
    HAVE_TRT = True
except ImportError:
    HAVE_TRT = False

SPEC = TensorSpec("x", "float32", (-1, 3, 32, 32))


def _meta(**over):
    base = dict(tensorrt_version="10.9.0", gpu_class="T4", gpu_name="Tesla T4",
                compute_capability="7.5", source_sha256="ab" * 32, onnx_sha256="cd" * 32,
                block_range=(2, 4), precision="tf32", max_batch=8, opt_batch=4,
                inputs=(SPEC,), outputs=(TensorSpec("y", "float32", (-1, 10)),), passthrough=())
    base.update(over)
    return engine_metadata(**base)


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed")
def test_missing_tensorrt_is_a_clear_error(tmp_path):
    with pytest.raises(BackendUnavailableError, match=r"^TensorRT is not installed: "):
        import_tensorrt()
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        ensure_engine(tmp_path / "a.onnx", tmp_path / "a.plan", gpu_class="T4", max_batch=8,
                      source_sha256="x", block_range=(0, 0))
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        resolve_backend("tensorrt", "T4")
    assert resolve_backend("auto", "T4")[0] == "onnxruntime"
    # a runner reads its metadata without TensorRT, and fails at load() with the clear error
    plan = tmp_path / "b.plan"
    plan.write_bytes(b"not really an engine")
    (tmp_path / "b.plan.json").write_text(json.dumps(_meta()))
    runner = TensorRTBackend(plan, expected_gpu_class="T4")
    assert [s.name for s in runner.inputs] == ["x"] and runner.max_batch == 8
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        runner.load()


def test_tensorrt_on_cpu_class_rejected():
    with pytest.raises(BadInputError, match="needs a GPU class"):
        resolve_backend("tensorrt", "cpu")


def test_optimization_profile_shapes():
    assert optimization_profile_shapes(SPEC, 8) == ((1, 3, 32, 32), (4, 3, 32, 32), (8, 3, 32, 32))
    assert optimization_profile_shapes(SPEC, 7, opt_batch=2)[1] == (2, 3, 32, 32)
    assert optimization_profile_shapes(SPEC, 1) == ((1, 3, 32, 32),) * 3
    fixed = TensorSpec("s", "int64", (4,))
    assert optimization_profile_shapes(fixed, 8) == ((4,), (4,), (4,))
    with pytest.raises(BadInputError, match="only the batch dim may be dynamic"):
        optimization_profile_shapes(TensorSpec("x", "float32", (-1, 3, -1, 32)), 8)
    with pytest.raises(BadInputError, match="opt_batch=9"):
        optimization_profile_shapes(SPEC, 8, opt_batch=9)


def test_strip_passthrough_outputs():
    from ppipe_trt.engines.graph import ModelGraph
    from ppipe_trt.engines.subgraph import extract_stage

    g = ModelGraph.from_onnx(skip_model())
    pos = {n.name: i for i, n in enumerate(g.nodes)}
    stage = extract_stage(g, pos["conv2"], pos["conv4"])  # c0 and early pass through
    stripped, passthrough = strip_passthrough_outputs(stage)
    assert set(passthrough) == {"c0", "early"}
    assert [o.name for o in stripped.graph.output] == ["c4"]
    assert len(stage.graph.output) == 3  # the source is untouched
    onnx.checker.check_model(stripped)
    same, none = strip_passthrough_outputs(stripped)
    assert none == () and same is stripped


def test_engine_metadata_checks(tmp_path):
    meta = _meta()
    check_engine_metadata(meta, gpu_class="T4", tensorrt_version="10.9.0", onnx_sha256="cd" * 32)
    with pytest.raises(EngineMismatchError, match="built for GPU class 'T4'.*this GPU is class 'L4'"):
        check_engine_metadata(meta, gpu_class="L4", tensorrt_version="10.9.0")
    with pytest.raises(EngineMismatchError, match="TensorRT 10.9.0; this is TensorRT 11.0.0"):
        check_engine_metadata(meta, gpu_class="T4", tensorrt_version="11.0.0")
    with pytest.raises(EngineMismatchError, match="another sub-graph"):
        check_engine_metadata(meta, gpu_class="T4", tensorrt_version="10.9.0", onnx_sha256="00")
    with pytest.raises(EngineMismatchError, match="not a ppipe-trt-plan"):
        check_engine_metadata({"gpu_class": "T4"}, gpu_class="T4", tensorrt_version="10.9.0")
    plan = tmp_path / "e.plan"
    plan.write_bytes(b"")
    with pytest.raises(EngineMismatchError, match="metadata missing"):
        read_engine_metadata(plan)
    (tmp_path / "e.plan.json").write_text(json.dumps(meta))
    assert read_engine_metadata(plan)["block_range"] == [2, 4]


def test_runner_requires_existing_plan(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        TensorRTBackend(tmp_path / "missing.plan")


# ---- on a machine with TensorRT and an NVIDIA GPU --------------------------------------------
@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed")
def test_tensorrt_engine_matches_onnxruntime(tmp_path):
    from ppipe_trt.engines.build import build_model_engines
    from ppipe_trt.engines.gpu import detect_gpu_class
    from ppipe_trt.engines.graph import random_inputs
    from ppipe_trt.engines.verify import relative_error

    gpu = detect_gpu_class()
    if gpu == "cpu":
        pytest.skip("no NVIDIA GPU")
    path = tmp_path / "skipnet.onnx"
    onnx.save(skip_model(), str(path))
    built = build_model_engines(path, gpu, store_root=tmp_path, num_blocks=3, backend="tensorrt",
                                precision="fp32", max_batch=4, progress=False, repeats=2)
    for first, last in [(0, 0), (1, 2), (0, 2)]:
        ins, _ = built.stage_io(first, last)
        feeds = random_inputs(ins, 3)
        with built.open_backend(first, last, "onnxruntime") as ref, \
                built.open_backend(first, last, "tensorrt", "cuda:0") as trt_runner:
            want, got = ref.infer(feeds), trt_runner.infer(feeds)
        assert set(got) == set(want)
        assert max(relative_error(got[n], want[n]) for n in want) < 1e-3
    meta = read_engine_metadata(built.stage_path(0, 0, ".plan"))
    with pytest.raises(EngineMismatchError):
        TensorRTBackend(built.stage_path(0, 0, ".plan"), expected_gpu_class="not-" + gpu).load()
    assert meta["gpu_class"] == gpu and np.all(meta["block_range"] == [0, 0])
