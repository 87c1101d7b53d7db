"""Built-in demo models and the preprocessing metadata the server needs to decode frames.

``model_info(name)`` never imports torch; ``export_builtin(name, path)`` does (it exports the
PyTorch definition in :mod:`ppipe_trt.models.demo_nets` to ONNX with a dynamic batch axis).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ppipe_trt.errors import BadInputError, BackendUnavailableError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """How to feed a model: one NCHW float32 image input of ``channels x height x width``.

    Preprocessing: RGB pixels scaled to [0, 1], then ``(x - mean[c]) / std[c]`` per channel,
    resized to ``height x width``.  ``num_classes`` is the classifier's label count (or the
    detector's / segmenter's class count).
    """

    name: str
    task: str                      # "classification" | "detection" | "segmentation"
    input_name: str
    layout: str                    # always "NCHW"
    channels: int
    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int
    output_names: tuple[str, ...]
    dtype: str = "float32"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Per-sample input shape (C, H, W)."""
        return (self.channels, self.height, self.width)


_INFOS = {
    "demo_resnet": ModelInfo("demo_resnet", "classification", "image", "NCHW", 3, 224, 224,
                             IMAGENET_MEAN, IMAGENET_STD, 1000, ("logits",)),
    "demo_detector": ModelInfo("demo_detector", "detection", "image", "NCHW", 3, 256, 256,
                               IMAGENET_MEAN, IMAGENET_STD, 20,
                               ("cls_p5", "box_p5", "cls_p4", "box_p4", "cls_p3", "box_p3")),
    "demo_unet": ModelInfo("demo_unet", "segmentation", "image", "NCHW", 3, 256, 256,
                           IMAGENET_MEAN, IMAGENET_STD, 4, ("mask",)),
}

#: Names of the built-in demo models, in the order ``make engines MODEL=all`` builds them.
BUILTIN_MODELS: tuple[str, ...] = tuple(_INFOS)


def model_info(name: str) -> ModelInfo:
    """Preprocessing metadata of a built-in model; raises BadInputError for an unknown name."""
    try:
        return _INFOS[name]
    except KeyError:
        raise BadInputError(f"unknown built-in model {name!r}; expected one of "
                            f"{', '.join(BUILTIN_MODELS)}") from None


def export_builtin(name: str, path: Path | str) -> Path:
    """Export built-in model ``name`` to ONNX at ``path`` (needs torch; deterministic)."""
    info = model_info(name)
    try:
        from ppipe_trt.models.demo_nets import export_demo_onnx
    except ImportError as exc:
        raise BackendUnavailableError(
            f"PyTorch is not installed: {exc}; it is needed to export the built-in model "
            f"{name!r} (pip install torch)") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    export_demo_onnx(name, tmp, info.input_shape, info.input_name, info.output_names)
    tmp.replace(path)
    return path


__all__ = ["ModelInfo", "model_info", "export_builtin", "BUILTIN_MODELS"]
