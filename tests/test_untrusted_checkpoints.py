"""An untrusted Lightning checkpoint is data: checked values, sized by its weights, never code; runs exit honestly.

Each test plays the author of a hostile checkpoint against one reader of it
(``ImageClassifier.load_from_checkpoint``, ``condconv-finetune --ckpt_path``,
``condconv-convert FILE.ckpt --arch mypkg:MyModule``): strings that a parser would import,
YAML in a string, download switches, sizes larger than the weights, nesting deeper than
Python's stack, malformed conversion entries. The last tests stop a real fine-tuning run
with SIGTERM and SIGINT.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from test_models_by_name import registries as registries  # a fixture
from torch import nn

from condconv_lightning.finetune import ImageClassifier
from condconv_lightning.loading import ModelFileError, build_architecture
from condconv_lightning.loading.architectures import DOWNLOAD_SWITCHES

# Download switches are refused whoever passes them; registry models build offline.


@pytest.mark.parametrize("switch", sorted(DOWNLOAD_SWITCHES))
def test_download_switches_are_refused_from_anyone(registries: list, tmp_path: Path, switch: str) -> None:
    message = re.escape(f"{switch}= would fetch weights from the network, a hub or a file; nothing is ever downloaded")
    for arch in ("timm:resnet18", "torchvision:resnet18"):
        with pytest.raises(ModelFileError, match=rf"^--arch {arch}: {message}"):
            build_architecture(arch, {switch: True})
        with pytest.raises(ModelFileError, match=rf"^arch {arch}: {message}"):
            ImageClassifier(arch=arch, arch_kwargs={switch: "DEFAULT"}, num_classes=4)
    assert registries == []  # neither registry was called


def test_the_switches_are_the_real_registries_keywords() -> None:
    timm = pytest.importorskip("timm")
    torchvision = pytest.importorskip("torchvision")
    from timm.models import build_model_with_cfg

    names = set(inspect.signature(timm.create_model).parameters) | set(
        inspect.signature(build_model_with_cfg).parameters
    )
    found = set()
    for model in torchvision.models.list_models():
        found |= set(inspect.signature(torchvision.models.get_model_builder(model)).parameters)
    legacy = {"pretrained", "pretrained_backbone"}  # torchvision's decorator maps them to weights, weights_backbone
    assert DOWNLOAD_SWITCHES - names - found - legacy == set()
    assert {n for n in names | found if "weight" in n or "pretrained" in n} - DOWNLOAD_SWITCHES <= {
        "pretrained_strict",
        "pretrained_filter_fn",
        "pretrained_model_args",
    }


def test_a_torchvision_model_with_a_backbone_builds_without_any_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``weights=None`` alone still downloads the ImageNet backbone of detection and segmentation models."""
    pytest.importorskip("torchvision")
    import socket

    def no_network(*args: object) -> None:
        raise AssertionError("a network connection was attempted")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights either
    monkeypatch.setattr(socket.socket, "connect", no_network)
    model = build_architecture("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", {"num_classes": 3})
    assert isinstance(model, nn.Module) and not any(tmp_path.rglob("*.pth"))
