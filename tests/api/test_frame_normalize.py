"""The frames preprocessing's fused normalisation against the textbook expression, for every
channel order, layout and dtype an image input may declare."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from api.frames import decode_frame, normalize
from ppipe_trt.repository.types import ImageSpec

BASE = ImageSpec(input_name="image", height=6, width=5, mean=(0.485, 0.456, 0.406),
                 std=(0.229, 0.224, 0.225), scale=1 / 255, resize_mode="stretch",
                 layout="NCHW", channel_order="RGB", dtype="float32", pad_value=0, channels=3)


def _reference(pixels: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """(pixel * scale - mean) / std in float64, channel order, layout, dtype, batch of 1."""
    x = pixels.astype(np.float64)
    if x.ndim == 2:
        x = x[:, :, None]
    mean, std = np.asarray(spec.mean, np.float64), np.asarray(spec.std, np.float64)
    if spec.channel_order == "BGR":
        x = x[:, :, ::-1]
        mean = mean[::-1] if mean.size == 3 else mean
        std = std[::-1] if std.size == 3 else std
    y = (x * spec.scale - mean) / std
    if spec.layout == "NCHW":
        y = y.transpose(2, 0, 1)
    dtype = np.dtype(spec.dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        y = np.clip(np.rint(y), info.min, info.max)
    return y[None].astype(dtype)


@pytest.mark.parametrize("order", ["RGB", "BGR"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8", "int8"])
def test_normalize_matches_the_textbook_expression(order, layout, dtype):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    spec = dataclasses.replace(BASE, channel_order=order, layout=layout, dtype=dtype)
    if np.dtype(dtype).kind in "iu":   # a quantised input: mean/std in pixel units
        spec = dataclasses.replace(spec, scale=1.0, mean=(128.0, 100.0, 3.0),
                                   std=(1.0, 0.5, 2.0))
    got = normalize(pixels, spec)
    want = _reference(pixels, spec)
    assert got.dtype == np.dtype(dtype) and got.shape == want.shape
    assert got.flags.c_contiguous
    if np.dtype(dtype).kind in "iu":
        # rounding of values at .5 may differ by one after float32 vs float64 arithmetic
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    else:
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64),
                                   rtol=2e-3 if dtype == "float16" else 1e-5, atol=1e-5)


def test_grayscale_with_one_mean_and_std():
    pixels = np.random.default_rng(4).integers(0, 256, (6, 5), dtype=np.uint8)
    spec = dataclasses.replace(BASE, channels=1, mean=(0.5,), std=(0.25,))
    for layout in ("NCHW", "NHWC"):
        s = dataclasses.replace(spec, layout=layout)
        got = normalize(pixels, s)
        assert got.shape == ((1, 1, 6, 5) if layout == "NCHW" else (1, 6, 5, 1))
        np.testing.assert_allclose(got, _reference(pixels, s), rtol=1e-5, atol=1e-5)


def test_decode_frame_of_a_png_is_exact_pixels_normalised():
    pixels = np.random.default_rng(5).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")   # lossless: the decoded pixels are these
    got = decode_frame(buf.getvalue(), BASE)
    np.testing.assert_allclose(got, _reference(pixels, BASE), rtol=1e-5, atol=1e-5)
