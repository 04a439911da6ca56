"""``condconv-finetune`` as a user meets it: the main recipe with DDP, the first run, the help, one-line errors."""

from __future__ import annotations

import csv
import importlib
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_image_folder import make_images

from condconv_lightning.condconv2d import CondConv2d
from condconv_lightning.finetune import ImageClassifier
from condconv_lightning.loading import build_architecture

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "configs" / "pretrained_folder.yaml"


def registry_available(registry: str) -> bool:
    try:
        importlib.import_module(registry)
    except Exception:  # torchvision fails to import beside a torch it was not built for
        return False
    return True


RECIPE_ARCHS = [
    "resnet_tiny",  # the built-in ResNet: same layer names as torchvision's, on every environment
    pytest.param(
        "torchvision:resnet18",
        marks=pytest.mark.skipif(not registry_available("torchvision"), reason="torchvision does not import here"),
    ),
]


def finetune(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CONDCONV_TUNE": "0"}
    command = [sys.executable, "-m", "condconv_lightning.cli.finetune", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("arch", RECIPE_ARCHS)
def test_main_recipe_pretrained_weights_image_folder_ddp(tmp_path: Path, arch: str) -> None:
    """Pretrained weights file -> convert layer3+layer4 -> fine-tune on an image folder, 2 DDP processes, no Python."""
    images = make_images(tmp_path / "images", per_class=8)
    torch.manual_seed(0)
    pretrained = build_architecture(arch, {"num_classes": 10})  # another head, as an ImageNet checkpoint has
    with torch.no_grad():  # trained-looking BatchNorm: a zero-initialized gamma would stop every gradient
        for module in pretrained.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.running_var.uniform_(0.5, 2.0)
    torch.save(pretrained.state_dict(), tmp_path / "pretrained.pth")
    done = finetune(
        "fit", "--config", str(RECIPE), "--model.arch", arch, "--model.weights", "pretrained.pth",
        "--data.root", str(images), "--model.num_classes", "3", "--trainer.accelerator", "cpu",
        "--trainer.devices", "2", "--trainer.max_steps", "3", "--data.init_args.image_size", "32",
        "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
        "--model.optimizer.init_args.lr", "0",  # the network stays as loaded; experts and routers train
        "--model.expert_lr", "0.001", "--model.router_lr", "0.001", "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MEMBER: 2/2" in done.stderr  # two processes
    assert "kept the model's new classifier 'fc'" in done.stderr
    assert "layer3.0.conv1" in done.stdout and "layer4.0.conv1" in done.stdout  # the conversion report

    last = next(tmp_path.glob("lightning_logs/version_*/checkpoints/last.ckpt"))
    module = ImageClassifier.load_from_checkpoint(last)
    assert module.hparams["arch"] == arch
    assert isinstance(module.model.layer3[0].conv1, CondConv2d) and isinstance(module.model.layer4[0].conv1, CondConv2d)
    assert not isinstance(module.model.layer2[0].conv1, CondConv2d)
    assert module.model.fc.out_features == 3
    torch.testing.assert_close(module.model.conv1.weight, pretrained.conv1.weight, rtol=0, atol=0)
    assert module.model.layer3[0].conv1.router.weight.abs().sum() > 0, "routers (zero when converted) trained"


def test_the_first_documented_command_logs_and_validates_within_its_steps(tmp_path: Path) -> None:
    done = finetune(
        "fit", "--trainer.max_steps", "10", "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", ".",
        "--trainer.enable_progress_bar", "false", "--data.train_size", "256", "--data.val_size", "64", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    with open(next(tmp_path.glob("lightning_logs/version_0/metrics.csv"))) as file:
        rows = list(csv.DictReader(file))
    training = [row for row in rows if row["train_loss"]]
    assert [int(row["step"]) for row in training] == list(range(10))
    assert all(row["routing/entropy"] for row in training), "routing values share the loss's rows"
    validation = [row for row in rows if row["val_acc"]]
    assert len(validation) == 1 and validation[0]["val_routing/entropy"]


def training_rows(folder: Path) -> list[dict[str, str]]:
    with open(next(folder.glob("lightning_logs/version_0/metrics.csv"))) as file:
        return [row for row in csv.DictReader(file) if row["train_loss"]]


SMALL_FOLDER_RUN = ["fit", "--data", "ImageFolderDataModule", "--data.batch_size", "2", "--data.image_size", "32"]
SMALL_FOLDER_RUN += ["--data.num_workers", "0", "--trainer.max_epochs", "3", "--trainer.logger", "CSVLogger"]
SMALL_FOLDER_RUN += ["--trainer.logger.save_dir", ".", "--trainer.enable_progress_bar", "false"]


def test_small_data_logs_training_values_every_epoch_without_a_logging_interval_warning(tmp_path: Path) -> None:
    """7 batches per epoch: Lightning's default interval (50 steps) would log no training value in 3 epochs."""
    images = make_images(tmp_path / "images", per_class=6)  # 18 images, 14 for training: 7 batches of 2
    done = finetune(*SMALL_FOLDER_RUN, "--data.root", str(images), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "smaller than the logging interval" not in done.stderr
    training = training_rows(tmp_path)
    assert {row["epoch"] for row in training} == {"0", "1", "2"}
    assert [int(row["step"]) for row in training] == list(range(21))  # every step: 7 // 10 rounds up to 1
    assert all(row["routing/entropy"] for row in training), "routing values share the loss's rows"


def test_an_explicit_logging_interval_is_kept(tmp_path: Path) -> None:
    images = make_images(tmp_path / "images", per_class=6)
    done = finetune(*SMALL_FOLDER_RUN, "--data.root", str(images), "--trainer.log_every_n_steps", "4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [int(row["step"]) for row in training_rows(tmp_path)] == [3, 7, 11, 15, 19]


@pytest.mark.parametrize(
    ("steps_per_epoch", "max_steps", "interval"),
    [
        (7, -1, 1),  # a small folder: every step
        (25, -1, 2),
        (250, -1, 25),
        (2000, -1, 50),  # Lightning's default, at most
        (2000, 100, 10),  # a step-bounded run shorter than an epoch
        (7, 1000, 1),  # a long run of short epochs: the epoch decides
        (math.inf, -1, 50),  # data of no length
        (math.inf, 30, 3),
    ],
)
def test_the_logging_interval_is_a_tenth_of_the_shorter_of_epoch_and_run(
    steps_per_epoch: float, max_steps: int, interval: int
) -> None:
    from condconv_lightning.cli.finetune import log_interval

    assert log_interval(steps_per_epoch, max_steps) == interval


def test_help_is_short_and_the_full_help_is_there(tmp_path: Path) -> None:
    short = finetune("fit", "--help", cwd=tmp_path)
    assert short.returncode == 0
    lines = short.stdout.splitlines()
    assert len(lines) < 160, len(lines)
    for option in ("--model.arch", "--model.weights", "--data", "--trainer.max_steps", "--help_full"):
        assert any(line.lstrip().startswith(option) for line in lines), option
    assert "--trainer.limit_train_batches" not in short.stdout
    full = finetune("fit", "--help_full", cwd=tmp_path)
    assert full.returncode == 0 and "--trainer.limit_train_batches" in full.stdout
    assert len(full.stdout.splitlines()) > 3 * len(lines)


def help_entries(text: str) -> dict[str, str]:
    """Each option's (or subcommand's) help in an argparse help, its lines joined, by its first name."""
    entries: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        start = re.match(r"\s{2,4}(-{1,2}[\w.+-]*\w|[a-z]+)(?=[\s,]|$)", line)  # an option or a subcommand
        if start and indent < 24:
            name = start.group(1)
            entries[name] = line.strip().partition("  ")[2].strip()
        elif line.strip() and indent >= 24 and name is not None:
            joint = "" if re.search(r"\w-$", entries[name]) else " "  # argparse breaks lines after a hyphen
            entries[name] = (entries[name] + joint + line.strip()).strip()
        else:
            name = None
    return entries


HELPS = [["fit", "--help"], ["fit", "--help_full"], ["--help"], ["fit", "--data.help", "ImageFolderDataModule"]]


@pytest.mark.parametrize("arguments", HELPS, ids=[" ".join(arguments) for arguments in HELPS])
def test_help_is_plain_text_in_whole_sentences(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, arguments: list[str]
) -> None:
    """Help texts come from docstrings written for Sphinx: no role, literal or dangling punctuation reaches them."""
    from condconv_lightning.cli.finetune import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(sys, "argv", ["condconv-finetune"])
    with pytest.raises(SystemExit) as exit_:
        main(arguments)
    text = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "`" not in text
    assert not re.search(r":(mod|class|func|meth|attr|paramref|obj|data|exc|ref):", text)
    entries = help_entries(text)
    assert len(entries) > 3
    for name, help_text in entries.items():
        assert help_text and not help_text.endswith((";", ",", ":")), (name, help_text)
    if arguments == ["fit", "--help"]:
        assert entries["--model.arch"] == (
            "the network by name, built without downloading weights: timm:NAME, torchvision:NAME, a built-in model "
            "(resnet_tiny) or module.path:ClassOrFactory (condconv_lightning.loading.architectures); num_classes is "
            "passed to it when it takes that argument."
        )
    if arguments == ["--help"]:
        assert entries["test"] == "Perform one evaluation epoch over the test set."  # not cut mid-sentence
    if arguments[1:2] == ["--data.help"]:
        assert "--data.root" in entries and "--data.batch_size" in entries  # the data module's options


def test_custom_classes_import_from_the_current_folder_or_fail_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "mydata.py").write_text(
        "from condconv_lightning.demos import SyntheticImageDataModule\n\n\n"
        "class MyData(SyntheticImageDataModule):\n    pass\n"
    )
    common = ["--trainer.max_steps", "1", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false"]
    common += ["--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]"]
    ok = finetune(
        "fit", "--data", "mydata.MyData", "--data.train_size", "64", "--data.val_size", "16", *common, cwd=tmp_path
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    missing = finetune("fit", "--data", "nodata.MyData", *common, cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1] == (
        "condconv-finetune: error: --data: cannot use nodata.MyData (No module named 'nodata'); check the name, "
        "or run from the folder that contains its module"
    )


def test_mismatched_classes_and_bad_weights_are_one_line_errors(tmp_path: Path) -> None:
    images = make_images(tmp_path / "images")
    common = ["--data", "ImageFolderDataModule", "--data.root", str(images), "--trainer.max_steps", "1"]
    mismatch = finetune("fit", *common, "--model.num_classes", "2", cwd=tmp_path)
    assert mismatch.returncode == 2
    assert mismatch.stderr.strip().splitlines()[-1] == (
        "condconv-finetune: error: the data has 3 classes but --model.num_classes is 2: pass 3"
    )
    torch.save({"not": torch.zeros(1)}, tmp_path / "other.pt")
    bad = finetune("fit", *common, "--model.num_classes", "3", "--model.weights", "other.pt", cwd=tmp_path)
    assert bad.returncode == 2
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("condconv-finetune: error: the weights in other.pt do not match the model (ResNet): ")
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--data.val_split", "0.01"], "val_split 0.01 of 18 images holds none out: raise val_split or add images"),
        (
            ["--data.root", "EMPTY_CLASS"],
            "has no usable images (.jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp): add some or remove the",
        ),
        (["--ckpt_path", "missing.ckpt"], "missing.ckpt: no such file; check the path"),
    ],
    ids=["nothing-held-out", "empty-class", "missing-checkpoint"],
)
def test_what_the_data_or_checkpoint_lacks_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, arguments: list[str], message: str
) -> None:
    """Found while the Trainer sets up the data (after the classes were built), or before anything is built."""
    from test_image_folder import make_images

    from condconv_lightning.cli.finetune import main

    images = make_images(tmp_path / "images")
    make_images(tmp_path / "empty", per_class=1)
    for image in (tmp_path / "empty" / "red").iterdir():
        image.unlink()  # one class folder without images
    arguments = [str(tmp_path / "empty") if a == "EMPTY_CLASS" else a for a in arguments]
    monkeypatch.chdir(tmp_path)
    common = ["--data", "ImageFolderDataModule", "--data.root", str(images), "--data.batch_size", "4"]
    common += ["--model.num_classes", "3", "--trainer.max_steps", "1", "--trainer.logger", "false"]
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *common, "--trainer.enable_checkpointing", "false", *arguments])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err.strip().splitlines()[-1], err[-2000:]
    assert "Traceback" not in err
