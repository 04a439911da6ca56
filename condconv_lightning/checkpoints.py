"""What a Lightning checkpoint may decide when it is loaded: data, never code.

Lightning rebuilds a LightningModule from the ``hyper_parameters`` stored in its
checkpoint, merged over those under the keys of older releases (``hparams``,
``module_arguments``), which are checked alike. Two kinds of entry there name code: ``_instantiator`` (LightningCLI's
function that builds the module) and ``class_path`` / ``_class_path`` entries
(jsonargparse imports the class they name and builds it with arguments from the
file). A checkpoint from anywhere is untrusted: such entries are refused unless the
caller says it trusts the file, and Lightning's own ``instantiate_module`` is
dropped, so ``__init__`` receives the plain values only (what LightningCLI itself
does when it reads hyperparameters for ``--ckpt_path``). An ``arch`` entry names code
when it is an import path (``module.path:callable``); registry names such as
``timm:resnet50`` and the built-in model names are data.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from typing import IO, Any

from .io import PathLike, load_weights_only

LIGHTNING_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
CLASS_PATH_KEYS = frozenset({"class_path", "_class_path"})
HPARAMS_KEY = "hyper_parameters"
CONVERSION_KEY = "condconv_conversion"
"""Checkpoint entry holding the conversion spec, with layer names relative to the LightningModule."""
PAST_HPARAMS_KEYS = ("hparams", "module_arguments")
"""Keys of older releases that Lightning's ``load_from_checkpoint`` still merges, before ``hyper_parameters``
(``lightning.pytorch.core.saving.CHECKPOINT_PAST_HPARAMS_KEYS``): they reach ``__init__`` as well."""
ARCH_KEY = "arch"
REGISTRIES = ("timm", "torchvision")
"""Registries an architecture may name as ``REGISTRY:NAME`` (:mod:`condconv_lightning.loading.architectures`)."""


def is_import_path(arch: str) -> bool:
    """Whether ``arch`` imports code it names (``module.path:callable``), not a registry or built-in model name."""
    registry, separator, _ = arch.rpartition(":")
    return bool(separator) and registry not in REGISTRIES


class UntrustedCheckpointError(ValueError):
    """A checkpoint's hyperparameters name code to import, and the caller did not say it trusts the file."""


def code_references(hparams: object, where: str = HPARAMS_KEY) -> list[str]:
    """``where.key=value`` for every entry of ``hparams`` (nested too) that names code to import."""
    found: list[str] = []
    if isinstance(hparams, Mapping):
        for key, value in hparams.items():
            here = f"{where}.{key}"
            if (
                key in CLASS_PATH_KEYS
                or (key == "_instantiator" and value != LIGHTNING_INSTANTIATOR)
                or (key == ARCH_KEY and isinstance(value, str) and is_import_path(value))
            ):
                found.append(f"{here}={value!r}")
            else:
                found.extend(code_references(value, here))
    elif isinstance(hparams, (list, tuple)):
        for index, value in enumerate(hparams):
            found.extend(code_references(value, f"{where}[{index}]"))
    return found


def plain_hparams(hparams: object, source: object, flag: str) -> dict[str, Any]:
    """The hyperparameters an untrusted checkpoint may pass to ``__init__``: plain values, no instantiator.

    Raises:
        UntrustedCheckpointError: an entry names code; the message names ``flag``, which allows it.
    """
    references = code_references(hparams)
    if references:
        more = f" (and {len(references) - 1} more)" if len(references) > 1 else ""
        raise UntrustedCheckpointError(
            f"{source}: the checkpoint's hyperparameters name code to import ({references[0]}{more}); nothing was "
            f"built. If you trust the checkpoint's origin, pass {flag}"
        )
    if not isinstance(hparams, Mapping):
        return {}
    return {key: value for key, value in hparams.items() if key != "_instantiator"}


def read_hparams(checkpoint: PathLike | IO[bytes]) -> object:
    """The ``hyper_parameters`` of a checkpoint file, read weights-only.

    A file object is rewound afterwards; a zip file on disk is memory-mapped, so its
    tensors are not read just to look at the hyperparameters.
    """
    if hasattr(checkpoint, "read"):
        position = checkpoint.tell()  # type: ignore[union-attr]
        loaded = load_weights_only(checkpoint)  # type: ignore[arg-type]
        checkpoint.seek(position)  # type: ignore[union-attr]
    else:
        loaded = load_weights_only(checkpoint, mmap=zipfile.is_zipfile(checkpoint))
    return checkpoint_hparams(loaded) if isinstance(loaded, Mapping) else {}


def checkpoint_hparams(checkpoint: Mapping) -> dict[Any, Any]:
    """The hyperparameters ``load_from_checkpoint`` passes to ``__init__``: each of
    :data:`PAST_HPARAMS_KEYS`, then ``hyper_parameters``, merged in that order as Lightning does
    (``dict.update``, so pairs count as a mapping; what ``update`` refuses stops Lightning too)."""
    merged: dict[Any, Any] = {}
    for key in (*PAST_HPARAMS_KEYS, HPARAMS_KEY):
        try:
            merged.update(checkpoint.get(key) or {})
        except (TypeError, ValueError):
            continue
    return merged
