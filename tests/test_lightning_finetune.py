"""The synthetic data, the ImageClassifier's parameter groups and training, and the condconv-finetune CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

from condconv_lightning import CondConv2d
from condconv_lightning.finetune import ImageClassifier, SyntheticImageDataModule, make_context_gratings, parameter_groups
from condconv_lightning.models import resnet_tiny


def test_gratings_are_seeded_and_labels_depend_on_orientation_and_colour() -> None:
    first = make_context_gratings(64, 4, 16, generator=torch.Generator().manual_seed(5))
    again = make_context_gratings(64, 4, 16, generator=torch.Generator().manual_seed(5))
    other = make_context_gratings(64, 4, 16, generator=torch.Generator().manual_seed(6))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    images, labels, orientation, context = first
    assert torch.equal(labels, (orientation + 2 * context) % 4)
    # The context is a global property: the mean red-minus-blue of an image gives it away.
    red_minus_blue = images[:, 0].mean(dim=(1, 2)) - images[:, 2].mean(dim=(1, 2))
    assert torch.equal((red_minus_blue < 0).long(), context)
    # The same orientation under the two colour casts belongs to different classes.
    for o in range(4):
        assert set(labels[(orientation == o) & (context == 0)].tolist()).isdisjoint(labels[(orientation == o) & (context == 1)].tolist())


def test_grating_orientation_is_the_dominant_spatial_frequency() -> None:
    images, _, orientation, _ = make_context_gratings(32, 4, 32, noise=0.0, generator=torch.Generator().manual_seed(0))
    spectrum = torch.fft.fftshift(torch.fft.fft2(images[:, 1]).abs(), dim=(-2, -1))  # green carries no colour cast
    spectrum[:, 16, 16] = 0.0
    for image_spectrum, o in zip(spectrum, orientation.tolist()):
        row, col = divmod(int(image_spectrum.argmax()), 32)
        angle = math.atan2(row - 16, col - 16) % math.pi
        nearest = min(range(4), key=lambda c: min(abs(angle - math.pi * c / 4), math.pi - abs(angle - math.pi * c / 4)))
        assert nearest == o


def test_data_module_splits_and_loaders() -> None:
    data = SyntheticImageDataModule(num_classes=3, image_size=12, train_size=20, val_size=7, batch_size=4, seed=1)
    data.setup("fit")
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 12, 12) and labels.max() < 3
    assert len(data.train_dataloader()) == 5 and sum(len(y) for _, y in data.val_dataloader()) == 7
    with pytest.raises(ValueError, match="batch_size"):
        SyntheticImageDataModule(batch_size=0)
    with pytest.raises(ValueError, match="num_classes"):
        make_context_gratings(4, num_classes=1)


def condconv_net() -> nn.Module:
    net = resnet_tiny(num_classes=4)
    net.layer4[0].conv1 = CondConv2d.from_conv(net.layer4[0].conv1, 4)
    shared = CondConv2d.from_conv(net.layer4[0].conv2, 4)
    net.layer4[0].conv2 = shared
    net.extra = shared  # the same layer at two paths must be counted once
    return net


def test_parameter_groups_partition_the_trainable_parameters() -> None:
    net = condconv_net()
    net.fc.weight.requires_grad_(False)
    groups = parameter_groups(net, expert_lr=0.1, router_lr=0.01)
    by_name = {g["name"]: g for g in groups}
    experts = {id(p) for m in (net.layer4[0].conv1, net.layer4[0].conv2) for p in (m.weight, m.bias) if p is not None}
    routers = {id(p) for m in (net.layer4[0].conv1, net.layer4[0].conv2) for p in m.router.parameters()}
    assert {id(p) for p in by_name["experts"]["params"]} == experts and by_name["experts"]["lr"] == 0.1
    assert {id(p) for p in by_name["routers"]["params"]} == routers and by_name["routers"]["lr"] == 0.01
    assert "lr" not in by_name["base"]
    listed = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert len(listed) == len(set(listed)) and set(listed) == trainable
    assert [g["name"] for g in parameter_groups(resnet_tiny())] == ["base"]  # no CondConv: no empty groups


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_fit_trains_experts_and_routers_at_their_own_rates(tmp_path: Path, precision: str) -> None:
    torch.manual_seed(0)
    module = ImageClassifier(
        condconv_net(),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.0),
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        scheduler_interval="step",
        router_lr=0.5,
    )
    layer = module.model.layer4[0].conv1
    before = {"experts": layer.weight.detach().clone(), "router": layer.router.weight.detach().clone(), "fc": module.model.fc.weight.detach().clone()}
    trainer = Trainer(
        accelerator="cpu", max_steps=3, precision=precision, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1, default_root_dir=tmp_path,
    )
    trainer.fit(module, SyntheticImageDataModule(image_size=16, train_size=24, val_size=8, batch_size=8))
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert torch.equal(module.model.fc.weight, before["fc"]) and torch.equal(layer.weight, before["experts"])  # lr 0
    assert not torch.equal(layer.router.weight, before["router"])  # the routers' own learning rate
    lrs = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}
    assert lrs == {"base": 0.0, "experts": 0.0, "routers": pytest.approx(0.5 * 0.5**3)}  # StepLR stepped per step


def test_module_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="router_lr"):
        ImageClassifier(router_lr=0.0)
    with pytest.raises(ValueError, match="num_classes"):
        ImageClassifier(num_classes=1)
