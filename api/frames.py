"""Frames: a JPEG or PNG in, the model's input tensor out; postprocessing of the answer.

Decoding uses Pillow (libjpeg-turbo).  For JPEG, ``Image.draft`` lets the decoder scale by
1/2, 1/4 or 1/8 in the DCT domain when the frame is much larger than the model's input, which
is most of the decode cost saved.  Then, as the model's :class:`ImageSpec` says: RGB (or
grayscale), resize (stretch, shorter side + centre crop, or letterbox), ``pixel * scale``,
per-channel ``(x - mean) / std``, channel order, layout (NCHW/NHWC), dtype, with a batch
dimension of 1.
"""

from __future__ import annotations

import base64
import io
import warnings

import numpy as np

from api.binary import v2_datatype
from ppipe_trt.errors import BadInputError
from ppipe_trt.repository.types import ImageSpec, Postprocess

ACCEPTED_FORMATS = ("JPEG", "PNG")
#: Frames above this many pixels are refused (decompression bombs).
MAX_PIXELS = 40_000_000


def _resize(img, spec: ImageSpec):
    """``img`` resized to the model's ``width`` x ``height`` as ``spec.resize_mode`` says."""
    from PIL import Image

    w, h = spec.width, spec.height
    if img.size == (w, h):
        return img
    if spec.resize_mode == "stretch":
        return img.resize((w, h), Image.BILINEAR)
    if spec.resize_mode == "shorter_side_crop":
        scale = max(w / img.width, h / img.height)
        sw, sh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
        img = img.resize((sw, sh), Image.BILINEAR)
        left, top = (sw - w) // 2, (sh - h) // 2
        return img.crop((left, top, left + w, top + h))
    # letterbox: fit inside, pad the rest
    scale = min(w / img.width, h / img.height)
    sw, sh = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    fill = spec.pad_value if img.mode == "L" else (spec.pad_value,) * 3
    canvas = Image.new(img.mode, (w, h), fill)
    canvas.paste(img.resize((sw, sh), Image.BILINEAR), ((w - sw) // 2, (h - sh) // 2))
    return canvas


def decode_frame(data: bytes, spec: ImageSpec) -> np.ndarray:
    """Decode and preprocess one frame; returns a new array of the input's shape with a
    batch dimension of 1 (e.g. ``(1, 3, H, W)`` for NCHW) and the input's dtype."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadInputError("empty image body; send a JPEG or PNG")
    mode = "L" if spec.channels == 1 else "RGB"
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
                img.draft(mode, (spec.width, spec.height))
            img = _resize(img.convert(mode), spec)  # convert forces the decode
    except BadInputError:
        raise
    except UnidentifiedImageError:
        raise BadInputError("corrupt or unsupported image: not a JPEG or PNG the decoder can "
                            "identify") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as exc:
        raise BadInputError(f"corrupt image: {exc}") from None
    return normalize(np.asarray(img), spec)


def normalize(pixels: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """``(pixel * scale - mean) / std`` per channel of decoded ``(H, W[, C])`` pixels, in the
    input's channel order, layout and dtype, with a batch dimension of 1.

    Computed as one fused ``pixel * (scale / std) - mean / std`` straight into the output
    layout (float32), which is about 4x cheaper than the textbook expression on a 224x224
    frame; integer dtypes are rounded and clipped."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    mean = np.asarray(spec.mean, dtype=np.float64)
    std = np.asarray(spec.std, dtype=np.float64)
    if spec.channel_order == "BGR":
        pixels = pixels[:, :, ::-1]
        if mean.size == 3:  # stats are given in RGB order
            mean = mean[::-1]
        if std.size == 3:
            std = std[::-1]
    gain = (spec.scale / std).astype(np.float32)
    offset = (mean / std).astype(np.float32)
    h, w, c = pixels.shape
    if spec.layout == "NCHW":
        src = pixels.transpose(2, 0, 1)
        gain, offset = gain.reshape(-1, 1, 1), offset.reshape(-1, 1, 1)
        out = np.empty((1, c, h, w), dtype=np.float32)
    else:
        src = pixels
        out = np.empty((1, h, w, c), dtype=np.float32)
    np.multiply(src, gain, out=out[0])
    np.subtract(out[0], offset, out=out[0])
    dtype = np.dtype(spec.dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        np.rint(out, out=out)
        np.clip(out, info.min, info.max, out=out)
    return out if dtype == np.float32 else out.astype(dtype)


def top_k(scores: np.ndarray, k: int) -> list[dict[str, float]]:
    """Top-``k`` classes of one sample's scores (logits), with softmax probabilities."""
    flat = scores.reshape(-1).astype(np.float64)
    k = max(1, min(k, flat.size))
    shifted = np.exp(flat - flat.max())
    probs = shifted / shifted.sum()
    order = np.argsort(-flat, kind="stable")[:k]
    return [{"index": int(i), "score": float(flat[i]), "probability": float(probs[i])}
            for i in order]


def classification(scores: np.ndarray, post: Postprocess, k: int) -> list[dict]:
    """Top-``k`` of one sample's scores, with the label of each class when the config has
    labels."""
    rows = top_k(scores, k)
    if post.labels:
        for row in rows:
            i = row["index"]
            row["label"] = post.labels[i] if i < len(post.labels) else str(i)
    return rows


def segmentation_mask(scores: np.ndarray, post: Postprocess, mask_format: str | None = None
                      ) -> dict:
    """The per-pixel argmax of one sample's ``(1, classes, H, W)`` scores: a PNG (8-bit for up
    to 256 classes, else 16-bit) in base64, or the class-index array as nested lists."""
    from PIL import Image

    scores = scores[0] if scores.ndim == 4 else scores
    if scores.ndim != 3:
        raise BadInputError(f"segmentation output {post.output!r} has shape "
                            f"{list(scores.shape)}; expected (1, classes, H, W)")
    mask = np.argmax(scores, axis=0)
    classes = int(scores.shape[0])
    doc = {"height": int(mask.shape[0]), "width": int(mask.shape[1]), "classes": classes,
           "classes_present": sorted(int(c) for c in np.unique(mask))}
    if post.labels:
        doc["labels_present"] = [post.labels[c] if c < len(post.labels) else str(c)
                                 for c in doc["classes_present"]]
    if (mask_format or post.mask_format) == "array":
        return {**doc, "format": "array", "data": mask.tolist()}
    buf = io.BytesIO()
    if classes <= 256:
        Image.fromarray(mask.astype(np.uint8)).save(buf, format="PNG")
    else:
        Image.fromarray(mask.astype(np.uint16)).save(buf, format="PNG")
    return {**doc, "format": "png", "encoding": "base64",
            "data": base64.b64encode(buf.getvalue()).decode("ascii")}


def frame_answer(outputs: dict[str, np.ndarray], post: Postprocess, default_output: str,
                 top: int | None = None, mask_format: str | None = None,
                 raw: bool | None = None) -> dict:
    """The frames answer's outputs part for one sample's ``outputs``: the raw tensors when
    ``raw`` (default: yes, except for a segmenter), ``top_k`` (``top``, default the config's)
    for a classifier, ``mask`` for a segmenter.  The scored output is the config's or else
    ``default_output``.  Segmentation encodes a PNG: call it off the event loop."""
    doc: dict = {}
    if raw if raw is not None else post.kind != "segmentation":
        doc["outputs"] = {name: {"shape": list(a.shape), "datatype": v2_datatype(a.dtype),
                                 "data": a.ravel().tolist()}
                          for name, a in outputs.items()}
    if post.kind == "classification":
        doc["top_k"] = classification(outputs[post.output or default_output], post,
                                      top or post.top_k)
    elif post.kind == "segmentation":
        doc["mask"] = segmentation_mask(outputs[post.output or default_output], post,
                                        mask_format)
    return doc
