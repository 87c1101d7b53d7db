"""Small PyTorch CNNs of the families users bring, to export to ONNX and build in tests.

Each family reproduces the graph patterns its real counterpart exports (written the way
torchvision writes them) at a size that builds in seconds on a CPU: input 3x64x64 or
smaller, at most a few hundred thousand parameters, yet enough ONNX nodes to split into
several blocks.

- ``mobilenet_se``: depthwise-separable inverted residuals, squeeze-excitation, hardswish.
- ``shufflenet``: channel shuffle (``view(batchsize, ...)`` / transpose / ``view``) and
  chunk / concat branches.
- ``inception``: parallel 1x1, 3x3, double-3x3 and pooling branches, concatenated.
- ``deeplab_aspp``: backbone + ASPP (dilated convs, global pooling branch upsampled to the
  feature's size) + head, upsampled back to the input's size: a segmenter (output "mask").
- ``convnext``: 7x7 depthwise conv, channels-last LayerNorm, Linear/GELU MLP, layer scale.
- ``fpn_detector``: backbone + FPN (lateral 1x1, top-down upsample to the lateral's size)
  + per-level class and box heads, six outputs.
- ``resnet_flatten``: a small ResNet flattened with ``x.view(x.size(0), -1)``.

Weights come from a fixed seed (BatchNorm statistics too, so no BatchNorm is an identity),
modules are in eval mode, and every export of a family is identical.  This module imports
without torch; the functions that need it import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

SEED = 20250917
DETECTION_OUTPUTS = ("cls_p3", "box_p3", "cls_p4", "box_p4", "cls_p5", "box_p5")


@dataclass(frozen=True, slots=True)
class FamilySpec:
    """How to feed one zoo model: one float32 NCHW input ``input_name`` of per-sample shape
    ``input_shape`` (C, H, W) with a dynamic batch axis; outputs in ``output_names`` order."""

    name: str
    task: str                       # "classification" | "segmentation" | "detection"
    input_name: str
    input_shape: tuple[int, int, int]
    output_names: tuple[str, ...]
    num_classes: int


FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in (
    FamilySpec("mobilenet_se", "classification", "input", (3, 64, 64), ("logits",), 10),
    FamilySpec("shufflenet", "classification", "input", (3, 64, 64), ("logits",), 10),
    FamilySpec("inception", "classification", "input", (3, 64, 64), ("logits",), 10),
    FamilySpec("deeplab_aspp", "segmentation", "input", (3, 64, 64), ("mask",), 5),
    FamilySpec("convnext", "classification", "input", (3, 64, 64), ("logits",), 10),
    FamilySpec("fpn_detector", "detection", "input", (3, 64, 64), DETECTION_OUTPUTS, 6),
    FamilySpec("resnet_flatten", "classification", "input", (3, 64, 64), ("logits",), 10),
)}


def _spec(name: str) -> FamilySpec:
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; expected one of "
                       f"{', '.join(FAMILIES)}") from None


def _define_families() -> dict:
    """The family classes, defined on first use so that importing this module needs no torch.
    Returns {family name: class taking ``num_classes``}."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
                dilation: int = 1, act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
        layers = [nn.Conv2d(cin, cout, k, stride, dilation * (k // 2), dilation, groups,
                            bias=False), nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(act(inplace=True))
        return nn.Sequential(*layers)

    def classifier(cin: int, num_classes: int) -> nn.Sequential:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(cin, num_classes))

    # -- mobilenet_se -------------------------------------------------------------------
    class SqueezeExcitation(nn.Module):
        def __init__(self, channels: int, squeeze: int):
            super().__init__()
            self.fc1 = nn.Conv2d(channels, squeeze, 1)
            self.fc2 = nn.Conv2d(squeeze, channels, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scale = F.adaptive_avg_pool2d(x, 1)
            scale = F.hardsigmoid(self.fc2(F.relu(self.fc1(scale))))
            return x * scale

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, expand: int, cout: int, k: int, stride: int, se: bool,
                     act: type[nn.Module]):
            super().__init__()
            self.residual = stride == 1 and cin == cout
            self.block = nn.Sequential(
                conv_bn(cin, expand, 1, act=act),
                conv_bn(expand, expand, k, stride, groups=expand, act=act),
                SqueezeExcitation(expand, max(8, expand // 4)) if se else nn.Identity(),
                conv_bn(expand, cout, 1, act=None))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.block(x)
            return out + x if self.residual else out

    class MobileNetSE(nn.Module):
        """MobileNetV3-small layout at reduced width."""

        def __init__(self, num_classes: int):
            super().__init__()
            hs, re = nn.Hardswish, nn.ReLU
            self.features = nn.Sequential(
                conv_bn(3, 16, 3, 2, act=hs),
                InvertedResidual(16, 16, 16, 3, 2, True, re),
                InvertedResidual(16, 48, 24, 3, 2, False, re),
                InvertedResidual(24, 64, 24, 3, 1, False, re),
                InvertedResidual(24, 64, 32, 5, 2, True, hs),
                InvertedResidual(32, 96, 32, 5, 1, True, hs),
                InvertedResidual(32, 96, 48, 5, 1, True, hs),
                conv_bn(48, 128, 1, act=hs))
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                                      nn.Linear(128, 160), nn.Hardswish(inplace=True),
                                      nn.Linear(160, num_classes))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x))

    # -- shufflenet ---------------------------------------------------------------------
    def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
        # torchvision's shufflenetv2.channel_shuffle, verbatim: the sizes are traced tensors
        batchsize, num_channels, height, width = x.size()
        channels_per_group = num_channels // groups
        x = x.view(batchsize, groups, channels_per_group, height, width)
        x = torch.transpose(x, 1, 2).contiguous()
        return x.view(batchsize, num_channels, height, width)

    class ShuffleUnit(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.stride = stride
            half = cout // 2
            if stride > 1:
                self.branch1 = nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin, act=None),
                                             conv_bn(cin, half, 1))
            self.branch2 = nn.Sequential(
                conv_bn(cin if stride > 1 else half, half, 1),
                conv_bn(half, half, 3, stride, groups=half, act=None),
                conv_bn(half, half, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.stride == 1:
                x1, x2 = x.chunk(2, dim=1)
                out = torch.cat((x1, self.branch2(x2)), dim=1)
            else:
                out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
            return channel_shuffle(out, 2)

    class ShuffleNet(nn.Module):
        """ShuffleNetV2 layout: stages of one strided unit then stride-1 units."""

        def __init__(self, num_classes: int):
            super().__init__()
            self.stem = nn.Sequential(conv_bn(3, 16, 3, 2), nn.MaxPool2d(3, 2, 1))
            units = []
            cin = 16
            for cout, repeats in ((32, 2), (64, 3), (96, 2)):
                units.append(ShuffleUnit(cin, cout, 2))
                units += [ShuffleUnit(cout, cout, 1) for _ in range(repeats - 1)]
                cin = cout
            self.stages = nn.Sequential(*units)
            self.conv5 = conv_bn(cin, 192, 1)
            self.fc = nn.Linear(192, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv5(self.stages(self.stem(x)))
            return self.fc(x.mean([2, 3]))  # torchvision's global pool

    # -- inception ----------------------------------------------------------------------
    class InceptionBlock(nn.Module):
        def __init__(self, cin: int, b1: int, b3: tuple[int, int], b5: tuple[int, int],
                     pool: int):
            super().__init__()
            self.branch1 = conv_bn(cin, b1, 1)
            self.branch3 = nn.Sequential(conv_bn(cin, b3[0], 1), conv_bn(b3[0], b3[1], 3))
            self.branch5 = nn.Sequential(conv_bn(cin, b5[0], 1), conv_bn(b5[0], b5[1], 3),
                                         conv_bn(b5[1], b5[1], 3))
            self.branch_pool = nn.Sequential(nn.AvgPool2d(3, 1, 1), conv_bn(cin, pool, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x),
                              self.branch_pool(x)], 1)

    class Inception(nn.Module):
        """GoogLeNet / Inception-v3 layout: stem, blocks of four concatenated branches."""

        def __init__(self, num_classes: int):
            super().__init__()
            self.stem = nn.Sequential(conv_bn(3, 16, 3, 2), conv_bn(16, 32, 3),
                                      nn.MaxPool2d(3, 2, 1))
            self.block3a = InceptionBlock(32, 16, (16, 24), (8, 12), 12)      # -> 64
            self.block3b = InceptionBlock(64, 24, (24, 32), (12, 16), 16)     # -> 88
            self.pool = nn.MaxPool2d(3, 2, 1)
            self.block4a = InceptionBlock(88, 32, (24, 40), (12, 16), 16)     # -> 104
            self.block4b = InceptionBlock(104, 32, (32, 48), (16, 24), 24)    # -> 128
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Dropout(0.2),
                                      nn.Linear(128, num_classes))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.block3b(self.block3a(self.stem(x)))
            return self.head(self.block4b(self.block4a(self.pool(x))))

    # -- deeplab_aspp -------------------------------------------------------------------
    class ASPPPooling(nn.Sequential):
        def __init__(self, cin: int, cout: int):
            super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # torchvision's deeplabv3.ASPPPooling: upsample to the feature's traced size
            size = x.shape[-2:]
            for mod in self:
                x = mod(x)
            return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    class ASPP(nn.Module):
        def __init__(self, cin: int, rates: tuple[int, ...], cout: int):
            super().__init__()
            branches = [conv_bn(cin, cout, 1)]
            branches += [conv_bn(cin, cout, 3, dilation=r) for r in rates]
            branches.append(ASPPPooling(cin, cout))
            self.convs = nn.ModuleList(branches)
            self.project = nn.Sequential(conv_bn(len(branches) * cout, cout, 1), nn.Dropout(0.5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))

    class DeepLabASPP(nn.Module):
        """DeepLabV3 with a MobileNet-style backbone at output stride 8."""

        def __init__(self, num_classes: int):
            super().__init__()
            self.backbone = nn.Sequential(
                conv_bn(3, 16, 3, 2, act=nn.Hardswish),
                InvertedResidual(16, 32, 24, 3, 2, False, nn.ReLU),
                InvertedResidual(24, 72, 24, 3, 1, False, nn.ReLU),
                InvertedResidual(24, 72, 40, 5, 2, True, nn.Hardswish),
                InvertedResidual(40, 96, 40, 5, 1, True, nn.Hardswish))
            self.aspp = ASPP(40, (2, 4, 6), 32)
            self.head = nn.Sequential(conv_bn(32, 32, 3), nn.Conv2d(32, num_classes, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            input_shape = x.shape[-2:]
            out = self.head(self.aspp(self.backbone(x)))
            return F.interpolate(out, size=input_shape, mode="bilinear", align_corners=False)

    # -- convnext -----------------------------------------------------------------------
    class LayerNorm2d(nn.LayerNorm):
        """torchvision's convnext.LayerNorm2d: LayerNorm over channels of an NCHW tensor."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.permute(0, 2, 3, 1)
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
            return x.permute(0, 3, 1, 2)

    class Permute(nn.Module):
        def __init__(self, dims: tuple[int, ...]):
            super().__init__()
            self.dims = dims

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.permute(x, self.dims)

    class CNBlock(nn.Module):
        def __init__(self, dim: int):
            super().__init__()
            self.block = nn.Sequential(
                nn.Conv2d(dim, dim, 7, padding=3, groups=dim),
                Permute((0, 2, 3, 1)), nn.LayerNorm(dim, eps=1e-6),
                nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim),
                Permute((0, 3, 1, 2)))
            # torchvision starts at 1e-6, which would hide the block; a trained value instead
            self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 0.5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.layer_scale * self.block(x)

    class ConvNeXt(nn.Module):
        """ConvNeXt-T layout at reduced width and depth: patchify stem, stages separated
        by LayerNorm2d + 2x2 strided conv."""

        def __init__(self, num_classes: int):
            super().__init__()
            dims, depths = (24, 48, 96), (1, 2, 1)
            layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4),
                                                     LayerNorm2d(dims[0], eps=1e-6))]
            for i, (dim, depth) in enumerate(zip(dims, depths)):
                if i > 0:
                    layers.append(nn.Sequential(LayerNorm2d(dims[i - 1], eps=1e-6),
                                                nn.Conv2d(dims[i - 1], dim, 2, 2)))
                layers += [CNBlock(dim) for _ in range(depth)]
            self.features = nn.Sequential(*layers)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1),
                                            nn.Linear(dims[-1], num_classes))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.avgpool(self.features(x)))

    # -- fpn_detector and resnet_flatten ------------------------------------------------
    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = conv_bn(cin, cout, 3, stride)
            self.conv2 = conv_bn(cout, cout, 3, act=None)
            self.down = (conv_bn(cin, cout, 1, stride, act=None)
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.conv2(self.conv1(x)) + self.down(x))

    class FPNDetector(nn.Module):
        """RetinaNet-style: backbone C3..C5 (strides 8..32), FPN whose top-down path is
        upsampled to each lateral's traced size (torchvision's FeaturePyramidNetwork), and
        class / box heads shared across levels."""

        def __init__(self, num_classes: int, widths=(16, 24, 32, 48), fpn: int = 32,
                     anchors: int = 3):
            super().__init__()
            self.stem = conv_bn(3, widths[0], 3, 2)
            self.c2 = BasicBlock(widths[0], widths[0], 2)
            self.c3 = BasicBlock(widths[0], widths[1], 2)
            self.c4 = BasicBlock(widths[1], widths[2], 2)
            self.c5 = BasicBlock(widths[2], widths[3], 2)
            self.lateral = nn.ModuleList(nn.Conv2d(c, fpn, 1) for c in widths[1:])
            self.smooth = nn.ModuleList(nn.Conv2d(fpn, fpn, 3, padding=1) for _ in widths[1:])
            self.cls_head = nn.Sequential(conv_bn(fpn, fpn), nn.Conv2d(fpn, anchors * num_classes,
                                                                       3, padding=1))
            self.box_head = nn.Sequential(conv_bn(fpn, fpn), nn.Conv2d(fpn, anchors * 4, 3,
                                                                       padding=1))

        def forward(self, x: torch.Tensor):
            c3 = self.c3(self.c2(self.stem(x)))
            c4 = self.c4(c3)
            c5 = self.c5(c4)
            inner = self.lateral[2](c5)
            levels = [self.smooth[2](inner)]
            for feat, lateral, smooth in ((c4, self.lateral[1], self.smooth[1]),
                                          (c3, self.lateral[0], self.smooth[0])):
                lat = lateral(feat)
                inner = lat + F.interpolate(inner, size=lat.shape[-2:], mode="nearest")
                levels.insert(0, smooth(inner))
            outs = []
            for level in levels:  # p3, p4, p5
                outs += [self.cls_head(level), self.box_head(level)]
            return tuple(outs)

    class ResNetFlatten(nn.Module):
        """ResNet-18 layout at reduced width, one block per stage, flattened with
        ``view(x.size(0), -1)`` as older model code writes it."""

        def __init__(self, num_classes: int, widths=(16, 32, 48, 64)):
            super().__init__()
            self.stem = nn.Sequential(conv_bn(3, widths[0], 5, 2), nn.MaxPool2d(3, 2, 1))
            chans = (widths[0],) + tuple(widths)
            self.layers = nn.Sequential(*[BasicBlock(chans[i], chans[i + 1], 1 if i == 0 else 2)
                                          for i in range(4)])
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(widths[-1], num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.avgpool(self.layers(self.stem(x)))
            x = x.view(x.size(0), -1)
            return self.fc(x)

    return {"mobilenet_se": MobileNetSE, "shufflenet": ShuffleNet, "inception": Inception,
            "deeplab_aspp": DeepLabASPP, "convnext": ConvNeXt, "fpn_detector": FPNDetector,
            "resnet_flatten": ResNetFlatten}


_CLASSES: dict | None = None


def build_module(name: str) -> "torch.nn.Module":
    """A fresh module of family ``name`` in eval mode; its weights and BatchNorm statistics
    come from a fixed seed (the global torch RNG is left as it was)."""
    global _CLASSES
    import torch
    from torch import nn

    spec = _spec(name)
    if _CLASSES is None:
        _CLASSES = _define_families()
    gen = torch.Generator().manual_seed(SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        module = _CLASSES[name](spec.num_classes)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 0.5 + 0.75)
    return module.eval()


def export_family(name: str, path: Path | str, opset: int = 17) -> Path:
    """Export family ``name`` to ONNX at ``path`` (parent folders created) with the
    TorchScript exporter, every input and output's axis 0 named "batch".  Returns the path."""
    import warnings

    import torch

    spec = _spec(name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = build_module(name)
    example = torch.zeros((1,) + spec.input_shape)
    axes = {n: {0: "batch"} for n in (spec.input_name,) + spec.output_names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation warning
        torch.onnx.export(module, (example,), str(path), input_names=[spec.input_name],
                          output_names=list(spec.output_names), dynamic_axes=axes,
                          opset_version=opset, dynamo=False)
    return path


def torch_reference(name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """Run family ``name`` in PyTorch on ``x`` (N, C, H, W float32); returns {output name:
    float32 array}, owned by the caller."""
    import torch

    spec = _spec(name)
    if x.ndim != 4 or tuple(x.shape[1:]) != spec.input_shape:
        raise ValueError(f"input of shape {x.shape} for {name!r}; expected (N, "
                         f"{', '.join(map(str, spec.input_shape))})")
    module = build_module(name)
    with torch.no_grad():
        out = module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    outs = out if isinstance(out, tuple) else (out,)
    return {n: t.numpy().copy() for n, t in zip(spec.output_names, outs, strict=True)}


__all__ = ["FamilySpec", "FAMILIES", "build_module", "export_family", "torch_reference"]
