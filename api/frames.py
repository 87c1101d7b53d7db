"""Frames: a JPEG or PNG in, the model's input tensor out.

Decoding uses Pillow (libjpeg-turbo).  For JPEG, ``Image.draft`` lets the decoder scale by
1/2, 1/4 or 1/8 in the DCT domain when the frame is much larger than the model's input, which
is most of the decode cost saved.  Then: RGB, bilinear resize to the model's height x width,
scale to 0..1, normalize per channel, NCHW float32 with a batch dimension of 1.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

from ppipe_trt.errors import BadInputError
from ppipe_trt.serving.runtime import ImageSpec

ACCEPTED_FORMATS = ("JPEG", "PNG")
#: Frames above this many pixels are refused (decompression bombs).
MAX_PIXELS = 40_000_000


def decode_frame(data: bytes, spec: ImageSpec) -> np.ndarray:
    """Decode and preprocess one frame; returns a new ``(1, 3, H, W)`` float32 array."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadInputError("empty image body; send a JPEG or PNG")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in ACCEPTED_FORMATS:
                raise BadInputError(f"image format {img.format} is not accepted; send "
                                    f"{' or '.join(ACCEPTED_FORMATS)}")
            if img.width * img.height > MAX_PIXELS:
                raise BadInputError(f"image of {img.width}x{img.height} pixels is over the "
                                    f"{MAX_PIXELS}-pixel limit")
            if img.format == "JPEG":
                img.draft("RGB", (spec.width, spec.height))
            img = img.convert("RGB")  # forces the decode: truncation surfaces here
            if img.size != (spec.width, spec.height):
                img = img.resize((spec.width, spec.height), Image.BILINEAR)
    except BadInputError:
        raise
    except UnidentifiedImageError:
        raise BadInputError("corrupt or unsupported image: not a JPEG or PNG the decoder can "
                            "identify") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as exc:
        raise BadInputError(f"corrupt image: {exc}") from None
    pixels = np.asarray(img, dtype=np.float32)  # (H, W, 3)
    mean = np.asarray(spec.mean, dtype=np.float32) * 255.0
    inv_std = 1.0 / (np.asarray(spec.std, dtype=np.float32) * 255.0)
    chw = ((pixels - mean) * inv_std).transpose(2, 0, 1)
    return np.ascontiguousarray(chw[None])


def top_k(scores: np.ndarray, k: int) -> list[dict[str, float]]:
    """Top-``k`` classes of one sample's scores (logits), with softmax probabilities."""
    flat = scores.reshape(-1).astype(np.float64)
    k = max(1, min(k, flat.size))
    shifted = np.exp(flat - flat.max())
    probs = shifted / shifted.sum()
    order = np.argsort(-flat, kind="stable")[:k]
    return [{"index": int(i), "score": float(flat[i]), "probability": float(probs[i])}
            for i in order]
