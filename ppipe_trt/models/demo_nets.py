"""The built-in demo networks, defined in PyTorch (imported only to export them).

Small on purpose (a CPU build of all three takes well under a minute) yet shaped like the
real thing: a ResNet-style classifier, an FPN detector with per-level outputs (the coarse
level's outputs are produced early and must be carried to the end), and a U-Net whose encoder
features skip across most of the network.  Weights come from a fixed seed, so every export
is identical.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

SEED = 20250701


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.down(x))


def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(cin, cout, stride),
                         *[BasicBlock(cout, cout, 1) for _ in range(blocks - 1)])


class DemoResNet(nn.Module):
    """ResNet-18 layout at a quarter of the width: 3x224x224 -> 1000 logits."""

    def __init__(self, num_classes: int = 1000, widths=(16, 32, 64, 128)):
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, widths[0], 7, 2), nn.MaxPool2d(3, 2, 1))
        chans = (widths[0],) + tuple(widths)
        self.layers = nn.Sequential(*[_stage(chans[i], chans[i + 1], 2, 1 if i == 0 else 2)
                                      for i in range(4)])
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(image))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DemoDetector(nn.Module):
    """Backbone (strides 4..32) + FPN on P3..P5 + a shared head: 3x256x256 ->
    per-level class logits (20 classes) and box deltas, six outputs."""

    def __init__(self, num_classes: int = 20, widths=(16, 32, 64, 128), fpn: int = 48):
        super().__init__()
        self.stem = _conv_bn(3, widths[0], 3, 2)
        self.c2 = _stage(widths[0], widths[0], 1, 2)
        self.c3 = _stage(widths[0], widths[1], 1, 2)
        self.c4 = _stage(widths[1], widths[2], 2, 2)
        self.c5 = _stage(widths[2], widths[3], 2, 2)
        self.lateral = nn.ModuleList(nn.Conv2d(c, fpn, 1) for c in widths[1:])
        self.smooth = nn.ModuleList(nn.Conv2d(fpn, fpn, 3, padding=1) for _ in widths[1:])
        self.head = nn.Sequential(_conv_bn(fpn, fpn), _conv_bn(fpn, fpn))
        self.cls = nn.Conv2d(fpn, num_classes, 3, padding=1)
        self.box = nn.Conv2d(fpn, 4, 3, padding=1)

    def forward(self, image: torch.Tensor):
        c3 = self.c3(self.c2(self.stem(image)))
        c4 = self.c4(c3)
        c5 = self.c5(c4)
        p5 = self.lateral[2](c5)
        p4 = self.lateral[1](c4) + F.interpolate(p5, scale_factor=2.0, mode="nearest")
        p3 = self.lateral[0](c3) + F.interpolate(p4, scale_factor=2.0, mode="nearest")
        outs = []
        for level, smooth in ((p5, self.smooth[2]), (p4, self.smooth[1]), (p3, self.smooth[0])):
            feat = self.head(smooth(level))
            outs += [self.cls(feat), self.box(feat)]
        return tuple(outs)


class DemoUNet(nn.Module):
    """U-Net with four down/up levels and concatenated skips: 3x256x256 -> 4-class mask."""

    def __init__(self, num_classes: int = 4, widths=(16, 32, 64, 128, 192)):
        super().__init__()
        self.down = nn.ModuleList()
        cin = 3
        for w in widths:
            self.down.append(nn.Sequential(_conv_bn(cin, w), _conv_bn(w, w)))
            cin = w
        self.up = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for w_skip, w_in in zip(reversed(widths[:-1]), reversed(widths[1:])):
            self.up.append(nn.ConvTranspose2d(w_in, w_skip, 2, stride=2))
            self.fuse.append(nn.Sequential(_conv_bn(2 * w_skip, w_skip), _conv_bn(w_skip, w_skip)))
        self.out = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        skips = []
        x = image
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for up, fuse, skip in zip(self.up, self.fuse, reversed(skips[:-1])):
            x = fuse(torch.cat([up(x), skip], dim=1))
        return self.out(x)


_FACTORIES = {"demo_resnet": DemoResNet, "demo_detector": DemoDetector, "demo_unet": DemoUNet}


def build_demo_module(name: str) -> nn.Module:
    """The demo network ``name`` in eval mode, with seeded weights and BatchNorm statistics."""
    gen = torch.Generator().manual_seed(SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        module = _FACTORIES[name]()
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 0.5 + 0.75)
    return module.eval()


def export_demo_onnx(name: str, path, input_shape: tuple[int, ...], input_name: str,
                     output_names: tuple[str, ...], opset: int = 17) -> None:
    """Export with the TorchScript exporter (no onnxscript needed), batch dim dynamic."""
    import warnings

    module = build_demo_module(name)
    example = torch.zeros((1,) + tuple(input_shape))
    axes = {n: {0: "batch"} for n in (input_name,) + tuple(output_names)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=[input_name],
                          output_names=list(output_names), dynamic_axes=axes,
                          opset_version=opset, do_constant_folding=True, dynamo=False)
