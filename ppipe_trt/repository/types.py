"""What a model repository entry declares: tensors, batching, SLO, pre- and postprocessing.

These records are the boundary between the repository (``config.pbtxt`` / ``config.yaml``),
the engine store (a copy is kept beside each build as ``model_config.json``) and the data
plane (the frames endpoint decodes and answers with them).  They import nothing heavy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESIZE_MODES = ("stretch", "shorter_side_crop", "letterbox")
LAYOUTS = ("NCHW", "NHWC")
CHANNEL_ORDERS = ("RGB", "BGR")
POSTPROCESS_KINDS = ("classification", "segmentation", "raw")
MASK_FORMATS = ("png", "array")


@dataclass(frozen=True, slots=True)
class TensorConfig:
    """One declared input or output: ``dims`` exclude the batch dimension (as in Triton's
    ``config.pbtxt`` with ``max_batch_size > 0``); ``dtype`` is a numpy dtype name."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    format: str | None = None          # "NCHW" | "NHWC" for image inputs, else None
    label_filename: str | None = None  # outputs: Triton's classification labels file


@dataclass(frozen=True, slots=True)
class ImageSpec:
    """How a frame (JPEG/PNG) becomes the model's input tensor.

    Decode to RGB (``channel_order`` "BGR" swaps the channels afterwards; ``channels`` 1:
    grayscale), resize to
    ``height`` x ``width`` pixels with ``resize_mode`` ("stretch": to the exact size;
    "shorter_side_crop": scale the shorter side to fit, then centre-crop; "letterbox": scale
    to fit inside, pad with ``pad_value``), then per channel ``(pixel * scale - mean) / std``
    with pixels in 0..255, in ``layout`` with a batch dimension of 1, cast to ``dtype``.
    """

    input_name: str
    height: int
    width: int
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    scale: float = 1.0 / 255.0
    resize_mode: str = "stretch"
    layout: str = "NCHW"
    channel_order: str = "RGB"
    dtype: str = "float32"
    pad_value: int = 0
    channels: int = 3  # 3: RGB/BGR; 1: grayscale


@dataclass(frozen=True, slots=True)
class Postprocess:
    """What the frames endpoint adds to the raw outputs.

    ``kind`` "classification": top-``top_k`` of ``output`` with softmax probabilities and
    labels (``labels``, index order); "segmentation": the per-pixel argmax of ``output``
    (N, classes, H, W) as a PNG mask (``mask_format`` "png", base64) or a class-index array;
    "raw": the output tensors only.
    """

    kind: str = "raw"
    output: str | None = None
    top_k: int = 5
    labels: tuple[str, ...] = ()
    mask_format: str = "png"


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """A model of the repository, resolved: its ONNX file and everything its config says.

    ``slo_ms`` is ``None`` when the config sets none (the server then derives one from the
    profile and says so); ``builtin`` names a built-in demo model whose ONNX file the project
    exports into the repository when it is missing.
    """

    name: str
    version: int
    onnx_path: Path
    config_path: Path
    max_batch: int
    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]
    slo_ms: float | None = None
    weight: float = 1.0
    image: ImageSpec | None = None
    postprocess: Postprocess = field(default_factory=Postprocess)
    platform: str = "onnxruntime_onnx"
    builtin: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (paths as strings), read back by :meth:`from_json`."""
        d = asdict(self)
        d["onnx_path"], d["config_path"] = str(self.onnx_path), str(self.config_path)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ModelEntry":
        image = d.get("image")
        post = dict(d.get("postprocess") or {})
        post["labels"] = tuple(post.get("labels", ()))
        return cls(
            name=d["name"], version=int(d["version"]), onnx_path=Path(d["onnx_path"]),
            config_path=Path(d["config_path"]), max_batch=int(d["max_batch"]),
            inputs=tuple(_tensor(t) for t in d["inputs"]),
            outputs=tuple(_tensor(t) for t in d["outputs"]),
            slo_ms=d.get("slo_ms"), weight=float(d.get("weight", 1.0)),
            image=None if image is None else ImageSpec(**{
                **image, "mean": tuple(image["mean"]), "std": tuple(image["std"])}),
            postprocess=Postprocess(**post), platform=d.get("platform", "onnxruntime_onnx"),
            builtin=d.get("builtin"))


def _tensor(d: dict[str, Any]) -> TensorConfig:
    return TensorConfig(d["name"], d["dtype"], tuple(int(x) for x in d["dims"]),
                        d.get("format"), d.get("label_filename"))


__all__ = ["TensorConfig", "ImageSpec", "Postprocess", "ModelEntry", "RESIZE_MODES", "LAYOUTS",
           "CHANNEL_ORDERS", "POSTPROCESS_KINDS", "MASK_FORMATS"]
