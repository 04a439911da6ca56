"""A user's own LightningModule, converted by the callback, reloads and resumes from its checkpoints.

The modules here are not ImageClassifier: ``PlainClassifier`` is what a user writes, and
``MyClassifier`` the same plus ``ConversionCheckpointMixin``. Reloading happens in a fresh
interpreter (nothing of the training process survives), and the outputs must be the trained
ones exactly: the same weights, bit for bit, through the same strategy (named, not ``auto``)
on the same machine with the same number of threads run the same kernels.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from condconv_lightning import CondConv2d, convert, load_converted_checkpoint
from condconv_lightning.callbacks import CondConvConversion
from condconv_lightning.checkpoints import LIGHTNING_INSTANTIATOR, UntrustedCheckpointError
from condconv_lightning.finetune import ImageClassifier, save_conversion

USER_MODULE = textwrap.dedent(
    """
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F

    from condconv_lightning.demos import resnet_tiny
    from condconv_lightning.finetune import ConversionCheckpointMixin


    class PlainClassifier(pl.LightningModule):
        def __init__(self, num_classes: int = 4, lr: float = 0.05) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = resnet_tiny(num_classes)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


    class MyClassifier(ConversionCheckpointMixin, PlainClassifier):
        pass


    class WithActivation(PlainClassifier):
        def __init__(self, activation: torch.nn.Module | None = None, num_classes: int = 4) -> None:
            super().__init__(num_classes)
            self.activation = activation


    class WithExtraHead(PlainClassifier):
        def __init__(self, num_classes: int = 4) -> None:
            super().__init__(num_classes)
            self.extra = torch.nn.Linear(2, 2)
    """
)
NO_RELOAD_WARNING = (
    "CondConvConversion: PlainClassifier does not rebuild converted layers when it loads a checkpoint: "
    "PlainClassifier.load_from_checkpoint(path) will fail with size mismatches, and so will a Trainer given "
    "ckpt_path without this callback (resuming with this callback works); mix ConversionCheckpointMixin into "
    "PlainClassifier, or load its checkpoints with condconv_lightning.load_converted_checkpoint(PlainClassifier, path)"
)


def batches() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(16, 3, 16, 16, generator=generator), torch.randint(4, (16,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=4)


def trainer(root: Path, max_steps: int, callbacks: list[Callback]) -> Trainer:
    return Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


class OutputsAtStart(Callback):
    """Records the module's eval outputs on ``probe`` when training starts (after a checkpoint restore)."""

    def __init__(self, probe: torch.Tensor) -> None:
        self.probe = probe
        self.outputs: torch.Tensor | None = None

    def on_train_start(self, trainer: Trainer, pl_module) -> None:
        pl_module.eval()
        with torch.no_grad():
            self.outputs = pl_module(self.probe)
        pl_module.train()


@pytest.fixture()
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "user_module.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import user_module

    yield user_module
    sys.modules.pop("user_module", None)


CONVERSION = {"num_experts": 3, "seed": 0, "verbose": False, "strategy": "grouped"}
"""Not "auto": it may time, then pick, per process, and round differently."""


def trained_checkpoint(tmp_path: Path, model: LightningModule) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """Fit ``model`` two steps with layer3 and layer4 converted and save a checkpoint: (checkpoint, probe, the
    trained model's outputs on the probe). The probe is also saved, as ``probe.pt``, for other processes."""
    trainer(tmp_path, 2, [CondConvConversion(["layer3", "layer4"], submodule="net", **CONVERSION)]).fit(
        model, batches()
    )
    checkpoint = tmp_path / "trained.ckpt"
    model.trainer.save_checkpoint(checkpoint)
    probe = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        trained = model(probe)
    torch.save(probe, tmp_path / "probe.pt")
    return checkpoint, probe, trained


def outputs_in_a_fresh_process(tmp_path: Path, imports: str, load: str) -> torch.Tensor:
    """The probe's outputs of the module ``load`` (an expression, after ``imports``) builds in a new process,
    with this process's thread count (other thread counts may split sums otherwise)."""
    reload = "\n".join(
        [
            "import torch",
            imports,
            f"torch.set_num_threads({torch.get_num_threads()})",
            f"model = {load}.eval()",
            "with torch.no_grad():",
            f"    torch.save(model(torch.load({str(tmp_path / 'probe.pt')!r})), {str(tmp_path / 'reloaded.pt')!r})",
        ]
    )
    result = subprocess.run([sys.executable, "-c", reload], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "reloaded.pt")


@pytest.mark.slow
def test_own_module_reloads_in_a_fresh_process_and_resumes_without_the_callback(tmp_path: Path, user_module) -> None:
    torch.manual_seed(0)
    checkpoint, probe, trained = trained_checkpoint(tmp_path, user_module.MyClassifier())
    reloaded = outputs_in_a_fresh_process(
        tmp_path, "from user_module import MyClassifier", f"MyClassifier.load_from_checkpoint({str(checkpoint)!r})"
    )
    assert torch.equal(reloaded, trained)

    fresh = user_module.MyClassifier()  # unconverted: the mixin converts it during the restore
    start = OutputsAtStart(probe)
    trainer(tmp_path, 3, [start]).fit(fresh, batches(), ckpt_path=checkpoint)
    assert torch.equal(start.outputs, trained)
    assert sum(isinstance(m, CondConv2d) for m in fresh.modules()) == 2 * 3  # layer3 and layer4: 3 convs each
    assert fresh.trainer.global_step == 3


@pytest.mark.slow
def test_a_module_without_the_mixin_reloads_with_load_converted_checkpoint_in_a_fresh_process(
    tmp_path: Path, user_module
) -> None:
    """What the warning at fit says: Lightning's loader fails, this one and a resume with the callback work."""
    torch.manual_seed(0)
    checkpoint, probe, trained = trained_checkpoint(tmp_path, user_module.PlainClassifier())
    with pytest.raises(RuntimeError, match=r"^Error\(s\) in loading state_dict for PlainClassifier:"):
        user_module.PlainClassifier.load_from_checkpoint(checkpoint)
    reloaded = outputs_in_a_fresh_process(
        tmp_path,
        "from condconv_lightning import load_converted_checkpoint\nfrom user_module import PlainClassifier",
        f"load_converted_checkpoint(PlainClassifier, {str(checkpoint)!r})",
    )
    assert torch.equal(reloaded, trained)

    fresh = user_module.PlainClassifier()
    start = OutputsAtStart(probe)
    conversion = CondConvConversion(["layer3", "layer4"], submodule="net", **CONVERSION)
    trainer(tmp_path, 3, [conversion, start]).fit(fresh, batches(), ckpt_path=checkpoint)
    assert torch.equal(start.outputs, trained)
    assert fresh.trainer.global_step == 3


def test_a_spec_that_does_not_match_the_weights_is_refused_before_building(user_module) -> None:
    model = user_module.MyClassifier()
    convert(model.net, "layer4", num_experts=2)
    checkpoint: dict = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    checkpoint["condconv_conversion"]["layers"]["net.layer4.0.conv1"]["num_experts"] = 7
    fresh = user_module.MyClassifier()
    with pytest.raises(ValueError, match=r"gives layer 'net.layer4.0.conv1' 7 experts, but the weights hold"):
        fresh.on_load_checkpoint(checkpoint)
    assert not any(isinstance(m, CondConv2d) for m in fresh.modules())


IMAGE_CLASSIFIER_LOADERS = [
    pytest.param(ImageClassifier.load_from_checkpoint, id="load_from_checkpoint"),
    pytest.param(partial(load_converted_checkpoint, ImageClassifier), id="load_converted_checkpoint"),
]


@pytest.mark.parametrize("load", IMAGE_CLASSIFIER_LOADERS)
def test_image_classifier_reads_checkpoints_of_the_first_release(tmp_path: Path, load: Callable) -> None:
    """They stored the spec of ``model`` under another key, with names relative to ``model``."""
    from condconv_lightning import describe

    module = ImageClassifier(num_classes=4)
    convert(module.model, "layer4", num_experts=2, seed=0)
    legacy = {"state_dict": module.state_dict(), "condconv_conversion_spec": describe(module.model).to_dict()}
    torch.save(
        {**legacy, "hyper_parameters": {"num_classes": 4}, "pytorch-lightning_version": "2.6.6"}, tmp_path / "a.ckpt"
    )
    reloaded = load(tmp_path / "a.ckpt").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(reloaded(x), module.eval()(x))


def checkpoint_of(module: torch.nn.Module, path: Path, **entries: object) -> Path:
    """``module``'s weights and conversion record as a Lightning checkpoint holds them, with ``entries``."""
    checkpoint: dict = {"state_dict": module.state_dict(), "pytorch-lightning_version": "2.6.6", **entries}
    save_conversion(module, checkpoint)
    torch.save(checkpoint, path)
    return path


def test_load_converted_checkpoint_gives_what_image_classifier_load_from_checkpoint_gives(tmp_path: Path) -> None:
    module = ImageClassifier(num_classes=3, arch="resnet_tiny", router_lr=0.02, label_smoothing=0.1)
    convert(module.model, ["layer3", "layer4.0.conv2"], num_experts=3, seed=0)
    path = checkpoint_of(module, tmp_path / "a.ckpt", hyper_parameters=dict(module.hparams))
    ours, lightnings = load_converted_checkpoint(ImageClassifier, path), ImageClassifier.load_from_checkpoint(path)
    assert dict(ours.hparams) == dict(lightnings.hparams) == dict(module.hparams)
    assert ours.state_dict().keys() == lightnings.state_dict().keys() == module.state_dict().keys()
    assert all(torch.equal(value, lightnings.state_dict()[key]) for key, value in ours.state_dict().items())
    assert [type(m) for m in ours.modules()] == [type(m) for m in lightnings.modules()]


@pytest.mark.parametrize(
    ("name", "submodule", "warned"),
    [("PlainClassifier", "net", 1), ("MyClassifier", "net", 0), ("ImageClassifier", "model", 0)],
)
def test_fit_warns_once_when_the_module_cannot_rebuild_its_conversion_from_a_checkpoint(
    tmp_path: Path, user_module, name: str, submodule: str, warned: int
) -> None:
    module = ImageClassifier(num_classes=4) if name == "ImageClassifier" else getattr(user_module, name)()
    conversion = CondConvConversion("layer4", submodule=submodule, num_experts=2, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, 1, [conversion]).fit(module, batches())
    messages = [str(w.message) for w in caught if str(w.message).startswith("CondConvConversion:")]
    assert messages == [NO_RELOAD_WARNING] * warned


def test_condconv_weights_without_a_conversion_record_are_one_line_naming_the_way_out(
    tmp_path: Path, user_module
) -> None:
    """A weights-only checkpoint of a module without the mixin holds no record: Lightning calls no callback for it."""
    module = user_module.PlainClassifier()
    convert(module.net, ["layer3", "layer4"], num_experts=3)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    torch.save({**checkpoint, "pytorch-lightning_version": "2.6.6"}, tmp_path / "weights.ckpt")
    problem = (
        "its weights hold 6 CondConv2d layers (net.layer3.0.conv1, net.layer3.0.conv2, net.layer3.0.downsample.0 "
        "and 3 more) but no record of their conversion (no 'condconv_conversion' entry), so {0} cannot rebuild them; "
        "convert a fresh {0} as the run did (the same layers and options, num_experts=3), then call its "
        "load_state_dict(checkpoint['state_dict'])"
    )
    with pytest.raises(ValueError) as raised:
        load_converted_checkpoint(user_module.PlainClassifier, tmp_path / "weights.ckpt")
    assert str(raised.value) == f"{tmp_path / 'weights.ckpt'}: {problem.format('PlainClassifier')}"
    with pytest.raises(ValueError) as raised:  # the mixin's restore says the same
        user_module.MyClassifier.load_from_checkpoint(tmp_path / "weights.ckpt")
    assert str(raised.value) == f"checkpoint: {problem.format('MyClassifier')}"


@pytest.mark.parametrize("instantiator", [LIGHTNING_INSTANTIATOR, None])
def test_hyperparameters_naming_code_are_refused_unless_trusted(
    tmp_path: Path, user_module, instantiator: str | None
) -> None:
    """As LightningCLI saves them: a class-typed argument is a ``class_path``, which its instantiator builds."""
    module = user_module.WithActivation()
    convert(module.net, "layer4", num_experts=2, seed=0)
    hparams = {"activation": {"class_path": "torch.nn.ReLU"}, "num_classes": 4}
    if instantiator is not None:
        hparams["_instantiator"] = instantiator
    path = checkpoint_of(module, tmp_path / "cli.ckpt", hyper_parameters=hparams)
    with pytest.raises(UntrustedCheckpointError) as raised:
        load_converted_checkpoint(user_module.WithActivation, path)
    assert str(raised.value) == (
        f"{path}: its hyperparameters name code to import (hyper_parameters.activation.class_path='torch.nn.ReLU'); "
        "nothing was built. If you trust the checkpoint's origin, pass trust_checkpoint=True"
    )
    trusted = load_converted_checkpoint(user_module.WithActivation, path, trust_checkpoint=True)
    if instantiator is None:  # Lightning, too, hands the file's values to __init__ as they are
        assert trusted.activation == {"class_path": "torch.nn.ReLU"}
    else:
        assert isinstance(trusted.activation, torch.nn.ReLU)
    assert all(torch.equal(value, module.state_dict()[key]) for key, value in trusted.state_dict().items())


def test_a_trusted_checkpoint_naming_another_instantiator_is_refused(tmp_path: Path, user_module) -> None:
    """Lightning, too, runs LightningCLI's instantiator only."""
    hparams = {"num_classes": 4, "_instantiator": "os.system"}
    path = checkpoint_of(user_module.PlainClassifier(), tmp_path / "a.ckpt", hyper_parameters=hparams)
    with pytest.raises(ValueError) as raised:
        load_converted_checkpoint(user_module.PlainClassifier, path, trust_checkpoint=True)
    assert str(raised.value) == (
        f"{path}: its hyperparameters name the instantiator 'os.system', which is not LightningCLI's "
        f"({LIGHTNING_INSTANTIATOR}) and is never run; nothing was built"
    )


def test_strict_false_loads_what_fits_and_names_the_rest(tmp_path: Path, user_module) -> None:
    module = user_module.PlainClassifier()
    convert(module.net, "layer4", num_experts=2, seed=0)
    path = checkpoint_of(module, tmp_path / "a.ckpt", hyper_parameters=dict(module.hparams))
    with pytest.raises(RuntimeError) as raised:
        load_converted_checkpoint(user_module.WithExtraHead, path)
    assert str(raised.value) == f"{path}: the weights do not fit the model: missing keys extra.weight, extra.bias"
    with pytest.warns(UserWarning) as warned:
        loaded = load_converted_checkpoint(user_module.WithExtraHead, path, strict=False)
    assert [str(w.message) for w in warned] == [
        f"{path}: loaded with strict=False; missing keys extra.weight, extra.bias"
    ]
    assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in module.state_dict().items())
