"""The synthetic data, the ImageClassifier's parameter groups and training, and the condconv-finetune CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

from condconv_lightning import CondConv2d
from condconv_lightning.demos import SyntheticImageDataModule, make_context_gratings, resnet_tiny
from condconv_lightning.finetune import ImageClassifier, parameter_groups


def test_gratings_are_seeded_and_the_colour_cast_tells_which_grating_counts() -> None:
    first = make_context_gratings(64, 4, 16, generator=torch.Generator().manual_seed(5))
    again = make_context_gratings(64, 4, 16, generator=torch.Generator().manual_seed(5))
    other = make_context_gratings(64, 4, 16, generator=torch.Generator().manual_seed(6))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    images, labels, context, _ = first
    # The context is a global property: the mean red-minus-blue of an image gives it away.
    red_minus_blue = images[:, 0].mean(dim=(1, 2)) - images[:, 2].mean(dim=(1, 2))
    assert torch.equal((red_minus_blue < 0).long(), context)
    assert set(labels.tolist()) == set(range(4)) and set(context.tolist()) == {0, 1}


def dominant_orientation(channel: torch.Tensor, num_classes: int) -> int:
    """Orientation index nearest to the angle of the strongest non-DC spatial frequency."""
    size = channel.shape[-1]
    spectrum = torch.fft.fftshift(torch.fft.fft2(channel).abs())
    spectrum[size // 2, size // 2] = 0.0
    row, col = divmod(int(spectrum.argmax()), size)
    angle = math.atan2(row - size // 2, col - size // 2) % math.pi
    return min(
        range(num_classes),
        key=lambda c: min(abs(angle - math.pi * c / num_classes), math.pi - abs(angle - math.pi * c / num_classes)),
    )


def test_label_is_the_orientation_of_the_grating_the_cast_selects() -> None:
    images, labels, context, distractor = make_context_gratings(
        32, 4, 32, noise=0.0, generator=torch.Generator().manual_seed(0)
    )
    for image, label, ctx, other in zip(images, labels.tolist(), context.tolist(), distractor.tolist()):
        signal_channel, other_channel = (0, 2) if ctx == 0 else (2, 0)
        assert dominant_orientation(image[signal_channel], 4) == label
        assert dominant_orientation(image[other_channel], 4) == other
        assert torch.all(image[1] == 0)  # green: no cast, no grating


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
    before = {
        "experts": layer.weight.detach().clone(),
        "router": layer.router.weight.detach().clone(),
        "fc": module.model.fc.weight.detach().clone(),
    }
    trainer = Trainer(
        accelerator="cpu",
        max_steps=3,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        default_root_dir=tmp_path,
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


SMALL_DATA = [
    "--data.init_args.train_size=16",
    "--data.init_args.val_size=8",
    "--data.init_args.batch_size=8",
    "--data.init_args.image_size=16",
]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def test_cli_defaults_convert_the_builtin_model_and_checkpoint_it(tmp_path: Path) -> None:
    from condconv_lightning.cli.finetune import main

    main(["fit", "--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path}", *SMALL_DATA, *QUIET])
    (version,) = (tmp_path / "lightning_logs").iterdir()
    (checkpoint,) = (version / "checkpoints").iterdir()
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    converted = {k.rsplit(".router.weight", 1)[0] for k in state["state_dict"] if k.endswith(".router.weight")}
    assert converted == {
        f"model.{stage}.0.{conv}" for stage in ("layer3", "layer4") for conv in ("conv1", "conv2", "downsample.0")
    }
    assert (
        "model.layer2.0.conv1.weight" in state["state_dict"]
        and state["state_dict"]["model.layer2.0.conv1.weight"].ndim == 4
    )
    assert (version / "config.yaml").is_file()

    # The checkpoint carries the conversion: it loads into a fresh, unconverted network.
    restored = ImageClassifier.load_from_checkpoint(checkpoint, map_location="cpu")
    restored_state = restored.state_dict()
    assert restored_state.keys() == state["state_dict"].keys()
    assert all(torch.equal(restored_state[k], v) for k, v in state["state_dict"].items())


def test_module_loads_a_file_written_by_save_converted(tmp_path: Path) -> None:
    from condconv_lightning.surgery import convert, save_converted

    torch.manual_seed(0)
    original = resnet_tiny(num_classes=4).eval()
    convert(original, ["layer4"], num_experts=3, seed=1)
    with torch.no_grad():
        original.layer4[0].conv1.router.weight.normal_()  # as after training: input-dependent routing
    weights = save_converted(original, tmp_path / "converted.pt")
    module = ImageClassifier(resnet_tiny(num_classes=4), weights=str(weights)).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(module(images), original(images), rtol=0, atol=0)

    pickled = save_converted(original, tmp_path / "module.pt", as_module=True)
    with pytest.raises(ValueError, match="trust_pickle=True"):
        ImageClassifier(weights=str(pickled))
    assert isinstance(ImageClassifier(weights=str(pickled), trust_pickle=True).model.layer4[0].conv1, CondConv2d)


def test_cli_runs_the_single_device_example_config(tmp_path: Path) -> None:
    from condconv_lightning.cli.finetune import main

    config = Path(__file__).resolve().parents[1] / "examples" / "configs" / "single_device.yaml"
    main(
        [
            "fit",
            f"--config={config}",
            "--trainer.max_steps=1",
            "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}",
            *SMALL_DATA,
            *QUIET,
        ]
    )
    (version,) = (tmp_path / "lightning_logs").iterdir()
    state = torch.load(version / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    temperatures = {float(v) for k, v in state["state_dict"].items() if k.endswith(".temperature")}
    assert temperatures == {30.0}  # softmax routing at the start of the 30 -> 1 schedule
    scheduler_state = next(v for k, v in state["callbacks"].items() if "RoutingTemperatureScheduler" in k)
    assert scheduler_state == {"temperature": 30.0}


def test_swapping_in_the_image_folder_module_carries_no_worker_count_over(tmp_path: Path, capsys) -> None:
    """The default data module's options carry over to one given by class name on the command line; a worker
    count of 0 carried over would stop the folder module from choosing one per spare CPU."""
    import yaml

    from condconv_lightning.cli.finetune import main

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    with pytest.raises(SystemExit) as printed:
        main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(tmp_path), "--print_config"])
    assert printed.value.code == 0
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    assert data["class_path"].endswith("ImageFolderDataModule")
    assert data["init_args"]["num_workers"] is None
    assert SyntheticImageDataModule().num_workers == 0  # its own default: none, the data is in memory
