"""Checkpoints that carry their conversion, for any LightningModule.

A converted model's state dict loads only into a model converted the same way
(``Unexpected key(s) ...router.weight`` otherwise). As peft stores the adapter config
beside the adapter weights, every checkpoint written here stores the
:class:`~condconv_lightning.surgery.ConversionSpec` of the LightningModule, and loading
applies it before the weights load: Lightning calls ``on_load_checkpoint`` before
``load_state_dict`` both in ``load_from_checkpoint`` and when a Trainer restores
``ckpt_path``. The spec is data: it is validated and checked against the weights
before any layer is built.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..checkpoints import CONVERSION_KEY as CHECKPOINT_KEY
from ..surgery import ConversionSpec, apply_spec, describe
from ..surgery.persist import check_against_weights


def save_conversion(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Record every CondConv2d of ``module`` in ``checkpoint`` (nothing if it has none)."""
    spec = describe(module)
    if spec.layers:
        checkpoint[CHECKPOINT_KEY] = spec.to_dict()


def restore_conversion(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Convert ``module``'s layers as ``checkpoint`` records, so that its state dict loads; converted ones stay."""
    if CHECKPOINT_KEY in checkpoint:
        try:
            spec = ConversionSpec.from_dict(checkpoint[CHECKPOINT_KEY])
        except ValueError as error:
            raise ValueError(f"checkpoint entry {CHECKPOINT_KEY!r}: {error}; the checkpoint is damaged") from None
        check_against_weights(spec, checkpoint.get("state_dict", {}), "checkpoint", module)
        apply_spec(module, spec, upcycle=False)  # the checkpoint's weights replace the experts next


class ConversionCheckpointMixin:
    """Mix into a LightningModule so its checkpoints reload into a fresh, unconverted instance.

    Examples:
        >>> class MyClassifier(ConversionCheckpointMixin, pl.LightningModule): ...
        >>> MyClassifier.load_from_checkpoint("last.ckpt")  # converted layers rebuilt first

    A module that overrides the hooks itself calls :func:`save_conversion` and
    :func:`restore_conversion` from them instead.
    """

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_conversion(self, checkpoint)  # type: ignore[arg-type]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_conversion(self, checkpoint)  # type: ignore[arg-type]
