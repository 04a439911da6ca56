"""A user's own LightningModule, converted by the callback, reloads and resumes from its checkpoints.

The module here is not ImageClassifier: it is what a user writes, plus
``ConversionCheckpointMixin``. Reloading happens in a fresh interpreter (nothing of the
training process survives), and the outputs must be the trained ones exactly.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader, TensorDataset

from condconv_lightning import CondConv2d
from condconv_lightning.callbacks import CondConvConversion

USER_MODULE = textwrap.dedent(
    """
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F

    from condconv_lightning.demos import resnet_tiny
    from condconv_lightning.finetune import ConversionCheckpointMixin


    class MyClassifier(ConversionCheckpointMixin, pl.LightningModule):
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
    """
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


@pytest.mark.slow
def test_own_module_reloads_in_a_fresh_process_and_resumes_without_the_callback(tmp_path: Path, user_module) -> None:
    torch.manual_seed(0)
    model = user_module.MyClassifier()
    conversion = CondConvConversion(  # not "auto": it may time, then pick, per process, and round differently
        ["layer3", "layer4"], submodule="net", num_experts=3, seed=0, verbose=False, strategy="grouped"
    )
    trainer(tmp_path, 2, [conversion]).fit(model, batches())
    checkpoint = tmp_path / "trained.ckpt"
    model.trainer.save_checkpoint(checkpoint)
    probe = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        trained = model(probe)
    torch.save(probe, tmp_path / "probe.pt")

    reload = textwrap.dedent(
        f"""
        import torch
        from user_module import MyClassifier
        model = MyClassifier.load_from_checkpoint({str(checkpoint)!r}).eval()
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / "probe.pt")!r})), {str(tmp_path / "reloaded.pt")!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", reload], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "reloaded.pt"), trained)

    fresh = user_module.MyClassifier()  # unconverted: the mixin converts it during the restore
    start = OutputsAtStart(probe)
    trainer(tmp_path, 3, [start]).fit(fresh, batches(), ckpt_path=checkpoint)
    assert torch.equal(start.outputs, trained)
    assert sum(isinstance(m, CondConv2d) for m in fresh.modules()) == len(conversion.report.converted)
    assert fresh.trainer.global_step == 3


def test_a_spec_that_does_not_match_the_weights_is_refused_before_building(user_module) -> None:
    model = user_module.MyClassifier()
    from condconv_lightning import convert

    convert(model.net, "layer4", num_experts=2)
    checkpoint: dict = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    checkpoint["condconv_conversion"]["layers"]["net.layer4.0.conv1"]["num_experts"] = 7
    fresh = user_module.MyClassifier()
    with pytest.raises(ValueError, match=r"gives layer 'net.layer4.0.conv1' 7 experts, but the weights hold"):
        fresh.on_load_checkpoint(checkpoint)
    assert not any(isinstance(m, CondConv2d) for m in fresh.modules())


def test_image_classifier_reads_checkpoints_of_the_first_release(tmp_path: Path) -> None:
    """They stored the spec of ``model`` under another key, with names relative to ``model``."""
    from condconv_lightning import convert, describe
    from condconv_lightning.finetune import ImageClassifier

    module = ImageClassifier(num_classes=4)
    convert(module.model, "layer4", num_experts=2, seed=0)
    legacy = {"state_dict": module.state_dict(), "condconv_conversion_spec": describe(module.model).to_dict()}
    torch.save(
        {**legacy, "hyper_parameters": {"num_classes": 4}, "pytorch-lightning_version": "2.6.6"}, tmp_path / "a.ckpt"
    )
    reloaded = ImageClassifier.load_from_checkpoint(tmp_path / "a.ckpt").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(reloaded(x), module.eval()(x))
