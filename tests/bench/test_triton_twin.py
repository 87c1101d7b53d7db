"""The Triton twin of a ppipe model repository (ppipe_trt/bench/triton_twin.py): the written
config is a valid Triton ModelConfig for the Python backend with the same tensors."""

from __future__ import annotations

import py_compile

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb2

from ppipe_trt.bench.errors import BenchError
from ppipe_trt.bench.triton_twin import default_site_dirs, write_twin_repository
from ppipe_trt.repository import load_model_entry
from tests.bench.conftest import tiny_onnx


def _parse(path) -> pb2.ModelConfig:
    config = pb2.ModelConfig()
    text_format.Parse(path.read_text(), config)
    return config


def _io(config) -> list[tuple[str, str, list[int]]]:
    return [(t.name, pb2.DataType.Name(t.data_type), list(t.dims))
            for t in [*config.input, *config.output]]


def test_twin_config_round_trip(tiny_repository, tmp_path):
    twins = write_twin_repository(tiny_repository, tmp_path / "twin", ["tiny"], instances=3)
    twin = twins["tiny"]
    config = _parse(twin.config_path)
    assert config.name == "tiny"
    assert config.backend == "python" and config.platform == ""
    assert config.max_batch_size == 4
    # what ppipe serves: the declared output y (z is left out, as ppipe leaves it out)
    assert _io(config) == [("x", "TYPE_FP32", [4]), ("y", "TYPE_FP32", [3])]
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (3, pb2.ModelInstanceGroup.KIND_CPU)]
    assert config.dynamic_batching.max_queue_delay_microseconds == 200  # the source's
    assert config.parameters["slo_ms"].string_value == "200"
    version_dir = twin.config_path.parent / "1"
    assert (version_dir / "model.onnx").resolve() == (
        tiny_repository / "tiny" / "1" / "model.onnx").resolve()
    py_compile.compile(str(version_dir / "model.py"), doraise=True)
    text = (version_dir / "model.py").read_text()
    assert all(repr(d) in text for d in default_site_dirs())
    # the twin of a model is itself a repository entry ppipe can read back (same tensors)
    entry = load_model_entry(tiny_repository / "tiny")
    assert [(t.name, t.dims) for t in entry.inputs + entry.outputs] == [
        (name, tuple(dims)) for name, _, dims in _io(config)]


def test_yaml_config_and_defaults(tmp_path):
    root = tmp_path / "repo"
    tiny_onnx(root / "seg" / "2" / "model.onnx")
    (root / "seg" / "config.yaml").write_text(
        "name: seg\nmax_batch_size: 2\nslo_ms: 80\n"
        "input:\n  - {name: x, data_type: TYPE_FP32, dims: [4]}\n")
    twin = write_twin_repository(root, tmp_path / "twin", ["seg"], instances=1)["seg"]
    config = _parse(twin.config_path)
    assert config.backend == "python" and config.max_batch_size == 2
    # no outputs declared: all the model's, as the project resolves them (a Python-backend
    # model must declare every tensor it answers with)
    assert _io(config) == [("x", "TYPE_FP32", [4]), ("y", "TYPE_FP32", [3]),
                           ("z", "TYPE_FP32", [4])]
    assert config.HasField("dynamic_batching")  # {} when the source has none
    assert twin.model_py_path == twin.config_path.parent / "2" / "model.py"


def test_queue_timeout_becomes_a_reject_policy(tiny_repository, tmp_path):
    twin = write_twin_repository(tiny_repository, tmp_path / "twin", ["tiny"], instances=1,
                                 queue_timeout_us={"tiny": 50_000})["tiny"]
    policy = _parse(twin.config_path).dynamic_batching.default_queue_policy
    assert policy.timeout_action == pb2.ModelQueuePolicy.REJECT
    assert policy.default_timeout_microseconds == 50_000


def test_unknown_model_and_bad_instances(tiny_repository, tmp_path):
    with pytest.raises(BenchError, match="'nope' is not in repository"):
        write_twin_repository(tiny_repository, tmp_path / "twin", ["nope"], instances=1)
    with pytest.raises(BenchError, match="instance count 0"):
        write_twin_repository(tiny_repository, tmp_path / "twin", ["tiny"], instances=0)
