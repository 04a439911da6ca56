"""An untrusted Lightning checkpoint is data: checked values, sized by its weights, never code; runs exit honestly.

Each test plays the author of a hostile checkpoint against one reader of it
(``ImageClassifier.load_from_checkpoint``, ``condconv-finetune --ckpt_path``,
``condconv-convert FILE.ckpt --arch mypkg:MyModule``): strings that a parser would import,
YAML in a string, download switches, sizes larger than the weights, nesting deeper than
Python's stack, malformed conversion entries. The last tests stop a real fine-tuning run
with SIGTERM and SIGINT.
"""

from __future__ import annotations

import collections
import inspect
import io
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from console_scripts import run_script
from peak_memory import PRELUDE
from test_hardening import classifier_checkpoint
from test_models_by_name import registries as registries  # a fixture
from torch import nn

from condconv_lightning.arguments import PLAIN_TYPES
from condconv_lightning.checkpoints import MAX_DEPTH, UntrustedCheckpointError, init_kwargs, untrusted_hparams
from condconv_lightning.finetune import ImageClassifier
from condconv_lightning.loading import ModelFileError, build_architecture, load_model
from condconv_lightning.loading.architectures import DOWNLOAD_SWITCHES

HOSTILE_MODULE = textwrap.dedent(
    """
    from pathlib import Path

    Path(__file__).with_name("imported").touch()  # importing this module is the payload


    class Anything:
        def __init__(self, *args, **kwargs):
            Path(__file__).with_name("built").touch()
    """
)


class PlainModule(pl.LightningModule):
    """A user's LightningModule with no schema: its hyperparameters must be plain data, sized by its weights."""

    def __init__(self, width: int = 8, config: dict | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(4, width)


PLAIN_ARCH = f"{__name__}:PlainModule"


def with_hparams(path: Path, source: Path | None = None, **entries: Any) -> Path:
    """A copy of ``source`` (by default a fresh ImageClassifier checkpoint) with checkpoint ``entries`` replaced."""
    checkpoint = torch.load(source or classifier_checkpoint(path.with_suffix(".base.ckpt")), weights_only=True)
    checkpoint.update(entries)
    torch.save(checkpoint, path)
    return path


def plain_checkpoint(path: Path, **hyper_parameters: Any) -> Path:
    module = PlainModule()
    hparams = {"width": 8, "config": None, **hyper_parameters}
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": hparams, "hparams_name": "kwargs"}
    torch.save({**checkpoint, "pytorch-lightning_version": pl.__version__}, path)
    return path


def deeply_nested(path: Path, depth: int, source: Path, entry: str = "hyper_parameters") -> Path:
    """``source`` with a list nested ``depth`` deep in its ``entry``, pickled by hand (the pickler itself recurses,
    the weights-only unpickler does not)."""
    checkpoint = torch.load(source, weights_only=True)
    placeholder = "NESTED-HERE"
    checkpoint.setdefault(entry, {})["nested"] = placeholder
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer, _use_new_zipfile_serialization=False)  # a stream: no offsets to keep right
    string = b"X" + struct.pack("<I", len(placeholder)) + placeholder.encode()  # BINUNICODE
    assert buffer.getvalue().count(string) == 1
    path.write_bytes(buffer.getvalue().replace(string, b"]" * (depth + 1) + b"a" * depth))  # EMPTY_LIST, APPEND
    return path


# The schema: every saved hyperparameter is checked, every value that passes is plain.


def test_every_saved_hyperparameter_has_a_check_and_every_parameter_a_value() -> None:
    module = ImageClassifier(num_classes=4)
    assert set(module.hparams) == set(ImageClassifier.HPARAMS_SCHEMA)  # a new argument cannot skip the schema
    kwargs = init_kwargs(ImageClassifier, {"num_classes": 5})
    assert set(kwargs) == set(inspect.signature(ImageClassifier.__init__).parameters) - {"self"} | {"_instantiator"}
    assert kwargs["_instantiator"] is None and kwargs["num_classes"] == 5 and kwargs["weights"] is None


def plain_leaves(hint: object) -> set[object]:
    """The types a value of ``hint`` may hold, through unions, containers and literals."""
    if typing.get_origin(hint) is typing.Literal:
        return {type(arg) for arg in typing.get_args(hint)}
    args = typing.get_args(hint)
    return set().union(*(plain_leaves(arg) for arg in args)) if args else {hint}


def test_the_options_a_checkpoint_sets_are_typed_so_no_parser_resolves_code() -> None:
    """jsonargparse imports what a string names, and reads YAML out of a string, only for class-, callable- or
    Any-typed options: a value a checkpoint sets is assigned to none of those."""
    hints = typing.get_type_hints(ImageClassifier.__init__)
    for name in ImageClassifier.HPARAMS_SCHEMA:
        assert plain_leaves(hints[name]) <= set(PLAIN_TYPES), name


LEGAL = {"arch": "resnet_tiny", "arch_kwargs": {"in_channels": 3}, "expert_lr": 0.01, "label_smoothing": 0.1}


def test_legal_values_pass_as_plain_values_and_caller_only_entries_are_ignored(tmp_path: Path) -> None:
    ignored = {"weights": "evil.pt", "trust_pickle": True, "optimizer": "os.system", "model": "os:system"}
    path = classifier_checkpoint(tmp_path / "ok.ckpt", converted=True, **LEGAL, **ignored)
    values = untrusted_hparams(ImageClassifier, torch.load(path, weights_only=True), path, "FLAG")
    assert values == {"num_classes": 4, **LEGAL}
    assert all(isinstance(v, (*PLAIN_TYPES, dict)) for v in values.values())
    module = ImageClassifier.load_from_checkpoint(path)
    assert module.optimizer is torch.optim.AdamW and module.label_smoothing == 0.1
    assert "weights" not in module.hparams and "optimizer" not in module.hparams


CODE = "name code to import"
SCHEMA_CASES = [
    ({"arch": "os:system"}, "hyper_parameters.arch='os:system'"),
    ({"arch": "timm:hf-hub:evil/model"}, CODE),
    ({"arch": "../resnet_tiny"}, "arch must be timm:NAME, torchvision:NAME, a built-in model name or None"),
    ({"arch_kwargs": {"x": {"class_path": "calendar.Calendar"}}}, "arch_kwargs.x.class_path='calendar.Calendar'"),
    ({"arch_kwargs": {"x": [1, 2]}}, "arch_kwargs must map names to plain values"),
    ({"arch_kwargs": {"x": float("nan")}}, "arch_kwargs must map names to plain values"),
    ({"arch_kwargs": "{class_path: calendar.Calendar}"}, "arch_kwargs must map names to plain values"),
    ({"num_classes": 1}, "num_classes must be an integer >= 2, got 1"),
    ({"num_classes": 4.0}, "num_classes must be an integer >= 2, got 4.0"),
    ({"num_classes": True}, "num_classes must be an integer >= 2, got True"),
    ({"scheduler_interval": "torch.optim.SGD"}, "scheduler_interval must be one of ('epoch', 'step')"),
    ({"expert_lr": float("inf")}, "expert_lr must be a positive finite number or None"),
    ({"router_lr": "0.1"}, "router_lr must be a positive finite number or None"),
    ({"label_smoothing": 2.0}, "label_smoothing must be a number in [0.0, 1.0], got 2.0"),
    ({"label_smoothing": float("nan")}, "label_smoothing must be a number in [0.0, 1.0], got nan"),
    ({"lr": 0.1}, "hyperparameter 'lr' is not one of ImageClassifier's"),
    ({"_class_path": "calendar.Calendar"}, "hyper_parameters._class_path='calendar.Calendar'"),
    ({"_instantiator": "os.system"}, "hyper_parameters._instantiator='os.system'"),
    ({"model": {"class_path": "torch.nn.Linear"}}, "hyper_parameters.model.class_path='torch.nn.Linear'"),
]


@pytest.mark.parametrize(("entries", "message"), SCHEMA_CASES, ids=[str(c[0])[:40] for c in SCHEMA_CASES])
def test_values_outside_the_schema_are_refused_in_one_line(tmp_path: Path, entries: dict, message: str) -> None:
    path = classifier_checkpoint(tmp_path / "hostile.ckpt", converted=False, **entries)
    with pytest.raises(UntrustedCheckpointError) as refused:
        ImageClassifier.load_from_checkpoint(path)
    assert message in str(refused.value) and str(refused.value).startswith(f"{path}: ")
    assert "\n" not in str(refused.value) and "nothing was built" in str(refused.value)


@pytest.mark.parametrize(
    "entries",
    [
        {"hparams_type": collections.OrderedDict},  # Lightning calls it on the hyperparameters
        {"hparams": {"arch": "os:system"}},  # merged under hyper_parameters by Lightning
        {"module_arguments": [("_class_path", "calendar.Calendar")]},
        {"hparams_name": "arch_kwargs", "hyper_parameters": {"num_classes": 4, "layers": [1]}},  # one argument
    ],
    ids=["hparams_type", "hparams", "module_arguments", "hparams_name"],
)
def test_other_checkpoint_keys_lightning_reads_are_checked_too(tmp_path: Path, entries: dict) -> None:
    path = with_hparams(tmp_path / "hostile.ckpt", **entries)
    with pytest.raises(UntrustedCheckpointError, match="; nothing was built"):
        ImageClassifier.load_from_checkpoint(path)


def test_a_callers_keyword_that_is_no_parameter_is_dropped_as_lightning_drops_it(tmp_path: Path) -> None:
    path = classifier_checkpoint(tmp_path / "ok.ckpt", converted=False)
    assert ImageClassifier.load_from_checkpoint(path, no_such_option=1, label_smoothing=0.2).label_smoothing == 0.2


def test_hparams_file_is_read_only_when_trusted(tmp_path: Path) -> None:
    path = classifier_checkpoint(tmp_path / "ok.ckpt", converted=False)
    hparams = tmp_path / "hparams.yaml"
    hparams.write_text("num_classes: 4\noptimizer: !!python/name:os.system\n")  # yaml.full_load builds os.system
    with pytest.raises(UntrustedCheckpointError, match=r"^hparams_file .*hparams\.yaml: its values would reach"):
        ImageClassifier.load_from_checkpoint(path, hparams_file=hparams)
    trusted = ImageClassifier.load_from_checkpoint(path, hparams_file=hparams, trust_checkpoint=True)
    assert trusted.optimizer is os.system  # the caller's decision: Lightning's behaviour


# Sizes from a file are bounded by its weights, before anything is allocated.


def test_a_size_larger_than_the_weights_is_refused_before_allocation(tmp_path: Path) -> None:
    """4,194,304 classes: a 2 GiB classifier (128 inputs) beside weights for 4 classes."""
    path = classifier_checkpoint(tmp_path / "huge.ckpt", converted=False, num_classes=2**31 // (4 * 128))
    script = PRELUDE + textwrap.dedent(
        f"""
        from condconv_lightning.finetune import ImageClassifier

        reset_peak()
        try:
            ImageClassifier.load_from_checkpoint({str(path)!r})
        except ValueError as error:
            print(error)
        print(peak_growth() // 2**20)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    refusal, max_rss_mib = done.stdout.strip().splitlines()[-2:]
    classes = 2**31 // (4 * 128)
    needed = 309504 + (classes - 4) * (128 + 1)  # the checkpoint's values, with a classifier that large
    assert f"with {needed} weight values but its weights hold 309504: the sizes do not come" in refusal
    assert int(max_rss_mib) < 1024, done.stderr[-2000:]  # the classifier alone is 2048 MiB


def test_a_depth_from_the_file_stops_the_sizing_build_early(tmp_path: Path) -> None:
    """Even on the meta device a module of 10**7 layers would cost minutes and gigabytes of Python objects."""

    class Deep(pl.LightningModule):
        def __init__(self, depth: int = 2) -> None:
            super().__init__()
            self.layers = nn.Sequential(*(nn.Linear(4, 4) for _ in range(depth)))

    checkpoint = {"state_dict": Deep().state_dict(), "hyper_parameters": {"depth": 10**7}}
    with pytest.raises(UntrustedCheckpointError, match=r"more than 1040 parameters and layers, more than its weights"):
        untrusted_hparams(Deep, checkpoint, "deep.ckpt", "FLAG")


def test_a_user_module_is_sized_by_its_weights_too(tmp_path: Path) -> None:
    path = plain_checkpoint(tmp_path / "wide.ckpt", width=10**8)
    with pytest.raises(
        ModelFileError, match=r"with 500000000 weight values but its weights hold 40: .*--trust-pickle$"
    ):
        load_model(path, arch=PLAIN_ARCH)
    assert load_model(plain_checkpoint(tmp_path / "ok.ckpt"), arch=PLAIN_ARCH).model.net.out_features == 8


# Plain data: bounded depth and size, one line; a user's module gets checked values only.


@pytest.mark.parametrize("entry", ["hyper_parameters", "loops", "callbacks"])
def test_a_checkpoint_nested_beyond_pythons_stack_is_one_line(tmp_path: Path, entry: str) -> None:
    """Hyperparameters reach __init__; the other entries reach Lightning's readers, which recurse (a resumed Trainer
    deep-copies every callback state)."""
    message = rf"the checkpoint nests deeper than {MAX_DEPTH} levels \(at the checkpoint\.{entry}\.nested\[0\]"
    base = classifier_checkpoint(tmp_path / "base.ckpt", converted=False)
    with pytest.raises(UntrustedCheckpointError, match=message):
        ImageClassifier.load_from_checkpoint(deeply_nested(tmp_path / "deep.ckpt", 50_000, base, entry))
    plain = deeply_nested(tmp_path / "deep-plain.ckpt", 50_000, plain_checkpoint(tmp_path / "plain.ckpt"), entry)
    with pytest.raises(ModelFileError, match=message):
        load_model(plain, arch=PLAIN_ARCH)


def test_many_values_are_refused_and_a_shallow_structure_passes(tmp_path: Path) -> None:
    checkpoint = {"state_dict": PlainModule().state_dict(), "hyper_parameters": {"config": {"a": [[0] * 10**5]}}}
    with pytest.raises(UntrustedCheckpointError, match="holds more than 100000 values"):
        untrusted_hparams(PlainModule, checkpoint, "big.ckpt", "FLAG")
    checkpoint["hyper_parameters"] = {"config": {"a": [[0] * 10] * 10, "b": "text"}}
    assert untrusted_hparams(PlainModule, checkpoint, "ok.ckpt", "FLAG") == checkpoint["hyper_parameters"]


def test_hparams_name_hands_the_checked_values_as_one_argument(tmp_path: Path) -> None:
    """Lightning's older layout: all hyperparameters are the one argument ``hparams_name`` names."""
    path = plain_checkpoint(tmp_path / "named.ckpt", lr=0.5)
    checkpoint = torch.load(path, weights_only=True)
    torch.save({**checkpoint, "hparams_name": "config"}, path)
    loaded = load_model(path, arch=PLAIN_ARCH).model
    assert loaded.hparams["config"] == {"width": 8, "config": None, "lr": 0.5}


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
    path = classifier_checkpoint(
        tmp_path / "pretrained.ckpt", converted=False, arch="timm:resnet18", arch_kwargs={switch: True}
    )
    with pytest.raises(UntrustedCheckpointError, match=rf"arch timm:resnet18: {message}"):
        ImageClassifier.load_from_checkpoint(path)


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


# Conversion entries: every malformed one is a one-line ValueError naming its key.


@pytest.mark.parametrize(
    ("key", "entry"),
    [
        ("condconv_conversion_spec", ["model.layer4"]),
        ("condconv_conversion_spec", {"layers": ["layer4"]}),
        ("condconv_conversion_spec", {"layers": {4: {}}}),
        ("condconv_conversion", ["model.layer4"]),
        ("condconv_conversion", {"format": 1, "layers": {"model.layer4": "x"}}),
    ],
    ids=["legacy-list", "legacy-layers-list", "legacy-layer-name", "list", "options"],
)
def test_malformed_conversion_entries_are_one_line_errors_naming_the_key(tmp_path: Path, key: str, entry) -> None:
    path = with_hparams(tmp_path / "damaged.ckpt", **{key: entry})
    with pytest.raises(ValueError, match=rf"^checkpoint entry '{key}'") as raised:
        ImageClassifier.load_from_checkpoint(path)
    assert "\n" not in str(raised.value) and str(raised.value).endswith("the checkpoint is damaged")


# condconv-finetune --ckpt_path: values are assigned, never parsed; nothing the file names is imported.


@pytest.mark.slow
def test_ckpt_path_strings_bound_to_code_typed_options_import_nothing(tmp_path: Path) -> None:
    (tmp_path / "hostile.py").write_text(HOSTILE_MODULE)
    path = classifier_checkpoint(
        tmp_path / "hostile.ckpt",
        optimizer="hostile.Anything",
        scheduler="hostile.Anything",
        model="{class_path: hostile.Anything, init_args: {}}",
    )
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["datamodule_hyper_parameters"] = {"_class_path": "hostile.Anything"}  # Lightning's CLI skips it
    torch.save(checkpoint, path)
    small = ["--data.val_size", "8", "--data.train_size", "8", "--data.batch_size", "8", "--trainer.logger", "false"]
    done = run_script("condconv-finetune", "validate", "--ckpt_path", path, *small, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "imported").exists() and not (tmp_path / "built").exists()
    hostile = {
        "huge": (classifier_checkpoint(tmp_path / "huge.ckpt", num_classes=2**22), "the sizes do not come from"),
        "deep": (deeply_nested(tmp_path / "deep.ckpt", 50_000, path, "callbacks"), "the checkpoint nests deeper"),
    }
    for checkpoint, message in hostile.values():
        refused = run_script("condconv-finetune", "validate", "--ckpt_path", checkpoint, *small, cwd=tmp_path)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
        assert message in refused.stderr.strip().splitlines()[-1]


def test_ckpt_path_yaml_in_a_string_stays_a_string(
    registries: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``arch_kwargs`` hold plain values by their annotation too, so jsonargparse never reads YAML out of one."""
    from condconv_lightning.cli.finetune import main
    from condconv_lightning.surgery import convert

    yaml = "{class_path: calendar.Calendar, init_args: {}}"
    module = ImageClassifier(arch="timm:resnet18", arch_kwargs={"note": yaml, "flag": "true"}, num_classes=4)
    convert(module.model, ["layer3", "layer4"])  # as the command's default callback does
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    registries.clear()
    monkeypatch.chdir(tmp_path)
    small = ["--data.val_size", "8", "--data.train_size", "8", "--data.batch_size", "8", "--trainer.logger", "false"]
    main(["validate", "--ckpt_path", str(tmp_path / "run.ckpt"), *small, "--trainer.enable_progress_bar", "false"])
    assert registries and all(kwargs["note"] == yaml and kwargs["flag"] == "true" for _, _, kwargs in registries)


# Honest exits: a run stopped by a signal says so in its exit status.

SIGNAL_AT = textwrap.dedent(
    """
    import os
    import signal

    from lightning.pytorch import Callback


    class SignalAt(Callback):
        \"\"\"Send a signal to this process after a given training step: a pre-emption, at a known point.\"\"\"

        def __init__(self, step: int, name: str) -> None:
            self.step, self.name = step, name

        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == self.step:
                os.kill(os.getpid(), getattr(signal, self.name))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "status", "saved"),
    [("SIGTERM", 143, (1, 2, 3)), ("SIGINT", 130, (1, 2))],  # Ctrl-C interrupts step 3's callbacks
)
def test_a_signal_stops_the_run_with_its_exit_status(tmp_path: Path, name: str, status: int, saved: tuple) -> None:
    (tmp_path / "signal_at.py").write_text(SIGNAL_AT)
    done = run_script(
        "condconv-finetune",
        "fit",
        "--trainer.max_steps",
        "40",
        "--data.train_size",
        "160",
        "--data.batch_size",
        "4",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.callbacks+=signal_at.SignalAt",
        "--trainer.callbacks.step",
        "3",
        "--trainer.callbacks.name",
        name,
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps",
        "1",
        "--trainer.callbacks.save_top_k",
        "-1",
        "--trainer.callbacks.dirpath",
        tmp_path / "checkpoints",
        cwd=tmp_path,
        # A shell starts background jobs with SIGINT ignored, and a child inherits that; the run stands for
        # one started at a terminal, where Ctrl-C interrupts.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert done.returncode == status, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"condconv-finetune: stopped by {name} at step 3; checkpoints written before it are kept"
    )
    written = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in written] == [f"epoch=0-step={step}.ckpt" for step in saved]
    for path in written:
        assert isinstance(ImageClassifier.load_from_checkpoint(path).model, nn.Module)


# A resumed ModelCheckpoint deletes the checkpoints it replaces: never a path the file leads out of its folder.


@pytest.mark.parametrize(
    ("path", "kept"),
    [
        ("FOLDER/epoch=0-step=2.ckpt", True),
        ("/elsewhere/old-run/epoch=0-step=2.ckpt", True),  # another folder: Lightning never deletes it
        ("FOLDER/../../precious.txt", False),  # passes Lightning's check, which reads ".." as a folder
        ("s3://bucket/precious.ckpt", False),  # every remote path passes that check
        (["not", "a", "path"], False),
    ],
)
def test_resumed_checkpoint_paths_that_lead_out_of_the_folder_are_dropped(tmp_path: Path, path, kept: bool) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from condconv_lightning.cli.finetune import SafeCheckpointPaths

    folder = tmp_path / "checkpoints"
    callback = ModelCheckpoint(dirpath=folder)
    path = path.replace("FOLDER", str(folder)) if isinstance(path, str) else path
    state = {"best_model_path": path, "last_model_path": "", "best_k_models": {path: 0.5} if kept else []}
    checkpoint = {"callbacks": {callback.state_key: state}}
    trainer = types.SimpleNamespace(callbacks=[callback])
    if kept:
        SafeCheckpointPaths().on_load_checkpoint(trainer, None, checkpoint)  # type: ignore[arg-type]
        assert state["best_model_path"] == path and state["best_k_models"] == {path: 0.5}
    else:
        with pytest.warns(UserWarning, match=r"ignored \d checkpoint paths in its ModelCheckpoint state that lead"):
            SafeCheckpointPaths().on_load_checkpoint(trainer, None, checkpoint)  # type: ignore[arg-type]
        assert state["best_model_path"] == "" and state["best_k_models"] == {}


@pytest.mark.slow
def test_resuming_a_hostile_checkpoint_deletes_nothing_outside_the_run(tmp_path: Path) -> None:
    small = ["--trainer.max_steps", "2", "--data.train_size", "8", "--data.val_size", "8", "--data.batch_size", "4"]
    first = run_script("condconv-finetune", "fit", *small, "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    checkpoint = torch.load(next(tmp_path.glob("lightning_logs/version_0/checkpoints/*.ckpt")), weights_only=True)
    (state,) = [state for key, state in checkpoint["callbacks"].items() if key.startswith("ModelCheckpoint")]
    del state["dirpath"]  # so that Lightning restores every path as its own
    state["best_model_path"] = "lightning_logs/version_1/checkpoints/../../../precious.txt"
    torch.save(checkpoint, tmp_path / "hostile.ckpt")
    (tmp_path / "precious.txt").write_text("kept")
    resumed = run_script(
        "condconv-finetune", "fit", "--ckpt_path", "hostile.ckpt", *small[:1], "4", *small[2:], cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (tmp_path / "precious.txt").read_text() == "kept"
    assert "ignored 1 checkpoint paths in its ModelCheckpoint state that lead out of" in resumed.stderr
