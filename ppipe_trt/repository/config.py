"""Reading a Triton-layout model repository: ``<repo>/<name>/config.pbtxt`` (or
``config.yaml``) and ``<repo>/<name>/<version>/model.onnx``.

``config.pbtxt`` is parsed with protobuf's ``text_format`` into the ``ModelConfig`` message
tritonclient ships (Triton's own ``model_config.proto``), so a Triton user's file is read
exactly as Triton reads it.  ppipe-trt's own settings go in the config's ``parameters`` map
(string values), all optional::

    slo_ms, weight                               the planner's SLO (ms) and weight
    max_batch                                    max batch when max_batch_size is 0
    image_input, resize ("HxW"), resize_mode, mean ("r,g,b"), std, scale, channel_order,
    layout, pad_value                            frames preprocessing (see ImageSpec)
    postprocess, postprocess_output, top_k, labels, mask_format
    builtin                                      a built-in demo model exported when missing

``config.yaml`` holds the same: Triton's fields in their JSON form (``max_batch_size``,
``input``, ``output``, ...) plus ``slo_ms``, ``weight``, ``builtin`` and the sections
``preprocess:`` and ``postprocess:`` with the keys above (``resize: [H, W]``, lists for
``mean``/``std``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from ppipe_trt.errors import ConfigError
from ppipe_trt.repository.types import (CHANNEL_ORDERS, LAYOUTS, MASK_FORMATS, POSTPROCESS_KINDS,
                                        RESIZE_MODES, ImageSpec, ModelEntry, Postprocess,
                                        TensorConfig)

CONFIG_NAMES = ("config.pbtxt", "config.yaml", "config.yml")
DEFAULT_MAX_BATCH = 8
SUPPORTED_PLATFORMS = ("onnxruntime_onnx", "")
_PREPROCESS_KEYS = ("image_input", "resize", "resize_mode", "mean", "std", "scale",
                    "channel_order", "layout", "pad_value", "dtype")
_POSTPROCESS_KEYS = ("postprocess", "postprocess_output", "top_k", "labels", "mask_format")
_TOP_LEVEL_KEYS = ("slo_ms", "weight", "builtin", "max_batch")

#: Triton's TYPE_* names -> numpy dtype names (TYPE_STRING/BF16 have no ONNX Runtime feed here).
TRITON_TO_NUMPY = {
    "TYPE_BOOL": "bool", "TYPE_UINT8": "uint8", "TYPE_UINT16": "uint16",
    "TYPE_UINT32": "uint32", "TYPE_UINT64": "uint64", "TYPE_INT8": "int8",
    "TYPE_INT16": "int16", "TYPE_INT32": "int32", "TYPE_INT64": "int64",
    "TYPE_FP16": "float16", "TYPE_FP32": "float32", "TYPE_FP64": "float64",
}
NUMPY_TO_TRITON = {v: k for k, v in TRITON_TO_NUMPY.items()}


def _model_config_pb2():
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def find_config(model_dir: Path) -> Path:
    for name in CONFIG_NAMES:
        if (model_dir / name).is_file():
            return model_dir / name
    raise ConfigError(f"{model_dir}: no config.pbtxt or config.yaml; expected Triton's layout "
                      "<repo>/<name>/config.pbtxt and <repo>/<name>/<version>/model.onnx")


def read_model_config(path: Path) -> tuple[Any, dict[str, Any]]:
    """(ModelConfig message, ppipe settings as a flat dict of strings/lists) of one file."""
    from google.protobuf import json_format, text_format

    pb2 = _model_config_pb2()
    text = path.read_text()
    config = pb2.ModelConfig()
    settings: dict[str, Any] = {}
    if path.suffix == ".pbtxt":
        try:
            text_format.Parse(text, config)
        except text_format.ParseError as exc:
            raise ConfigError(f"{path}: not a valid Triton model configuration: {exc}") from None
        settings = {k: v.string_value for k, v in config.parameters.items()}
    else:
        import yaml

        try:
            doc = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        for key in _TOP_LEVEL_KEYS:
            if key in doc:
                settings[key] = doc.pop(key)
        pre, post = doc.pop("preprocess", None) or {}, doc.pop("postprocess", None) or {}
        if not isinstance(pre, dict) or not isinstance(post, dict):
            raise ConfigError(f"{path}: 'preprocess' and 'postprocess' must be mappings")
        unknown = sorted(set(pre) - {"input", *_PREPROCESS_KEYS}) + sorted(
            set(post) - {"kind", "output", "top_k", "labels", "mask_format"})
        if unknown:
            raise ConfigError(f"{path}: unknown preprocess/postprocess keys {unknown}")
        if "input" in pre:
            pre["image_input"] = pre.pop("input")
        settings.update(pre)
        settings.update({("postprocess" if k == "kind" else "postprocess_output" if k == "output"
                          else k): v for k, v in post.items()})
        try:
            json_format.ParseDict(doc, config)
        except json_format.ParseError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        settings.update({k: v.string_value for k, v in config.parameters.items()
                         if k not in settings})
    return config, settings


def _number(settings: dict[str, Any], key: str, path: Path, kind=float, default=None):
    if key not in settings or settings[key] in ("", None):
        return default
    try:
        return kind(settings[key])
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: parameter {key}={settings[key]!r}; expected a "
                          f"{'number' if kind is float else 'whole number'}") from None


def _floats(settings: dict[str, Any], key: str, path: Path) -> tuple[float, ...] | None:
    value = settings.get(key)
    if value in (None, ""):
        return None
    items = value if isinstance(value, (list, tuple)) else str(value).replace(" ", "").split(",")
    try:
        return tuple(float(v) for v in items)
    except ValueError:
        raise ConfigError(f"{path}: parameter {key}={value!r}; expected comma-separated "
                          "numbers like 0.485,0.456,0.406") from None


def _choice(settings: dict[str, Any], key: str, allowed: tuple[str, ...], path: Path,
            default: str | None) -> str | None:
    value = settings.get(key)
    if value in (None, ""):
        return default
    if value not in allowed:
        raise ConfigError(f"{path}: parameter {key}={value!r}; expected one of {list(allowed)}")
    return value


def _tensors(items, path: Path, kind: str, batching_dims: bool) -> tuple[TensorConfig, ...]:
    pb2 = _model_config_pb2()
    out = []
    for t in items:
        type_name = pb2.DataType.Name(t.data_type)
        if type_name not in TRITON_TO_NUMPY:
            raise ConfigError(f"{path}: {kind} {t.name!r} has data_type {type_name}; expected "
                              f"one of {sorted(TRITON_TO_NUMPY)}")
        dims = tuple(int(d) for d in t.dims)
        if batching_dims:  # max_batch_size 0 with an explicit leading batch dimension
            dims = dims[1:]
        fmt = None
        if kind == "input" and t.format:
            fmt = pb2.ModelInput.Format.Name(t.format).removeprefix("FORMAT_")
            fmt = None if fmt == "NONE" else fmt
        label = getattr(t, "label_filename", "") or None
        out.append(TensorConfig(t.name, TRITON_TO_NUMPY[type_name], dims, fmt, label))
    return tuple(out)


def _version_dir(model_dir: Path, config, filename: str, builtin: str | None) -> tuple[int, Path]:
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    policy = config.version_policy.WhichOneof("policy_choice")
    if policy == "specific":
        wanted = set(config.version_policy.specific.versions)
        versions = [v for v in versions if v in wanted]
    for v in reversed(versions):
        if (model_dir / str(v) / filename).is_file():
            return v, model_dir / str(v) / filename
    if builtin:
        v = versions[-1] if versions else 1
        return v, model_dir / str(v) / filename
    raise ConfigError(f"{model_dir}: no version directory holds {filename} (looked in "
                      f"{[str(v) for v in versions] or 'none'}); expected "
                      f"{model_dir}/1/{filename}")


def load_model_entry(model_dir: Path | str) -> ModelEntry:
    """Read one repository entry and check it against its ONNX file (exported first for a
    ``builtin`` demo model whose file is missing); tensors the config omits come from the
    model."""
    model_dir = Path(model_dir)
    path = find_config(model_dir)
    config, settings = read_model_config(path)
    name = config.name or model_dir.name
    if name != model_dir.name:
        raise ConfigError(f"{path}: name {name!r} differs from its directory {model_dir.name!r}; "
                          "Triton requires them equal")
    platform = config.platform or ("onnxruntime_onnx" if config.backend in ("", "onnxruntime")
                                   else config.backend)
    if platform not in SUPPORTED_PLATFORMS:
        raise ConfigError(f"{path}: platform/backend {platform!r} is not supported; ppipe-trt "
                          "serves ONNX models (platform: \"onnxruntime_onnx\")")
    items = list(config.input) + list(config.output)
    batching_dims = False
    max_batch = int(config.max_batch_size)
    if max_batch == 0:
        if items and all(t.dims and t.dims[0] == -1 for t in items):
            batching_dims = True  # Triton's non-batching form with an explicit batch dim
            max_batch = _number(settings, "max_batch", path, int, DEFAULT_MAX_BATCH)
        elif not items:
            max_batch = _number(settings, "max_batch", path, int, DEFAULT_MAX_BATCH)
        else:
            raise ConfigError(
                f"{path}: max_batch_size is 0 and the dims have no leading -1 batch "
                "dimension; ppipe-trt batches requests through pipelines: set max_batch_size "
                ">= 1 with dims excluding the batch dimension")
    if not 1 <= max_batch <= 256:
        raise ConfigError(f"{path}: max batch {max_batch}; expected 1..256")
    builtin = settings.get("builtin") or None
    version, onnx_path = _version_dir(model_dir, config, config.default_model_filename
                                      or "model.onnx", builtin)
    inputs = _tensors(config.input, path, "input", batching_dims)
    outputs = _tensors(config.output, path, "output", batching_dims)
    slo_ms = _number(settings, "slo_ms", path)
    if slo_ms is not None and not slo_ms > 0:
        raise ConfigError(f"{path}: parameter slo_ms={slo_ms}; expected > 0 (milliseconds)")
    weight = _number(settings, "weight", path, default=1.0)
    if not weight > 0:
        raise ConfigError(f"{path}: parameter weight={weight}; expected > 0")
    entry = ModelEntry(
        name=name, version=version, onnx_path=onnx_path, config_path=path,
        max_batch=max_batch, inputs=inputs, outputs=outputs, slo_ms=slo_ms, weight=weight,
        platform=platform, builtin=builtin)
    if builtin and not onnx_path.is_file():
        from ppipe_trt.models import export_builtin

        export_builtin(builtin, onnx_path)
    from ppipe_trt.repository.validate import resolve_against_onnx

    entry = resolve_against_onnx(entry)
    return dataclasses.replace(
        entry, image=_image_spec(settings, entry.inputs, path),
        postprocess=_postprocess(settings, entry.outputs, path, model_dir))


def _image_spec(settings: dict[str, Any], inputs: tuple[TensorConfig, ...],
                path: Path) -> ImageSpec | None:
    """The frames preprocessing, or None when the config asks for none (no preprocessing
    parameter and no input declared with an image ``format``)."""
    asked = any(k in settings for k in _PREPROCESS_KEYS)
    formatted = [t for t in inputs if t.format]
    if not asked and len(formatted) != 1:
        return None
    name = settings.get("image_input") or (formatted[0].name if len(formatted) == 1 else None)
    if name is None:
        if len(inputs) != 1:
            raise ConfigError(f"{path}: preprocessing is set but the image input is not named; "
                              "add parameters image_input (one of "
                              f"{[t.name for t in inputs] or 'the model inputs'})")
        name = inputs[0].name
    tensor = next((t for t in inputs if t.name == name), None)
    if tensor is None and inputs:
        raise ConfigError(f"{path}: image_input {name!r} is not a declared input "
                          f"({[t.name for t in inputs]})")
    layout = _choice(settings, "layout", LAYOUTS, path, tensor.format if tensor else None)
    height = width = None
    channels = 3
    if settings.get("resize") not in (None, ""):
        raw = settings["resize"]
        parts = raw if isinstance(raw, (list, tuple)) else str(raw).lower().split("x")
        try:
            height, width = (int(v) for v in parts)
        except ValueError:
            raise ConfigError(f"{path}: parameter resize={raw!r}; expected HxW like 224x224")
    if tensor is not None and tensor.dims:
        if len(tensor.dims) != 3:
            raise ConfigError(f"{path}: image input {name!r} has dims {list(tensor.dims)}; "
                              "expected 3 dims per sample (C,H,W or H,W,C)")
        if layout is None:
            layout = "NHWC" if tensor.dims[-1] in (1, 3) and tensor.dims[0] not in (1, 3) else "NCHW"
        h, w = (tensor.dims[1:] if layout == "NCHW" else tensor.dims[:2])
        channels = tensor.dims[0] if layout == "NCHW" else tensor.dims[-1]
        if channels not in (1, 3):
            raise ConfigError(f"{path}: image input {name!r} has {channels} channels in layout "
                              f"{layout} (dims {list(tensor.dims)}); frames need 1 or 3 (set "
                              "parameters layout if the layout is wrong)")
        if settings.get("resize") not in (None, "") and (height, width) != (h, w):
            raise ConfigError(f"{path}: resize {height}x{width} differs from input {name!r}'s "
                              f"{h}x{w}")
        height, width = height or h, width or w
    if height is None or width is None or not (height > 0 and width > 0):
        raise ConfigError(f"{path}: the image size of input {name!r} is unknown; declare its "
                          "dims or add parameters resize: \"HxW\"")
    # ImageNet's statistics for colour inputs, none (0..1 after scale) for grayscale
    mean = _floats(settings, "mean", path) or ((0.485, 0.456, 0.406) if channels == 3 else (0.0,))
    std = _floats(settings, "std", path) or ((0.229, 0.224, 0.225) if channels == 3 else (1.0,))
    if len(mean) != len(std) or len(mean) not in (1, channels) or any(s == 0 for s in std):
        raise ConfigError(f"{path}: mean {list(mean)} and std {list(std)}; expected 1 or "
                          f"{channels} (the input's channels) values each, std non-zero")
    dtype = settings.get("dtype") or (tensor.dtype if tensor else "float32")
    try:
        np.dtype(dtype)
    except TypeError:
        raise ConfigError(f"{path}: parameter dtype={dtype!r}; expected a numpy dtype name")
    return ImageSpec(
        input_name=name, height=int(height), width=int(width), mean=mean, std=std,
        scale=_number(settings, "scale", path, default=1.0 / 255.0),
        resize_mode=_choice(settings, "resize_mode", RESIZE_MODES, path, "stretch"),
        layout=layout or "NCHW",
        channel_order=_choice(settings, "channel_order", CHANNEL_ORDERS, path, "RGB"),
        dtype=np.dtype(dtype).name, pad_value=_number(settings, "pad_value", path, int, 0),
        channels=int(channels))


def _postprocess(settings: dict[str, Any], outputs: tuple[TensorConfig, ...], path: Path,
                 model_dir: Path) -> Postprocess:
    labelled = [t for t in outputs if t.label_filename]
    kind = _choice(settings, "postprocess", POSTPROCESS_KINDS, path,
                   "classification" if labelled else "raw")
    output = settings.get("postprocess_output") or (labelled[0].name if labelled else None)
    if output is None and kind != "raw" and outputs:
        output = outputs[0].name
    if output is not None and outputs and output not in {t.name for t in outputs}:
        raise ConfigError(f"{path}: postprocess_output {output!r} is not a declared output "
                          f"({[t.name for t in outputs]})")
    label_file = settings.get("labels") or (
        next((t.label_filename for t in outputs if t.name == output and t.label_filename), None))
    labels: tuple[str, ...] = ()
    if label_file:
        lp = (model_dir / label_file).resolve()
        if model_dir.resolve() not in lp.parents:
            raise ConfigError(f"{path}: labels file {label_file!r} is outside the model "
                              f"directory {model_dir}")
        if not lp.is_file():
            raise ConfigError(f"{path}: labels file {lp} not found")
        labels = tuple(line.strip() for line in lp.read_text().splitlines())
        while labels and not labels[-1]:
            labels = labels[:-1]
    top_k = _number(settings, "top_k", path, int, 5)
    if not 1 <= top_k <= 1000:
        raise ConfigError(f"{path}: top_k={top_k}; expected 1..1000")
    return Postprocess(kind=kind, output=output, top_k=top_k, labels=labels,
                       mask_format=_choice(settings, "mask_format", MASK_FORMATS, path, "png"))


def load_repository(root: Path | str) -> dict[str, ModelEntry]:
    """Every model of the repository at ``root`` by name (directories without a config file
    are skipped only if they hold no model file either; otherwise they are an error)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"model repository {root} is not a directory")
    entries = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not any((d / n).is_file() for n in CONFIG_NAMES) and not any(d.glob("*/*.onnx")):
            continue
        entries[d.name] = load_model_entry(d)
    if not entries:
        raise ConfigError(f"model repository {root} holds no model (expected "
                          "<name>/config.pbtxt with <name>/1/model.onnx)")
    return entries


__all__ = ["load_repository", "load_model_entry", "read_model_config", "find_config",
           "TRITON_TO_NUMPY", "NUMPY_TO_TRITON", "DEFAULT_MAX_BATCH"]
