"""CondConv Conversion
=====================

Converts the LightningModule's ``nn.Conv2d`` layers into ``CondConv2d`` with
:func:`condconv_lightning.surgery.convert` in ``setup``. Lightning calls callbacks'
``setup`` before ``configure_model``, before restoring a checkpoint, before wrapping
the model for DDP and before creating optimizers (``Trainer._run``), so optimizers
see the new parameters and a checkpoint of a converted run loads into the converted
model. (Lightning's former ``QuantizationAwareTraining`` did its surgery in
``on_fit_start`` and needed workarounds to resume; this callback does not.)

Without the callback, nothing converts a fresh instance before its weights load unless the
LightningModule does it in ``on_load_checkpoint``; the callback knows at fit whether the
module's class does, and warns once when it does not, before the run writes checkpoints
that its own ``load_from_checkpoint`` cannot read.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from rich.console import Console
from torch import nn
from typing_extensions import override

from ..finetune.checkpointing import save_conversion
from ..surgery import ConversionConfig, ConversionReport, convert
from ..surgery.convert import with_options

__all__ = ["CondConvConversion"]


class CondConvConversion(Callback):
    r"""Convert selected ``nn.Conv2d`` layers to ``CondConv2d`` when the Trainer sets up.

    Conversion is :func:`condconv_lightning.surgery.convert` with a
    :class:`~condconv_lightning.surgery.ConversionConfig`; it is idempotent: layers that
    are already ``CondConv2d`` (a second ``setup`` for ``validate``/``test``, or a model
    loaded from a converted file) are left as they are and reported as already
    converted. Every process converts its own replica; DDP then broadcasts rank zero's
    parameters, so all ranks start identical. Checkpoints record the conversion; a
    LightningModule with :class:`~condconv_lightning.finetune.ConversionCheckpointMixin`
    rebuilds it in ``load_from_checkpoint`` and in a Trainer restore without this callback.
    For any other class (one whose ``on_load_checkpoint`` is Lightning's), ``fit`` warns once,
    on rank zero, that only :func:`~condconv_lightning.load_converted_checkpoint` and a
    Trainer with this callback can load its checkpoints.

    Args:
        layers: selectors of the convolutions to convert (dotted names, prefixes such
            as ``"layer3"``, globs, regexes), relative to ``submodule``.
        config: the conversion's options (YAML: a ``config:`` mapping of its fields).
        exclude: selectors of convolutions to leave alone.
        input_size: input shape ``(C, H, W)`` for the report's MACs per sample and for
            ``include_squeeze_excitation=False``; None takes the data module's
            ``input_size`` (both built-in data modules have one), if any.
        submodule: dotted path of the module to convert inside the LightningModule
            (``"model"`` for :class:`~condconv_lightning.finetune.ImageClassifier`);
            None converts the LightningModule itself (names then start with its attributes).
        verbose: print the conversion report (a rich table) on rank zero.
        \*\*options: fields of :class:`ConversionConfig` on top of ``config``
            (``num_experts=8``), for Python callers.

    Raises:
        ValueError: at construction, on an invalid option; at setup, when ``submodule``
            does not exist, or (``SelectorError``) when a selector matches no convolution.

    Examples:

        >>> from lightning.pytorch import Trainer
        >>> from condconv_lightning.callbacks import CondConvConversion
        >>> trainer = Trainer(callbacks=[CondConvConversion(["layer3", "layer4"], num_experts=4, submodule="model")])
    """

    def __init__(
        self,
        layers: str | list[str],
        config: ConversionConfig | None = None,
        *,
        exclude: str | list[str] | None = None,
        input_size: tuple[int, ...] | None = None,
        submodule: str | None = None,
        verbose: bool = True,
        **options: Any,
    ) -> None:
        self.layers = layers
        self.config = with_options(config, options)
        self.exclude = exclude
        self.input_size = input_size
        self.submodule = submodule
        self.verbose = verbose
        self.report: ConversionReport | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        input_size = self.input_size or getattr(trainer.datamodule, "input_size", None)
        self.report = convert(
            self._target(pl_module), self.layers, self.config, exclude=self.exclude, input_size=input_size
        )
        if self.verbose:
            _print_report(self.report)
        converted = self.report.converted or self.report.already_converted
        if stage == TrainerFn.FITTING and converted and not is_overridden("on_load_checkpoint", pl_module):
            name = type(pl_module).__name__
            rank_zero_warn(
                f"CondConvConversion: {name} does not rebuild converted layers when it loads a checkpoint: "
                f"{name}.load_from_checkpoint(path) will fail with size mismatches, and so will a Trainer given "
                "ckpt_path without this callback (resuming with this callback works); mix ConversionCheckpointMixin "
                f"into {name}, or load its checkpoints with condconv_lightning.load_converted_checkpoint({name}, path)"
            )

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # the spec travels with the weights even when the module does not save it itself
        save_conversion(pl_module, checkpoint)

    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        if not self.submodule:
            return pl_module
        try:
            return pl_module.get_submodule(self.submodule)
        except AttributeError:
            raise ValueError(
                f"CondConvConversion: the LightningModule has no submodule {self.submodule!r}; set submodule to the "
                "attribute holding the network (or None), and build it in __init__, not configure_model"
            ) from None


@rank_zero_only
def _print_report(report: ConversionReport) -> None:
    Console().print(report)
