"""CondConv Conversion
=====================

Converts the LightningModule's ``nn.Conv2d`` layers into ``CondConv2d`` with
:func:`condconv_lightning.surgery.convert` in ``setup``. Lightning calls callbacks'
``setup`` before ``configure_model``, before restoring a checkpoint, before wrapping
the model for DDP and before creating optimizers (``Trainer._run``), so optimizers
see the new parameters and a checkpoint of a converted run loads into the converted
model. (Lightning's former ``QuantizationAwareTraining`` did its surgery in
``on_fit_start`` and needed workarounds to resume; this callback does not.)
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from rich.console import Console
from torch import nn
from typing_extensions import override

from ..surgery import ConversionReport, convert

__all__ = ["CondConvConversion"]


class CondConvConversion(Callback):
    r"""Convert selected ``nn.Conv2d`` layers to ``CondConv2d`` when the Trainer sets up.

    Every argument except ``submodule`` and ``verbose`` is passed to
    :func:`condconv_lightning.surgery.convert`, which documents it. Conversion is
    idempotent: layers that are already ``CondConv2d`` (a second ``setup`` for
    ``validate``/``test``, or a model loaded from a converted file) are left as they
    are and reported as already converted. Every process converts its own replica;
    DDP then broadcasts rank zero's parameters, so all ranks start identical.

    Args:
        layers: selectors of the convolutions to convert (dotted names, prefixes such
            as ``"layer3"``, globs, regexes), relative to ``submodule``.
        num_experts: K, the number of experts per converted layer.
        routing: ``"sigmoid"`` (CondConv) or ``"softmax"`` (DynamicConv).
        temperature: initial routing temperature.
        strategy: execution strategy of the converted layers.
        exclude: selectors of convolutions to leave alone.
        init: ``"upcycle"`` (exact: the converted model computes what the original did)
            or ``"fresh"``.
        perturbation: scale of the zero-sum symmetry-breaking offsets of upcycling.
        seed: seed of those offsets (None: the global generator, see ``seed_everything``).
        kernel_sizes: convert only convolutions with these kernel sizes.
        min_channels: convert only convolutions with at least this many input and output channels.
        include_depthwise: also convert depthwise convolutions.
        input_size: input shape ``(C, H, W)`` used to report extra MACs per sample.
        submodule: dotted path of the module to convert inside the LightningModule
            (``"model"`` for :class:`~condconv_lightning.finetune.ImageClassifier`);
            None converts the LightningModule itself (names then start with its attributes).
        verbose: print the conversion report (a rich table) on rank zero.

    Raises:
        ValueError: at setup, when ``submodule`` does not exist, or (``SelectorError``)
            when a selector matches no convolution.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from condconv_lightning.callbacks import CondConvConversion
        >>> trainer = Trainer(callbacks=[CondConvConversion(["layer3", "layer4"], num_experts=4, submodule="model")])
    """

    def __init__(
        self,
        layers: Union[str, list[str]],
        num_experts: int = 4,
        routing: Literal["sigmoid", "softmax"] = "sigmoid",
        temperature: float = 1.0,
        strategy: Literal["auto", "grouped", "mixture", "bmm"] = "auto",
        exclude: Union[str, list[str], None] = None,
        init: Literal["upcycle", "fresh"] = "upcycle",
        perturbation: float = 0.05,
        seed: Optional[int] = None,
        kernel_sizes: Optional[list[Union[int, tuple[int, int]]]] = None,
        min_channels: int = 0,
        include_depthwise: bool = True,
        input_size: Optional[tuple[int, ...]] = None,
        submodule: Optional[str] = None,
        verbose: bool = True,
    ) -> None:
        self.layers = layers
        self.options = {
            "num_experts": num_experts,
            "routing": routing,
            "temperature": temperature,
            "strategy": strategy,
            "exclude": exclude,
            "init": init,
            "perturbation": perturbation,
            "seed": seed,
            "kernel_sizes": kernel_sizes,
            "min_channels": min_channels,
            "include_depthwise": include_depthwise,
            "input_size": input_size,
        }
        self.submodule = submodule
        self.verbose = verbose
        self.report: Optional[ConversionReport] = None

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self.report = convert(self._target(pl_module), self.layers, **self.options)
        if self.verbose:
            _print_report(self.report)

    def _target(self, pl_module: "pl.LightningModule") -> nn.Module:
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
