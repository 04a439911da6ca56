"""``condconv-finetune``: LightningCLI for fine-tuning CondConv image classifiers.

Defaults run out of the box on CPU: the model is :class:`ImageClassifier` around
``resnet_tiny``, the data :class:`SyntheticImageDataModule`, and the Trainer's
callbacks convert ``layer3`` and ``layer4`` on the fly (:class:`CondConvConversion`)
and monitor routing (:class:`RoutingEntropyMonitor`). Any LightningDataModule can
replace the data by ``class_path``; a ``trainer.callbacks`` list in a config replaces
the default callbacks (``--trainer.callbacks+=...`` appends to them instead).

Example::

    condconv-finetune fit --trainer.max_steps 10
    condconv-finetune fit --config examples/configs/ddp.yaml --trainer.devices 8
"""

from __future__ import annotations

from typing import Optional

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ..callbacks import CondConvConversion, RoutingEntropyMonitor
from .data import SyntheticImageDataModule
from .module import ImageClassifier

__all__ = ["main"]


class FinetuneCLI(LightningCLI):
    """LightningCLI with defaults for data (any LightningDataModule is accepted) and for the Trainer's callbacks."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults(
            {
                "data": {"class_path": _class_path(SyntheticImageDataModule)},
                "trainer.callbacks": [
                    {"class_path": _class_path(CondConvConversion), "init_args": {"layers": ["layer3", "layer4"], "submodule": "model", "input_size": [3, 32, 32]}},
                    {"class_path": _class_path(RoutingEntropyMonitor)},
                ],
            }
        )


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of ``condconv-finetune`` (``args`` replaces ``sys.argv[1:]``, for tests and notebooks)."""
    FinetuneCLI(ImageClassifier, LightningDataModule, subclass_mode_data=True, save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()
