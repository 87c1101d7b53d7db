"""Shared fixtures.  The shared PPipe profiles live beside the checkout (../shared)."""

from __future__ import annotations

import pytest

from ppipe_trt.profiles import default_profiles_dir


@pytest.fixture(scope="session")
def profiles_dir():
    path = default_profiles_dir()
    if not (path / "block-timing-tf32").is_dir():
        pytest.fail(f"shared PPipe profiles not found at {path}; set PPIPE_PROFILES")
    return path


@pytest.fixture(scope="session")
def shared_profiles(profiles_dir):
    from ppipe_trt.profiles import load_profiles
    return load_profiles(profiles_dir)


# ---- the user's own models: a Triton-layout repository of the zoo's CNN families ------------
ZOO_MAX_BATCH = 4
ZOO_BLOCKS = 6


def _zoo_config(name: str) -> tuple[str, str]:
    """(file name, text) of the repository config for zoo family ``name``: classifiers in
    Triton's pbtxt with labels, the segmenter in YAML, the detector with no tensors declared
    (Triton's auto-complete), each at the zoo's max batch."""
    from tests.model_zoo import FAMILIES

    spec = FAMILIES[name]
    c, h, w = spec.input_shape
    if spec.task == "segmentation":
        return "config.yaml", (
            f"name: {name}\nmax_batch_size: {ZOO_MAX_BATCH}\nslo_ms: 400\n"
            f"input:\n  - {{name: {spec.input_name}, data_type: TYPE_FP32, format: FORMAT_NCHW,"
            f" dims: [{c}, {h}, {w}]}}\n"
            f"output:\n  - {{name: mask, data_type: TYPE_FP32, dims: [{spec.num_classes}, {h}, "
            f"{w}]}}\npreprocess: {{mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}\n"
            "postprocess: {kind: segmentation, output: mask}\n")
    if spec.task == "detection":
        return "config.pbtxt", (
            f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {ZOO_MAX_BATCH}\n'
            'parameters { key: "slo_ms" value: { string_value: "400" } }\n')
    return "config.pbtxt", (
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {ZOO_MAX_BATCH}\n'
        f'input [ {{ name: "{spec.input_name}" data_type: TYPE_FP32 format: FORMAT_NCHW '
        f'dims: [ {c}, {h}, {w} ] }} ]\n'
        f'output [ {{ name: "logits" data_type: TYPE_FP32 dims: [ {spec.num_classes} ] '
        'label_filename: "labels.txt" } ]\n'
        'dynamic_batching { max_queue_delay_microseconds: 100 }\n'
        'instance_group [ { count: 1 kind: KIND_CPU } ]\n'
        'parameters { key: "slo_ms" value: { string_value: "400" } }\n')


@pytest.fixture(scope="session")
def zoo_repository(tmp_path_factory):
    """A model repository (Triton's layout) holding every family of tests/model_zoo.py."""
    from tests.model_zoo import FAMILIES, export_family

    root = tmp_path_factory.mktemp("zoo_repository")
    for name, spec in FAMILIES.items():
        export_family(name, root / name / "1" / "model.onnx")
        filename, text = _zoo_config(name)
        (root / name / filename).write_text(text)
        if spec.task == "classification":
            (root / name / "labels.txt").write_text(
                "".join(f"class_{i}\n" for i in range(spec.num_classes)))
    return root


class _ZooBuilds(dict):
    """Built zoo models by name (CPU class), each built on first use from the repository."""

    def __init__(self, repository, store):
        super().__init__()
        self.repository, self.store = repository, store

    def __missing__(self, name):
        from ppipe_trt.repository import load_model_entry
        from ppipe_trt.repository.engines import build_entry

        entry = load_model_entry(self.repository / name)
        self[name] = build_entry(entry, "cpu", self.store, num_blocks=ZOO_BLOCKS,
                                 progress=False, repeats=1, warmup=0)
        return self[name]


@pytest.fixture(scope="session")
def zoo_builds(zoo_repository, tmp_path_factory):
    """``zoo_builds[name]`` -> BuiltModel of that zoo family, built once per session; the
    store is ``zoo_builds.store``."""
    return _ZooBuilds(zoo_repository, tmp_path_factory.mktemp("zoo_engines"))
