"""Built-in demo models: metadata, deterministic export, torch and ONNX agree."""

from __future__ import annotations

import hashlib

import numpy as np
import onnxruntime as ort
import pytest

from ppipe_trt.errors import BadInputError
from ppipe_trt.models import BUILTIN_MODELS, export_builtin, model_info


def test_builtin_names():
    assert BUILTIN_MODELS == ("demo_resnet", "demo_detector", "demo_unet")


def test_model_info():
    info = model_info("demo_resnet")
    assert (info.input_name, info.layout, info.input_shape) == ("image", "NCHW", (3, 224, 224))
    assert info.num_classes == 1000 and info.task == "classification"
    assert len(info.mean) == len(info.std) == 3
    assert model_info("demo_detector").input_shape == (3, 256, 256)
    assert len(model_info("demo_detector").output_names) == 6
    assert model_info("demo_unet").task == "segmentation"
    with pytest.raises(BadInputError, match="unknown built-in model 'resnet50'"):
        model_info("resnet50")


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_export_is_deterministic_and_matches_torch(tmp_path, name):
    import torch

    from ppipe_trt.models.demo_nets import build_demo_module

    a = export_builtin(name, tmp_path / "a.onnx")
    b = export_builtin(name, tmp_path / "b.onnx")
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    info = model_info(name)
    sess = ort.InferenceSession(str(a), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [info.input_name]
    assert [o.name for o in sess.get_outputs()] == list(info.output_names)
    x = np.random.default_rng(0).random((2,) + info.input_shape, dtype=np.float32)
    got = sess.run(None, {info.input_name: x})  # batch 2: the batch axis is dynamic
    with torch.inference_mode():
        want = build_demo_module(name)(torch.from_numpy(x))
    want = (want,) if isinstance(want, torch.Tensor) else want
    for g, w in zip(got, want):
        assert g.shape[0] == 2
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-4 * float(np.abs(w.numpy()).max()))
