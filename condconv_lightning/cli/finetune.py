"""``condconv-finetune``: LightningCLI for fine-tuning CondConv image classifiers.

Defaults run out of the box on CPU: the model is :class:`ImageClassifier` around
``resnet_tiny``, the data :class:`SyntheticImageDataModule`, and the Trainer's
callbacks convert ``layer3`` and ``layer4`` on the fly (:class:`CondConvConversion`)
and monitor routing (:class:`RoutingEntropyMonitor`). Any LightningDataModule can
replace the data by ``class_path``; a ``trainer.callbacks`` list in a config replaces
the default callbacks (``--trainer.callbacks+=...`` appends to them instead).

Examples:

    condconv-finetune fit --trainer.max_steps 10
    condconv-finetune fit --data ImageFolderDataModule --data.root my_images --model.num_classes 3
    condconv-finetune fit --config examples/configs/ddp.yaml --trainer.devices 8
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ..callbacks import CondConvConversion, RoutingEntropyMonitor
from ..checkpoints import UntrustedCheckpointError, plain_hparams, read_hparams
from ..demos.data import SyntheticImageDataModule
from ..finetune.image_folder import ImageFolderDataModule  # noqa: F401 (--data ImageFolderDataModule resolves it)
from ..finetune.module import ImageClassifier

__all__ = ["main"]


class FinetuneCLI(LightningCLI):
    """LightningCLI with defaults for data (any LightningDataModule is accepted) and for the Trainer's callbacks.

    ``--ckpt_path`` checkpoints are untrusted: their hyperparameters become the model's
    defaults only as plain values (entries that name classes are refused unless
    ``--trust_checkpoint true``), and never set ``weights`` or ``trust_pickle``.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--trust_checkpoint",
            type=bool,
            default=False,
            help="let a --ckpt_path checkpoint's hyperparameters name classes to import and build (trusted files only)",
        )
        parser.set_defaults(
            {
                "data": {"class_path": _class_path(SyntheticImageDataModule)},
                "trainer.callbacks": [
                    {
                        "class_path": _class_path(CondConvConversion),
                        "init_args": {"layers": ["layer3", "layer4"], "submodule": "model", "input_size": [3, 32, 32]},
                    },
                    {"class_path": _class_path(RoutingEntropyMonitor)},
                ],
            }
        )

    def _parse_ckpt_path(self) -> None:
        """Use an untrusted checkpoint's hyperparameters as model defaults, as plain values only."""
        subcommand = self.config.get("subcommand")
        settings = self.config.get(subcommand) if subcommand else None
        ckpt_path = settings.get("ckpt_path") if settings else None
        if not ckpt_path or not Path(ckpt_path).is_file() or settings.get("trust_checkpoint"):
            super()._parse_ckpt_path()
            return
        try:
            hparams = plain_hparams(read_hparams(ckpt_path), ckpt_path, "--trust_checkpoint true")
        except (UntrustedCheckpointError, OSError, RuntimeError) as error:
            self.parser.error(str(error))
        hparams = {key: value for key, value in hparams.items() if key not in ("weights", "trust_pickle")}
        if hparams:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def main(args: list[str] | None = None) -> None:
    """Entry point of ``condconv-finetune`` (``args`` replaces ``sys.argv[1:]``, for tests and notebooks)."""
    FinetuneCLI(
        ImageClassifier, LightningDataModule, subclass_mode_data=True, save_config_kwargs={"overwrite": True}, args=args
    )


if __name__ == "__main__":
    main()
