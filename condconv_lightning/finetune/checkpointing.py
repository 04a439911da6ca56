"""Checkpoints that carry their conversion, for any LightningModule.

A converted model's state dict loads only into a model converted the same way
(``Unexpected key(s) ...router.weight`` otherwise). As peft stores the adapter config
beside the adapter weights, every checkpoint written here stores the
:class:`~condconv_lightning.surgery.ConversionSpec` of the LightningModule, and loading
applies it before the weights load: Lightning calls ``on_load_checkpoint`` before
``load_state_dict`` both in ``load_from_checkpoint`` and when a Trainer restores
``ckpt_path``. The spec is data: it is validated and checked against the weights
before any layer is built.

A class that does not apply it in ``on_load_checkpoint`` (no
:class:`ConversionCheckpointMixin`) cannot: Lightning gives no other place between
``__init__`` and ``load_state_dict``. :func:`load_converted_checkpoint` loads such a class's
checkpoints by doing Lightning's steps itself, with the conversion between them.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn

from ..checkpoints import CONVERSION_KEY as CHECKPOINT_KEY
from ..checkpoints import build_from_checkpoint, read_checkpoint
from ..messages import name_list
from ..surgery import ConversionSpec, apply_spec, describe
from ..surgery.persist import check_against_weights, load_state
from ..wrappers import strip_keys

__all__ = [
    "ConversionCheckpointMixin",
    "load_converted_checkpoint",
    "restore_conversion",
    "save_conversion",
]

TRUST_FLAG = "trust_checkpoint=True"
ROUTER_SUFFIX = ".router.weight"
Module = TypeVar("Module", bound=pl.LightningModule)


def save_conversion(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Record every CondConv2d of ``module`` in ``checkpoint`` (nothing if it has none)."""
    spec = describe(module)
    if spec.layers:
        checkpoint[CHECKPOINT_KEY] = spec.to_dict()


def restore_conversion(module: nn.Module, checkpoint: dict[str, Any], source: object = "checkpoint") -> None:
    """Convert ``module``'s layers as ``checkpoint`` records, so that its state dict loads; converted ones stay.

    Raises:
        ValueError: in one line naming ``source``: the record is malformed or does not match the weights, or
            there is none but the weights hold CondConv2d layers (``NAME.weight`` ``[K, P]`` beside
            ``NAME.router.weight``) that ``module`` lacks.
    """
    if CHECKPOINT_KEY not in checkpoint:
        _refuse_unrecorded_layers(module, checkpoint.get("state_dict"), source)
        return
    try:
        spec = ConversionSpec.from_dict(checkpoint[CHECKPOINT_KEY])
    except ValueError as error:
        raise ValueError(f"checkpoint entry {CHECKPOINT_KEY!r}: {error}; the checkpoint is damaged") from None
    check_against_weights(spec, checkpoint.get("state_dict", {}), source, module)
    apply_spec(module, spec, upcycle=False)  # the checkpoint's weights replace the experts next


def _refuse_unrecorded_layers(module: nn.Module, state: object, source: object) -> None:
    unrecorded = _unrecorded_layers(module, state)
    if unrecorded:
        experts = set(unrecorded.values())
        options = f", num_experts={experts.pop()}" if len(experts) == 1 else ""
        name = type(module).__name__
        raise ValueError(
            f"{source}: its weights hold {len(unrecorded)} CondConv2d layers ({name_list(list(unrecorded))}) but no "
            f"record of their conversion (no {CHECKPOINT_KEY!r} entry), so {name} cannot rebuild them; convert a "
            f"fresh {name} as the run did (the same layers and options{options}), then call its "
            "load_state_dict(checkpoint['state_dict'])"
        )


def _unrecorded_layers(module: nn.Module, state: object) -> dict[str, int]:
    """The CondConv2d layers whose weights ``state`` holds and ``module`` does not have, with their expert counts."""
    if not isinstance(state, Mapping):
        return {}
    stored = strip_keys({key: value for key, value in state.items() if isinstance(key, str)})
    own = set(strip_keys(module.state_dict(keep_vars=True)))
    found: dict[str, int] = {}
    for key, router in stored.items():
        if not key.endswith(ROUTER_SUFFIX) or key in own:
            continue
        name = key.removesuffix(ROUTER_SUFFIX)
        weight = stored.get(f"{name}.weight")
        if (
            isinstance(router, Tensor)
            and isinstance(weight, Tensor)
            and router.dim() == weight.dim() == 2
            and router.shape[0] == weight.shape[0]
        ):
            found[name] = weight.shape[0]
    return found


def load_converted_checkpoint(
    cls: type[Module],
    checkpoint_path: str | Path | IO[bytes],
    *,
    trust_checkpoint: bool = False,
    map_location: str | torch.device = "cpu",
    strict: bool | None = None,
    **kwargs: Any,
) -> Module:
    """``cls.load_from_checkpoint`` for a checkpoint of a converted run, whatever ``cls`` is: with or without
    :class:`ConversionCheckpointMixin`, its converted layers are rebuilt before the weights load.

    The checkpoint is read once, weights-only (no code from it runs). ``cls`` is built from its
    hyperparameters as Lightning builds it, and ``kwargs`` win over them; unless
    ``trust_checkpoint``, they pass :func:`~condconv_lightning.checkpoints.untrusted_hparams` first,
    as in ``ImageClassifier.load_from_checkpoint`` (the schema of a class that declares one; plain
    data that names no code, sized by the weights, for any other). Then, as in Lightning,
    ``configure_model`` (if the class has one) and ``on_load_checkpoint`` run; the conversion the
    checkpoint records is applied (layer names relative to the LightningModule); and the state
    dict loads.

    Args:
        cls: the LightningModule class the checkpoint was written from.
        checkpoint_path: a Lightning checkpoint (path or binary file object).
        trust_checkpoint: let the hyperparameters reach ``__init__`` unchecked and name classes to
            build (a checkpoint written by LightningCLI is built by its instantiator), as Lightning does.
        map_location: the device of the returned module (the checkpoint is read onto the CPU).
        strict: load the state dict strictly; None takes the module's ``strict_loading`` (True unless
            it says otherwise), as Lightning does. A key that ``strict=False`` lets pass is named in a warning.
        **kwargs: arguments of ``cls.__init__``, over the checkpoint's (those it does not take are
            dropped, as Lightning drops them, unless it takes ``**kwargs``).

    Raises:
        UntrustedCheckpointError: untrusted hyperparameters that name code, fail the schema, or size a
            module larger than the weights.
        ValueError: the file is no checkpoint readable weights-only, or its conversion record is malformed,
            does not match its weights, or is missing beside CondConv2d weights (:func:`restore_conversion`).
        RuntimeError: the weights do not fit the module, in one line naming the first keys.

    Examples:
        >>> model = load_converted_checkpoint(MyClassifier, "last.ckpt")  # a plain LightningModule class
    """
    try:
        read = read_checkpoint(checkpoint_path)
    except pickle.UnpicklingError:  # not torch's advice to unpickle it
        raise ValueError(
            f"{checkpoint_path}: cannot read it weights-only (it holds pickled objects or is damaged)"
        ) from None
    if not isinstance(read.get("state_dict"), Mapping):
        raise ValueError(f"{checkpoint_path} is not a Lightning checkpoint (no 'state_dict'); pass a .ckpt file")
    checkpoint = dict(read)
    module = build_from_checkpoint(
        cls, checkpoint, checkpoint_path, trusted=trust_checkpoint, flag=TRUST_FLAG, given=kwargs
    )
    if is_overridden("configure_model", module):
        module.configure_model()
    module.on_load_checkpoint(checkpoint)
    restore_conversion(module, checkpoint, checkpoint_path)
    strict = module.strict_loading if strict is None else strict
    missing, unexpected = load_state(module, checkpoint["state_dict"], checkpoint_path, strict=strict)
    left = [
        f"{kind} keys {name_list(names)}" for kind, names in (("missing", missing), ("unexpected", unexpected)) if names
    ]
    if left:
        warnings.warn(f"{checkpoint_path}: loaded with strict=False; {'; '.join(left)}", stacklevel=2)
    return module.to(map_location)


class ConversionCheckpointMixin:
    """Mix into a LightningModule so its checkpoints reload into a fresh, unconverted instance.

    Examples:
        >>> class MyClassifier(ConversionCheckpointMixin, pl.LightningModule): ...
        >>> MyClassifier.load_from_checkpoint("last.ckpt")  # converted layers rebuilt first

    A module that overrides the hooks itself calls :func:`save_conversion` and
    :func:`restore_conversion` from them instead. A class without either loads its
    checkpoints with :func:`load_converted_checkpoint`.
    """

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_conversion(self, checkpoint)  # type: ignore[arg-type]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_conversion(self, checkpoint)  # type: ignore[arg-type]
