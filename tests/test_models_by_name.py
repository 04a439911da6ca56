"""Models named as timm/torchvision/built-in/import path, and pretrained weights loaded before conversion."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from condconv_lightning.checkpoints import UntrustedCheckpointError, is_import_path
from condconv_lightning.condconv2d import CondConv2d
from condconv_lightning.demos import resnet_tiny
from condconv_lightning.finetune import ImageClassifier
from condconv_lightning.loading import (
    ModelFileError,
    build_architecture,
    classifier_name,
    load_model,
    load_pretrained,
)
from condconv_lightning.surgery import convert, save_converted


@pytest.fixture
def registries(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, dict[str, Any]]]:
    """Stand-ins for timm and torchvision that record how they are called (neither imports beside this torch)."""
    calls: list[tuple[str, str, dict[str, Any]]] = []

    def create_model(name: str, **kwargs: Any) -> nn.Module:
        calls.append(("timm", name, kwargs))
        return resnet_tiny(num_classes=kwargs.get("num_classes", 1000))

    timm = types.ModuleType("timm")
    timm.is_model = lambda name: name == "resnet18"  # type: ignore[attr-defined]
    timm.list_models = lambda: ["resnet18"]  # type: ignore[attr-defined]
    timm.create_model = create_model  # type: ignore[attr-defined]

    def resnet18(*, weights: object = "DEFAULT", progress: bool = True, **kwargs: Any) -> nn.Module:
        calls.append(("torchvision", "resnet18", {"weights": weights, **kwargs}))
        return resnet_tiny(num_classes=kwargs.get("num_classes", 1000))

    torchvision = types.ModuleType("torchvision")
    torchvision.models = types.SimpleNamespace(  # type: ignore[attr-defined]
        list_models=lambda: ["resnet18"], get_model_builder=lambda name: resnet18
    )
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    return calls


def test_registry_names_build_without_downloading(registries: list) -> None:
    assert isinstance(build_architecture("timm:resnet18", {"num_classes": 3}), nn.Module)
    assert isinstance(build_architecture("torchvision:resnet18"), nn.Module)
    assert registries == [
        ("timm", "resnet18", {"pretrained": False, "num_classes": 3}),
        ("torchvision", "resnet18", {"weights": None}),
    ]
    module = ImageClassifier(arch="timm:resnet18", num_classes=5)
    assert registries[-1] == ("timm", "resnet18", {"pretrained": False, "num_classes": 5})
    assert module.model.fc.out_features == 5
    override = ImageClassifier(arch="torchvision:resnet18", arch_kwargs={"num_classes": 7}, num_classes=7)
    assert override.model.fc.out_features == 7


def test_unknown_or_missing_models_are_one_line_errors(registries: list, monkeypatch: pytest.MonkeyPatch) -> None:
    cases = {
        "timm:resnet99": "--arch timm:resnet99: timm has no model 'resnet99'; did you mean timm:resnet18? "
        "(timm.list_models() lists them all)",
        "timm:vit_x": "--arch timm:vit_x: timm has no model 'vit_x'; timm.list_models() lists them",
        "torchvision:resnet_18": "--arch torchvision:resnet_18: torchvision has no model 'resnet_18'; did you mean "
        "torchvision:resnet18? (torchvision.models.list_models() lists them all)",
        "torchvision:vit_x": "--arch torchvision:vit_x: torchvision has no model 'vit_x'; torchvision.models.list_models() lists them",
        "resnet_huge": "--arch resnet_huge: not a built-in model (mobilenet_tiny, resnet50_like, resnet_tiny); name one as "
        "timm:NAME, torchvision:NAME, resnet_tiny or module.path:ClassOrFactory",
        "nosuch.models:Net": "--arch nosuch.models:Net: cannot import 'nosuch.models' (No module named 'nosuch'); check the "
        "name, or run from the folder that contains it",
    }
    for arch, message in cases.items():
        with pytest.raises(ModelFileError) as raised:
            build_architecture(arch)
        assert str(raised.value) == message
    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed
    with pytest.raises(ModelFileError, match=r"^--arch timm:resnet18 needs timm, which does not import here \("):
        build_architecture("timm:resnet18")


def test_import_paths_and_builtin_names() -> None:
    assert isinstance(build_architecture("condconv_lightning.demos:resnet_tiny"), nn.Module)
    assert build_architecture("resnet_tiny", {"num_classes": 3}).fc.out_features == 3
    assert [is_import_path(a) for a in ("timm:resnet50", "torchvision:resnet50", "resnet_tiny")] == [False] * 3
    assert [is_import_path(a) for a in ("timm.models:resnet50", "os:system", "my.pkg:Net")] == [True] * 3


def pretrained_file(tmp_path: Path, num_classes: int = 10, prefix: str = "") -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    state = resnet_tiny(num_classes=num_classes).state_dict()
    path = tmp_path / "pretrained.pt"
    torch.save({f"{prefix}{k}": v for k, v in state.items()}, path)
    return path, state


def test_pretrained_weights_with_another_head_keep_the_new_head(tmp_path: Path) -> None:
    path, state = pretrained_file(tmp_path)
    model = resnet_tiny(num_classes=3)
    new_head = model.fc.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"kept the model's new classifier 'fc' \(fc.weight, fc.bias differ in shape"):
        loaded = load_pretrained(path, model)
    assert loaded is model and torch.equal(model.fc.weight, new_head)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items() if not k.startswith("fc."))


def test_pretrained_lightning_checkpoint_and_mismatches(tmp_path: Path) -> None:
    path, state = pretrained_file(tmp_path, num_classes=4, prefix="model.")
    model = load_pretrained(path, resnet_tiny(num_classes=4))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ModelFileError) as raised:
        load_pretrained(path, nn.Sequential(nn.Conv2d(3, 16, 3), nn.Linear(16, 4)), label="arch mine:Net")
    assert str(raised.value).startswith(f"the weights in {path} do not match arch mine:Net: ")
    assert str(raised.value).endswith("pass the architecture (and arch_kwargs) they were saved from")
    assert classifier_name(resnet_tiny()) == "fc"


def test_classifier_weights_from_a_file_and_a_converted_file(tmp_path: Path) -> None:
    path, state = pretrained_file(tmp_path)
    module = ImageClassifier(arch="resnet_tiny", weights=str(path), num_classes=3)
    assert torch.equal(module.model.conv1.weight, state["conv1.weight"])
    assert module.model.fc.out_features == 3 and "weights" not in module.hparams
    assert module.hparams["arch"] == "resnet_tiny"

    converted = resnet_tiny(num_classes=3).eval()
    convert(converted, ["layer4"], seed=0)
    saved = save_converted(converted, tmp_path / "converted.pt")
    restored = ImageClassifier(arch="resnet_tiny", weights=str(saved), num_classes=3).eval()
    assert isinstance(restored.model.layer4[0].conv1, CondConv2d)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(restored(images), converted(images), rtol=0, atol=0)
    with pytest.raises(ValueError, match="pass either model or arch"):
        ImageClassifier(resnet_tiny(), arch="resnet_tiny")


def test_convert_command_names_registry_models(registries: list, tmp_path: Path) -> None:
    path, _ = pretrained_file(tmp_path, num_classes=1000)
    loaded = load_model(path, arch="timm:resnet18")
    assert registries[-1] == ("timm", "resnet18", {"pretrained": False})
    assert loaded.holds == f"state dict ({len(resnet_tiny(num_classes=1000).state_dict())} tensors)"


def test_a_checkpoint_naming_an_import_path_as_arch_is_untrusted(tmp_path: Path) -> None:
    from lightning.pytorch import Trainer

    module = ImageClassifier(arch="resnet_tiny", num_classes=4)
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
    trainer.strategy.connect(module)
    path = tmp_path / "ok.ckpt"
    trainer.save_checkpoint(path)
    assert ImageClassifier.load_from_checkpoint(path).hparams["arch"] == "resnet_tiny"  # registry names are data
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["arch"] = "os:system"
    checkpoint["hyper_parameters"]["arch_kwargs"] = {"command": "touch pwned"}
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    with pytest.raises(UntrustedCheckpointError, match=r"hyper_parameters.arch='os:system'.*trust_checkpoint=True"):
        ImageClassifier.load_from_checkpoint(tmp_path / "evil.ckpt")
    assert not Path("pwned").exists()


def converted_run(path: Path) -> tuple[ImageClassifier, list[str]]:
    """What condconv-finetune writes after converting layer3: its spec, beside weights keyed ``model.``."""
    from lightning.pytorch import Trainer

    torch.manual_seed(0)
    trained = ImageClassifier(num_classes=4)
    report = convert(trained.model, ["layer3"], num_experts=4)
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
    trainer.strategy.connect(trained)
    trainer.save_checkpoint(path)
    return trained.eval(), [layer.name for layer in report.converted]


def test_a_checkpoint_of_a_converted_run_serves_as_weights(tmp_path: Path) -> None:
    """Its spec converts the new model before the weights load."""
    trained, converted = converted_run(tmp_path / "run.ckpt")
    fresh = ImageClassifier(num_classes=4, weights=str(tmp_path / "run.ckpt"))
    assert [name for name, m in fresh.model.named_modules() if isinstance(m, CondConv2d)] == converted
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), trained(x), rtol=0, atol=0)


def test_the_convert_command_reads_a_converted_run_with_the_network_as_arch(tmp_path: Path) -> None:
    """``--arch resnet_tiny`` for a checkpoint whose keys start with ``model.``: the spec converts the network first,
    and a spec the weights do not bear out is refused before any layer is built."""
    trained, converted = converted_run(tmp_path / "run.ckpt")
    loaded = load_model(tmp_path / "run.ckpt", arch="resnet_tiny", arch_kwargs={"num_classes": 4})
    assert loaded.holds.startswith("Lightning checkpoint (") and loaded.holds.endswith(", conversion spec)")
    assert [name for name, m in loaded.model.named_modules() if isinstance(m, CondConv2d)] == converted
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(x), trained.model(x), rtol=0, atol=0)

    checkpoint = torch.load(tmp_path / "run.ckpt", weights_only=True)
    checkpoint["condconv_conversion"]["layers"]["model.layer3.0.conv1"]["num_experts"] = 64
    torch.save(checkpoint, tmp_path / "lying.ckpt")
    with pytest.raises(ModelFileError) as raised:
        load_model(tmp_path / "lying.ckpt", arch="resnet_tiny", arch_kwargs={"num_classes": 4})
    message = str(raised.value)
    assert "\n" not in message and "do not load into --arch resnet_tiny" in message
    assert "gives layer 'layer3.0.conv1' 64 experts" in message and message.endswith("they were saved from")
