"""Small reference CNNs built in code (no torchvision, no downloads).

They give tests, benchmarks, examples and the fine-tuning defaults real architectures
to convert: a ResNet (He et al., CVPR 2016, arXiv:1512.03385) with torchvision's
module names (``conv1``, ``bn1``, ``layer1..layer4``, ``fc``; blocks with ``conv1..conv3``
and ``downsample``) and a MobileNetV2-style network (Sandler et al., CVPR 2018,
arXiv:1801.04381) with depthwise and pointwise convolutions under ``features``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["MobileNet", "ResNet", "mobilenet_tiny", "resnet50_like", "resnet_tiny"]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_planes, out_planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


class ResNet(nn.Module):
    """ResNet with torchvision's names; ``bottleneck`` picks ResNet-50-style blocks."""

    def __init__(
        self,
        depths: Sequence[int] = (1, 1, 1, 1),
        widths: Sequence[int] = (16, 32, 64, 128),
        num_classes: int = 10,
        in_channels: int = 3,
        bottleneck: bool = False,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        block = Bottleneck if bottleneck else BasicBlock
        self.conv1 = nn.Conv2d(
            in_channels, widths[0], 3 if stem_stride == 1 else 7, stem_stride, 1 if stem_stride == 1 else 3, bias=False
        )
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if stem_stride == 1 else nn.MaxPool2d(3, 2, 1)
        planes_in = widths[0]
        for index, (depth, width) in enumerate(zip(depths, widths)):
            blocks = []
            for b in range(depth):
                blocks.append(block(planes_in, width, 2 if (b == 0 and index > 0) else 1))
                planes_in = width * block.expansion
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class InvertedResidual(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_planes * expand
        self.use_residual = stride == 1 and in_planes == out_planes
        self.conv = nn.Sequential(
            nn.Conv2d(in_planes, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_planes, 1, bias=False),
            nn.BatchNorm2d(out_planes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNet(nn.Module):
    """MobileNetV2-style network: ``features.0`` stem, inverted residual blocks, ``classifier``."""

    def __init__(
        self,
        stages: Sequence[tuple[int, int, int]] = ((16, 1, 1), (24, 2, 4), (32, 2, 4), (48, 1, 4)),
        num_classes: int = 10,
        in_channels: int = 3,
        stem: int = 16,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Sequential(
                nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6(inplace=True)
            )
        ]
        planes_in = stem
        for out_planes, stride, expand in stages:
            layers.append(InvertedResidual(planes_in, out_planes, stride, expand))
            planes_in = out_planes
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(planes_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def resnet_tiny(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """A 4-stage basic-block ResNet with ~0.3M parameters: fast on CPU, stages named ``layer1..layer4``."""
    return ResNet((1, 1, 1, 1), (16, 32, 64, 128), num_classes, in_channels)


def resnet50_like(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    """ResNet-50's architecture (bottlenecks 3-4-6-3, ~25.6M parameters), randomly initialized."""
    return ResNet((3, 4, 6, 3), (64, 128, 256, 512), num_classes, in_channels, bottleneck=True, stem_stride=2)


def mobilenet_tiny(num_classes: int = 10, in_channels: int = 3) -> MobileNet:
    """A small MobileNetV2-style network with depthwise 3x3 and pointwise 1x1 convolutions."""
    return MobileNet(num_classes=num_classes, in_channels=in_channels)
