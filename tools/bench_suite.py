"""The layer benchmark's shapes, read off real architectures by one forward pass each.

Every ``nn.Conv2d`` of ResNet-50 (``condconv_lightning.demos.resnet50_like``), of
MobileNetV2 (Sandler et al., CVPR 2018, arXiv:1801.04381) and of EfficientNet-B0 (Tan
and Le, ICML 2019, arXiv:1905.11946) at 224x224 input is recorded by a forward hook as
(Cin, Cout, k, stride, groups, input size), deduplicated, and named by model and
stage. The library ships no full-size MobileNetV2 or EfficientNet-B0, so both are
built here as their conv stacks: the published stage tables (expansion, channels,
repeats, stride, kernel) with the stem and head convs; BatchNorm, activations,
residuals and EfficientNet's squeeze-and-excitation (convs on 1x1 maps, not what
CondConv replaces) do not change which convs run and are left out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from condconv_lightning.demos import resnet50_like


@dataclass(frozen=True)
class Shape:
    """One convolution of a real network: what nn.Conv2d takes, plus its input size."""

    name: str
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    groups: int
    size: int

    @property
    def padding(self) -> int:
        return self.kernel_size // 2


# MobileNetV2 (Table 2): expansion t, channels c, repeats n, stride s of the first block.
MOBILENET_V2 = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# EfficientNet-B0 (Table 1): expansion, kernel, stride of the first block, channels, repeats.
EFFICIENTNET_B0 = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)


def _inverted_residual(cin: int, cout: int, expand: int, kernel: int, stride: int) -> nn.Sequential:
    hidden = cin * expand
    convs = [nn.Conv2d(cin, hidden, 1)] if expand != 1 else []
    convs += [nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden), nn.Conv2d(hidden, cout, 1)]
    return nn.Sequential(*convs)


def _stages(stem: int, blocks: list[list[nn.Module]], head_in: int, head: int) -> nn.Sequential:
    """``stem`` (3x3 stride 2), ``stage1..stageN`` of blocks, ``head`` 1x1: the names the suite groups by."""
    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(3, stem, 3, 2, 1))
    for index, stage in enumerate(blocks, 1):
        model.add_module(f"stage{index}", nn.Sequential(*stage))
    model.add_module("head", nn.Conv2d(head_in, head, 1))
    return model


def mobilenet_v2() -> nn.Sequential:
    blocks, cin = [], 32
    for expand, cout, repeats, stride in MOBILENET_V2:
        blocks.append(
            [
                _inverted_residual(cin if i == 0 else cout, cout, expand, 3, stride if i == 0 else 1)
                for i in range(repeats)
            ]
        )
        cin = cout
    return _stages(32, blocks, cin, 1280)


def efficientnet_b0() -> nn.Sequential:
    blocks, cin = [], 32
    for expand, kernel, stride, cout, repeats in EFFICIENTNET_B0:
        blocks.append(
            [
                _inverted_residual(cin if i == 0 else cout, cout, expand, kernel, stride if i == 0 else 1)
                for i in range(repeats)
            ]
        )
        cin = cout
    return _stages(32, blocks, cin, 1280)


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "r50": resnet50_like,
    "mbv2": mobilenet_v2,
    "effb0": efficientnet_b0,
}


def conv_shapes(prefix: str, model: nn.Module, size: int = 224) -> list[Shape]:
    """Distinct convs of ``model`` in the order they first run, from one forward on meta tensors."""
    seen: dict[tuple, Shape] = {}

    def record(name: str) -> Callable:
        def hook(conv: nn.Conv2d, args: tuple, output: torch.Tensor) -> None:
            k, s = conv.kernel_size[0], conv.stride[0]
            key = (conv.in_channels, conv.out_channels, k, s, conv.groups, args[0].shape[-1])
            stage = name.split(".")[0]
            kind = "dw" if conv.groups == conv.in_channels > 1 else ""
            label = f"{prefix}.{stage} {kind}{k}x{k}{f'/{s}' if s > 1 else ''} {key[0]}->{key[1]} @{key[5]}"
            seen.setdefault(key, Shape(label, *key))

        return hook

    model = model.to("meta")
    for name, module in model.named_modules():
        if type(module) is nn.Conv2d:
            module.register_forward_hook(record(name))
    with torch.no_grad():
        model(torch.empty(1, 3, size, size, device="meta"))
    return list(seen.values())


def suite() -> tuple[Shape, ...]:
    """Every distinct conv of the three architectures, grouped by model and stage."""
    return tuple(shape for prefix, build in ARCHITECTURES.items() for shape in conv_shapes(prefix, build()))


QUICK_SUITE = (Shape("tiny.3x3 16->16 @8", 16, 16, 3, 1, 1, 8), Shape("tiny.dw3x3 16->16 @8", 16, 16, 3, 1, 16, 8))
