"""A LightningModule that fine-tunes any image classifier, CondConv-aware.

Cross-entropy and torchmetrics accuracy; the optimizer and learning-rate scheduler
are injected as callables (LightningCLI's ``OptimizerCallable``/``LRSchedulerCallable``
pattern), and the parameters are split into three groups (the network, the CondConv
experts, the CondConv routers) so experts and routers can get learning rates of their
own: a fresh router on top of upcycled experts usually wants a different step size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from ..arguments import (
    PlainValue,
    check_choice,
    check_int_at_least,
    check_model_name,
    check_number_in,
    check_plain_kwargs,
    check_positive_or_none,
)
from ..checkpoints import UntrustedCheckpointError, init_kwargs, read_checkpoint, untrusted_hparams
from ..condconv2d import CondConv2d
from ..loading.architectures import accepts, build_with, resolve_architecture
from ..loading.model_file import load_pretrained
from .checkpointing import CHECKPOINT_KEY, ConversionCheckpointMixin

__all__ = ["ImageClassifier", "parameter_groups"]

LEGACY_KEY = "condconv_conversion_spec"
"""Where the first release stored the spec of ``model`` (now :data:`CHECKPOINT_KEY`, for the whole module)."""
SCHEDULER_INTERVALS = ("epoch", "step")
OWN_LR = "use the optimizer's"


def parameter_groups(
    model: nn.Module, expert_lr: float | None = None, router_lr: float | None = None
) -> list[dict[str, Any]]:
    """Optimizer parameter groups ``base``, ``experts`` (CondConv2d ``weight``/``bias``) and ``routers``.

    Each parameter appears once (shared layers too); frozen parameters are left out, and so
    are empty groups. A group gets ``lr`` only when its learning rate is given, so it
    otherwise inherits the optimizer's.
    """
    experts: set[int] = set()
    routers: set[int] = set()
    for module in model.modules():
        if isinstance(module, CondConv2d):
            experts.update(id(p) for p in (module.weight, module.bias) if p is not None)
            routers.update(id(p) for p in module.router.parameters())
    groups: dict[str, dict[str, Any]] = {
        "base": {"params": [], "name": "base"},
        "experts": {"params": [], "name": "experts"},
        "routers": {"params": [], "name": "routers"},
    }
    for lr, name in ((expert_lr, "experts"), (router_lr, "routers")):
        if lr is not None:
            groups[name]["lr"] = lr
    for parameter in model.parameters():
        if parameter.requires_grad:
            name = "experts" if id(parameter) in experts else "routers" if id(parameter) in routers else "base"
            groups[name]["params"].append(parameter)
    return [group for group in groups.values() if group["params"]]


def _network(arch: str | None, arch_kwargs: dict[str, PlainValue] | None, num_classes: int) -> nn.Module:
    """The network ``arch`` names (default ``resnet_tiny``), given ``num_classes`` when it takes that argument."""
    builder = resolve_architecture(arch or "resnet_tiny", "arch")
    kwargs = dict(arch_kwargs or {})
    if "num_classes" not in kwargs and accepts(builder, "num_classes"):
        kwargs["num_classes"] = num_classes
    return build_with(builder, arch or "resnet_tiny", kwargs, "arch")


class ImageClassifier(ConversionCheckpointMixin, pl.LightningModule):
    """Image classification with cross-entropy and accuracy, for any network, CondConv or not.

    The network is ``self.model``; convert it in Python first, or let
    :class:`~condconv_lightning.callbacks.CondConvConversion` (``submodule="model"``)
    convert it when the Trainer sets up.

    Args:
        model: the network (images ``[B, C, H, W]`` -> logits ``[B, num_classes]``).
            None builds ``arch``, else :func:`condconv_lightning.demos.resnet_tiny`.
        arch: the network by name, built without downloading weights: ``timm:NAME``,
            ``torchvision:NAME``, a built-in model (``resnet_tiny``) or
            ``module.path:ClassOrFactory``
            (:mod:`condconv_lightning.loading.architectures`); ``num_classes`` is passed
            to it when it takes that argument.
        arch_kwargs: more keyword arguments for ``arch`` (they win over ``num_classes``): plain
            values (``str``, ``bool``, ``int``, finite ``float``, None), since they are saved with
            the hyperparameters. A registry model refuses its download switches here
            (``pretrained``, ``weights``, ...): pass ``weights`` instead.
        weights: a local weights file to start from, loaded before any conversion
            (:func:`condconv_lightning.loading.load_pretrained`): a pretrained state dict,
            safetensors or Lightning ``.ckpt`` (a classifier of another size is left out
            and the new one kept, with a warning), or a file written by
            ``condconv-convert``/``save_converted`` (its conversion spec is applied first).
        trust_pickle: allow ``weights`` to be a pickled module (unpickling runs code: only
            for files you trust). Neither ``weights`` nor ``trust_pickle`` is saved with
            the hyperparameters: a checkpoint holds the weights and the conversion spec
            itself, and a trust decision comes from the caller, never from a file.
        num_classes: number of classes (for accuracy and the default network).
        optimizer: builds the optimizer from the parameter groups (YAML:
            ``class_path: torch.optim.SGD`` with ``init_args``).
        scheduler: builds a learning-rate scheduler from the optimizer, or None.
        scheduler_interval: step the scheduler every ``"epoch"`` or every ``"step"``.
        expert_lr: learning rate of CondConv experts (None: the optimizer's).
        router_lr: learning rate of CondConv routers (None: the optimizer's).
        label_smoothing: passed to ``F.cross_entropy``.

    Raises:
        ValueError: ``num_classes`` below 2, an ``expert_lr``/``router_lr`` that is no positive
            finite number, a ``label_smoothing`` outside ``[0, 1]``, ``arch_kwargs`` that are not
            plain values, both ``model`` and ``arch``, or (``ModelFileError``) an ``arch`` or
            ``weights`` that cannot be used, said in one line.

    A checkpoint's hyperparameters are checked against :attr:`HPARAMS_SCHEMA` when the
    checkpoint is not trusted (:meth:`load_from_checkpoint`, ``condconv-finetune --ckpt_path``):
    the validators ``__init__`` applies, and ``arch`` a registry or built-in name only.

    Checkpoints record which layers of ``model`` are CondConv (a
    :class:`~condconv_lightning.surgery.ConversionSpec`), and loading a checkpoint applies
    it first, so ``ImageClassifier.load_from_checkpoint(path)`` rebuilds the converted
    network without the conversion callback.

    SyncBatchNorm: pass ``Trainer(sync_batchnorm=True)`` (CLI ``--trainer.sync_batchnorm
    true``); Lightning converts the BatchNorm layers before wrapping the model in DDP.
    This module adds no option of its own for it. PyTorch's SyncBatchNorm runs on GPUs only.

    Examples:

        >>> from condconv_lightning.demos import resnet_tiny
        >>> module = ImageClassifier(resnet_tiny(num_classes=4), num_classes=4, router_lr=1e-2)
    """

    HPARAMS_SCHEMA: ClassVar[Mapping[str, Callable[[object], object]]] = MappingProxyType(
        {
            "arch": partial(check_model_name, "arch"),
            "arch_kwargs": partial(check_plain_kwargs, "arch_kwargs"),
            "num_classes": partial(check_int_at_least, "num_classes", minimum=2),
            "scheduler_interval": partial(check_choice, "scheduler_interval", choices=SCHEDULER_INTERVALS),
            "expert_lr": partial(check_positive_or_none, "expert_lr", none=OWN_LR),
            "router_lr": partial(check_positive_or_none, "router_lr", none=OWN_LR),
            "label_smoothing": partial(check_number_in, "label_smoothing", low=0.0, high=1.0),
        }
    )
    """Every hyperparameter this module saves, with the check a value from an untrusted checkpoint passes."""

    def __init__(
        self,
        model: nn.Module | None = None,
        arch: str | None = None,
        arch_kwargs: dict[str, PlainValue] | None = None,
        weights: str | Path | None = None,
        trust_pickle: bool = False,
        num_classes: int = 4,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        expert_lr: float | None = None,
        router_lr: float | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        check_int_at_least("num_classes", num_classes, 2)
        check_positive_or_none("expert_lr", expert_lr, OWN_LR)
        check_positive_or_none("router_lr", router_lr, OWN_LR)
        check_choice("scheduler_interval", scheduler_interval, SCHEDULER_INTERVALS)
        check_number_in("label_smoothing", label_smoothing, 0.0, 1.0)
        check_plain_kwargs("arch_kwargs", arch_kwargs)
        if model is not None and arch is not None:
            raise ValueError(f"pass either model or arch ({arch!r}), not both")
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler", "weights", "trust_pickle"])
        if model is None:
            model = _network(arch, arch_kwargs, num_classes)
        if weights is not None:
            label = f"arch {arch}" if arch is not None else f"the model ({type(model).__name__})"
            model = load_pretrained(
                weights, model, trust_pickle=trust_pickle, label=label, trust_flag="trust_pickle=True"
            )
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scheduler_interval = scheduler_interval
        self.expert_lr = expert_lr
        self.router_lr = router_lr
        self.label_smoothing = label_smoothing
        self.train_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        self.train_accuracy(logits, labels)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_accuracy, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_accuracy(logits, labels)
        self.log("val_loss", F.cross_entropy(logits, labels), prog_bar=True, sync_dist=True)
        self.log("val_acc", self.val_accuracy, prog_bar=True)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(parameter_groups(self, self.expert_lr, self.router_lr))
        if self.scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler(optimizer), "interval": self.scheduler_interval},
        }

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path | IO[bytes],
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        *,
        trust_checkpoint: bool = False,
        **kwargs: Any,
    ) -> ImageClassifier:
        """Lightning's ``load_from_checkpoint``, treating the checkpoint as untrusted unless told otherwise.

        The checkpoint's hyperparameters reach ``__init__`` only as values that pass
        :attr:`HPARAMS_SCHEMA`, sized by the weights beside them
        (:func:`~condconv_lightning.checkpoints.untrusted_hparams`); every other parameter
        (``weights``, ``trust_pickle``, ``optimizer``, ...) takes the caller's ``kwargs`` or
        its default.

        Args:
            hparams_file: hyperparameters replacing the checkpoint's (Lightning's YAML or CSV
                file); read only with ``trust_checkpoint=True``: pass values as ``kwargs`` instead.
            trust_checkpoint: let the checkpoint's (and ``hparams_file``'s) hyperparameters reach
                ``__init__`` unchecked and name classes to build, as Lightning does by default.
                ``weights_only=False`` implies it.

        Raises:
            UntrustedCheckpointError: the hyperparameters name code, fail the schema, or size a
                larger model than the weights, and ``trust_checkpoint`` is False.
        """
        if not (trust_checkpoint or weights_only is False):
            if hparams_file is not None:
                raise UntrustedCheckpointError(
                    f"hparams_file {hparams_file}: its values would reach __init__ unchecked; pass them as keyword "
                    "arguments, or pass trust_checkpoint=True if you trust both files"
                )
            checkpoint = read_checkpoint(checkpoint_path)
            values = untrusted_hparams(cls, checkpoint, checkpoint_path, "trust_checkpoint=True", given=kwargs)
            kwargs = {**init_kwargs(cls, values), **kwargs}
        if weights_only is not None:  # a keyword of newer Lightning releases only
            kwargs["weights_only"] = weights_only
        return super().load_from_checkpoint(checkpoint_path, map_location, hparams_file, strict, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if LEGACY_KEY in checkpoint:  # written by the first release: layer names relative to ``model``
            legacy = checkpoint.pop(LEGACY_KEY)
            layers = legacy.get("layers") if isinstance(legacy, Mapping) else None
            if not isinstance(layers, Mapping) or not all(isinstance(name, str) for name in layers):
                raise ValueError(
                    f"checkpoint entry {LEGACY_KEY!r} is not a conversion spec (a mapping whose 'layers' maps layer "
                    "names to options); the checkpoint is damaged"
                )
            checkpoint[CHECKPOINT_KEY] = {**legacy, "layers": {f"model.{n}": o for n, o in layers.items()}}
        super().on_load_checkpoint(checkpoint)
