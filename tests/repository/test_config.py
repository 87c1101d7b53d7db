"""Reading Triton-layout repositories: config.pbtxt / config.yaml against real ONNX files."""

from __future__ import annotations

import shutil

import pytest

from ppipe_trt.errors import ConfigError
from ppipe_trt.repository import EXAMPLE_REPOSITORY, load_model_entry, load_repository
from tests.model_zoo import FAMILIES, export_family

TRITON_CLASSIFIER = """
name: "net"
platform: "onnxruntime_onnx"
max_batch_size: 4
input [ { name: "input" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [ 3, 64, 64 ] } ]
output [ { name: "logits" data_type: TYPE_FP32 dims: [ 10 ] label_filename: "labels.txt" } ]
dynamic_batching { preferred_batch_size: [ 2, 4 ] max_queue_delay_microseconds: 100 }
instance_group [ { count: 2 kind: KIND_GPU } ]
"""


@pytest.fixture(scope="module")
def classifier_onnx(tmp_path_factory):
    return export_family("mobilenet_se", tmp_path_factory.mktemp("onnx") / "model.onnx")


def _entry_dir(tmp_path, onnx_path, config: str, filename="config.pbtxt", name="net",
               version="1"):
    d = tmp_path / name
    (d / version).mkdir(parents=True)
    shutil.copy(onnx_path, d / version / "model.onnx")
    (d / filename).write_text(config)
    (d / "labels.txt").write_text("".join(f"label {i}\n" for i in range(10)))
    return d


def test_a_triton_users_config_is_read_unchanged(tmp_path, classifier_onnx):
    entry = load_model_entry(_entry_dir(tmp_path, classifier_onnx, TRITON_CLASSIFIER))
    assert entry.max_batch == 4 and entry.slo_ms is None and entry.weight == 1.0
    assert [(t.name, t.dtype, t.dims) for t in entry.inputs] == [("input", "float32", (3, 64, 64))]
    assert entry.image.height == 64 and entry.image.layout == "NCHW"
    assert entry.postprocess.kind == "classification" and entry.postprocess.output == "logits"
    assert entry.postprocess.labels[3] == "label 3"


def test_ppipe_parameters_and_highest_version(tmp_path, classifier_onnx):
    text = TRITON_CLASSIFIER + """
parameters { key: "slo_ms" value: { string_value: "75.5" } }
parameters { key: "weight" value: { string_value: "2" } }
parameters { key: "channel_order" value: { string_value: "BGR" } }
parameters { key: "resize_mode" value: { string_value: "letterbox" } }
parameters { key: "mean" value: { string_value: "0.5, 0.5, 0.5" } }
parameters { key: "top_k" value: { string_value: "3" } }
"""
    d = _entry_dir(tmp_path, classifier_onnx, text)
    (d / "3").mkdir()
    shutil.copy(classifier_onnx, d / "3" / "model.onnx")
    (d / "7").mkdir()  # a version directory without a model file is not a version
    entry = load_model_entry(d)
    assert entry.version == 3 and entry.onnx_path == d / "3" / "model.onnx"
    assert entry.slo_ms == 75.5 and entry.weight == 2.0
    assert entry.image.channel_order == "BGR" and entry.image.resize_mode == "letterbox"
    assert entry.image.mean == (0.5, 0.5, 0.5) and entry.postprocess.top_k == 3


def test_yaml_and_autocompleted_tensors(tmp_path, classifier_onnx):
    d = _entry_dir(tmp_path, classifier_onnx, "max_batch_size: 2\nslo_ms: 30\n"
                   "preprocess: {resize: [64, 64], std: [0.2, 0.2, 0.2]}\n"
                   "postprocess: {kind: classification, labels: labels.txt}\n",
                   filename="config.yaml")
    entry = load_model_entry(d)
    assert entry.name == "net" and entry.max_batch == 2 and entry.slo_ms == 30.0
    assert [t.name for t in entry.inputs] == ["input"] and entry.inputs[0].dims == (3, 64, 64)
    assert [t.name for t in entry.outputs] == ["logits"]
    assert entry.image.std == (0.2, 0.2, 0.2) and len(entry.postprocess.labels) == 10


@pytest.mark.parametrize("change,message", [
    (('name: "input"', 'name: "images"'),
     r"input 'images' is not an input of .*model.onnx \(the model's inputs: \['input'\]\)"),
    (("TYPE_FP32 format", "TYPE_FP16 format"),
     r"input 'input' has data_type TYPE_FP16 but .*model.onnx has TYPE_FP32"),
    (("dims: [ 3, 64, 64 ]", "dims: [ 3, 224, 224 ]"),
     r"input 'input' has dims \[3, 224, 224\] but .*model.onnx has \[3, 64, 64\]"),
    (('name: "logits"', 'name: "scores"'), r"output 'scores' is not an output of"),
    (("max_batch_size: 4", "max_batch_size: 0"),
     "max_batch_size is 0 and the dims have no leading -1"),
    (('platform: "onnxruntime_onnx"', 'platform: "tensorflow_savedmodel"'),
     "platform/backend 'tensorflow_savedmodel' is not supported"),
    (('label_filename: "labels.txt"', 'label_filename: "../../etc/passwd"'),
     "outside the model directory"),
    (("dynamic_batching {", "dynamic_batchin {"), "not a valid Triton model configuration"),
])
def test_a_config_that_does_not_match_is_refused_naming_both_sides(tmp_path, classifier_onnx,
                                                                   change, message):
    d = _entry_dir(tmp_path, classifier_onnx, TRITON_CLASSIFIER.replace(*change))
    with pytest.raises(ConfigError, match=message):
        load_model_entry(d)


def test_bad_parameters_and_missing_files(tmp_path, classifier_onnx):
    d = _entry_dir(tmp_path, classifier_onnx, TRITON_CLASSIFIER + (
        'parameters { key: "slo_ms" value: { string_value: "fast" } }\n'))
    with pytest.raises(ConfigError, match=r"slo_ms='fast'; expected a number"):
        load_model_entry(d)
    (d / "config.pbtxt").write_text(TRITON_CLASSIFIER + (
        'parameters { key: "resize_mode" value: { string_value: "squash" } }\n'))
    with pytest.raises(ConfigError, match=r"resize_mode='squash'; expected one of"):
        load_model_entry(d)
    (d / "1" / "model.onnx").unlink()
    with pytest.raises(ConfigError, match="no version directory holds model.onnx"):
        load_model_entry(d)
    (d / "config.pbtxt").unlink()
    with pytest.raises(ConfigError, match="no config.pbtxt or config.yaml"):
        load_model_entry(d)
    (tmp_path / "other").mkdir()  # an empty directory is not a model
    with pytest.raises(ConfigError, match="holds no model"):
        load_repository(tmp_path)


def test_max_batch_size_zero_with_explicit_batch_dims(tmp_path, classifier_onnx):
    text = (TRITON_CLASSIFIER.replace("max_batch_size: 4", "max_batch_size: 0")
            .replace("dims: [ 3, 64, 64 ]", "dims: [ -1, 3, 64, 64 ]")
            .replace("dims: [ 10 ]", "dims: [ -1, 10 ]"))
    entry = load_model_entry(_entry_dir(tmp_path, classifier_onnx, text))
    assert entry.max_batch == 8 and entry.inputs[0].dims == (3, 64, 64)


def test_the_example_repository_holds_the_demo_models():
    entries = load_repository(EXAMPLE_REPOSITORY)
    assert sorted(entries) == ["demo_detector", "demo_resnet", "demo_unet"]
    assert entries["demo_resnet"].slo_ms == 50.0
    assert entries["demo_unet"].postprocess.kind == "segmentation"
    assert len(entries["demo_detector"].outputs) == 6
    assert all(e.image is not None for e in entries.values())


def test_a_family_of_the_zoo_reads_from_its_repository(zoo_repository):
    entries = load_repository(zoo_repository)
    assert sorted(entries) == sorted(FAMILIES)
    assert entries["deeplab_aspp"].postprocess.kind == "segmentation"
    assert entries["fpn_detector"].inputs[0].name == "input"  # auto-completed from the model
