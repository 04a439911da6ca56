"""A zoo of small test models covering what model surgery must handle.

Every entry is a :class:`ZooModel`: a factory building the model with seeded,
non-trivial parameters (random BatchNorm statistics and affine terms, random conv
biases, so eval mode is not an identity) and the ``(C, H, W)`` of one input sample.
Other test files use it with ``from zoo import ZOO, zoo_model, zoo_input``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from condconv_lightning.demos import mobilenet_tiny, resnet_tiny


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): two convs on the globally pooled vector gate the channels."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(pooled))))


class PlainCNN(nn.Module):
    """Convs with biases, ReLU and pooling, then a linear head: the simplest case."""

    def __init__(self, channels: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 12, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(12, 16, (1, 3), padding=(0, 1)),
            nn.ReLU(),
        )
        self.head = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class DilatedNet(nn.Module):
    """Dilated convs, 'same' and 'valid' padding (as in DeepLab-style context modules)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.context = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.wide = nn.Conv2d(8, 8, 3, padding="same", dilation=(1, 3))
        self.valid = nn.Conv2d(8, 6, 2, padding="valid", dilation=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.valid(F.relu(self.wide(F.relu(self.context(F.relu(self.stem(x)))))))


class GroupedNet(nn.Module):
    """Grouped convs (ResNeXt-style groups of 2 and 4) and a depthwise one."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(4, 16, 1)
        self.grouped2 = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.grouped4 = nn.Conv2d(16, 8, 3, stride=2, padding=1, groups=4, bias=False)
        self.depthwise = nn.Conv2d(8, 16, 3, padding=1, groups=8)

    def forward(self, x: Tensor) -> Tensor:
        return self.depthwise(F.relu(self.grouped4(F.relu(self.grouped2(F.relu(self.expand(x)))))))


class PaddingModesNet(nn.Module):
    """Every non-zero padding mode of nn.Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.reflect = nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect")
        self.replicate = nn.Conv2d(6, 6, 3, padding=2, padding_mode="replicate", dilation=2)
        self.circular = nn.Conv2d(6, 4, (3, 5), padding=(1, 2), padding_mode="circular")

    def forward(self, x: Tensor) -> Tensor:
        return self.circular(torch.tanh(self.replicate(torch.tanh(self.reflect(x)))))


class SharedConvNet(nn.Module):
    """One conv registered at two paths and applied twice (weight sharing across depth)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.blocks = nn.ModuleList([self.shared, nn.BatchNorm2d(8)])

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.shared(x))
        return self.blocks[1](self.blocks[0](x))


class NestedNet(nn.Module):
    """Convs inside a ModuleDict of ModuleLists of Sequentials."""

    def __init__(self) -> None:
        super().__init__()
        self.branches = nn.ModuleDict(
            {
                "left": nn.ModuleList([nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())]),
                "right": nn.ModuleList(
                    [nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU()), nn.Sequential(nn.Conv2d(6, 6, 3, padding=1))]
                ),
            }
        )
        self.fuse = nn.Sequential(nn.Sequential(nn.Conv2d(12, 4, 1)))

    def forward(self, x: Tensor) -> Tensor:
        left = self.branches["left"][0](x)
        right = self.branches["right"][1](self.branches["right"][0](x))
        return self.fuse(torch.cat([left, right], dim=1))


class ClassifierModule(pl.LightningModule):
    """A LightningModule holding a network as ``self.model``, as users write them."""

    def __init__(self) -> None:
        super().__init__()
        self.model = PlainCNN()

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@dataclass(frozen=True)
class ZooModel:
    build: Callable[[], nn.Module]
    input_size: tuple[int, int, int]


ZOO: dict[str, ZooModel] = {
    "plain": ZooModel(PlainCNN, (3, 12, 12)),
    "resnet": ZooModel(lambda: resnet_tiny(num_classes=4), (3, 16, 16)),
    "mobilenet": ZooModel(lambda: mobilenet_tiny(num_classes=4), (3, 16, 16)),
    "dilated": ZooModel(DilatedNet, (3, 12, 12)),
    "grouped": ZooModel(GroupedNet, (4, 10, 10)),
    "padding_modes": ZooModel(PaddingModesNet, (3, 9, 11)),
    "shared": ZooModel(SharedConvNet, (3, 10, 10)),
    "nested": ZooModel(NestedNet, (3, 8, 8)),
    "lightning": ZooModel(ClassifierModule, (3, 12, 12)),
}


def zoo_model(name: str, seed: int = 0) -> nn.Module:
    """Build ``ZOO[name]`` with seeded weights, random conv biases and random BatchNorm state."""
    torch.manual_seed(seed)
    model = ZOO[name].build()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
    return model


def zoo_input(name: str, batch: int = 3, seed: int = 0) -> Tensor:
    """A random float32 batch for ``ZOO[name]``."""
    return torch.randn(batch, *ZOO[name].input_size, generator=torch.Generator().manual_seed(seed))
