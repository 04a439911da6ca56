"""What a Lightning checkpoint may decide when it is loaded: data, never code.

Lightning rebuilds a LightningModule from the ``hyper_parameters`` stored in its
checkpoint, merged over those under the keys of older releases (``hparams``,
``module_arguments``), and hands them to ``__init__``; LightningCLI hands them to
jsonargparse, which imports any class or callable a string names and builds any
``class_path`` it finds. A checkpoint from anywhere is untrusted, so without the caller's
trust :func:`untrusted_hparams` is the only reader of those hyperparameters, and what it
returns is all that reaches ``__init__`` or the command line's configuration:

- plain data only: at most :data:`MAX_DEPTH` levels and :data:`MAX_VALUES` values (a file
  nested 50,000 deep is one line, not a RecursionError; so is any entry of the checkpoint
  nested deeper than :data:`MAX_DEPTH`, since Lightning reads the others recursively), and
  nothing that names code: no
  ``class_path``/``_class_path`` entry, no instantiator but LightningCLI's, no ``arch`` that
  is an import path (``module.path:callable``; ``timm:NAME``, ``torchvision:NAME`` and the
  built-in model names are data), no callable ``hparams_type``;
- checked against the module's schema where it declares one (``HPARAMS_SCHEMA``, as
  :class:`~condconv_lightning.finetune.ImageClassifier` does): each value goes through the
  validator a caller's value goes through, a parameter outside the schema (``weights``,
  ``trust_pickle``, ``model``, ``optimizer``, ...) is the caller's and is ignored, and a key
  that is no parameter is refused;
- sized by the weights it comes with: the module is first built on the meta device, where
  no memory is allocated, and refused if it would hold more values than the checkpoint's
  state dict (a ``num_classes`` of 8e6 beside the weights of 4 classes allocates nothing).

:func:`init_kwargs` then gives every parameter of ``__init__`` a checked value or its
default, so nothing of the file's reaches ``__init__`` unchecked through Lightning's merge.
"""

from __future__ import annotations

import inspect
import reprlib
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import IO, Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from .arguments import REGISTRIES
from .io import PathLike, load_weights_only

__all__ = [
    "REGISTRIES",
    "UntrustedCheckpointError",
    "accepted",
    "build_from_checkpoint",
    "code_references",
    "init_kwargs",
    "init_values",
    "is_import_path",
    "read_checkpoint",
    "untrusted_hparams",
]

LIGHTNING_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
INSTANTIATOR_KEY = "_instantiator"
CLASS_PATH_KEYS = frozenset({"class_path", "_class_path"})
HPARAMS_KEY = "hyper_parameters"
HPARAMS_NAME_KEY = "hparams_name"
"""Lightning passes all hyperparameters as this one ``__init__`` argument when it names one."""
HPARAMS_TYPE_KEY = "hparams_type"
"""Lightning calls this on the hyperparameters when it is callable (a string means a dict)."""
CONVERSION_KEY = "condconv_conversion"
"""Checkpoint entry holding the conversion spec, with layer names relative to the LightningModule."""
PAST_HPARAMS_KEYS = ("hparams", "module_arguments")
"""Keys of older releases that Lightning's ``load_from_checkpoint`` still merges, before ``hyper_parameters``
(``lightning.pytorch.core.saving.CHECKPOINT_PAST_HPARAMS_KEYS``): they reach ``__init__`` as well."""
ARCH_KEY = "arch"
SCHEMA_ATTRIBUTE = "HPARAMS_SCHEMA"
"""The class attribute mapping each hyperparameter a module reads from a checkpoint to its validator."""
MAX_DEPTH = 32
"""Nesting levels of untrusted hyperparameters (Lightning's own hyperparameters are flat)."""
MAX_VALUES = 100_000
"""Values (containers and leaves, each visit counted) in untrusted hyperparameters."""
MAX_CHECKPOINT_VALUES = 1_000_000
"""Values in a whole untrusted checkpoint (tensors count one each): its other entries reach Lightning's
readers, which recurse (a resumed Trainer deep-copies callback states)."""


def is_import_path(arch: str) -> bool:
    """Whether ``arch`` imports code it names (``module.path:callable``), not a registry or built-in model name."""
    registry, separator, _ = arch.rpartition(":")
    return bool(separator) and registry not in REGISTRIES


class UntrustedCheckpointError(ValueError):
    """A checkpoint's hyperparameters are not plain values the module accepts, and the caller did not trust the file."""


def code_references(hparams: object, where: str = HPARAMS_KEY) -> list[str]:
    """``where.key=value`` for every entry of ``hparams`` (nested too) that names code to import.

    Raises:
        ValueError: ``hparams`` nests deeper than :data:`MAX_DEPTH` or holds more than :data:`MAX_VALUES` values.
    """
    return [
        f"{_path(here)}={SHORT.repr(item)}"
        for here, key, item in nested_entries(hparams, where, MAX_VALUES)
        if key in CLASS_PATH_KEYS
        or (key == INSTANTIATOR_KEY and item != LIGHTNING_INSTANTIATOR)
        or (key == ARCH_KEY and isinstance(item, str) and is_import_path(item))
    ]


SHORT = reprlib.Repr()
SHORT.maxstring = SHORT.maxother = 100  # a value from a file, shown in a message without its megabytes
Where = tuple[Any, str]
"""Where an entry is: ``(parent, label)``, the parent a :data:`Where` too or None; spelled out by :func:`_path`
only when a message needs it, so that long keys repeated down a deep structure cost nothing."""


def nested_entries(value: object, where: str, max_values: int) -> Iterator[tuple[Where, object, object]]:
    """``(where, key, item)`` for every entry of the mappings, lists and tuples in ``value`` (a list item's key is
    None), walked without recursion, so that no nesting overflows Python's stack.

    Raises:
        ValueError: ``value`` nests deeper than :data:`MAX_DEPTH` or holds more than ``max_values`` values.
    """
    pending: list[tuple[Where, object, int]] = [((None, where), value, 0)]
    visited = 1
    while pending:
        here, value, depth = pending.pop()
        if not isinstance(value, (Mapping, list, tuple)) or not value:
            continue
        visited += len(value)  # counted before its entries are listed: a huge list costs nothing
        if visited > max_values:
            raise ValueError(f"{where} holds more than {max_values} values")
        if depth == MAX_DEPTH:
            raise ValueError(f"{where} nests deeper than {MAX_DEPTH} levels (at {_path(here)})")
        if isinstance(value, Mapping):
            entries = [((here, f".{_label(key)}"), key, item) for key, item in value.items()]
        else:
            entries = [((here, f"[{index}]"), None, item) for index, item in enumerate(value)]
        yield from entries
        pending.extend((name, item, depth + 1) for name, _, item in reversed(entries))


def _label(key: object) -> str:
    """A mapping key as a path shows it: a string as it is, anything else as its repr, either cut to 60 characters."""
    text = key if isinstance(key, str) else SHORT.repr(key)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _path(where: Where) -> str:
    labels = []
    node: Where | None = where
    while node is not None:
        node, label = node
        labels.append(label)
    return "".join(reversed(labels))


def read_checkpoint(checkpoint: PathLike | IO[bytes]) -> Mapping[Any, Any]:
    """A checkpoint file's content, read weights-only (an empty mapping if it holds something else).

    A file object is rewound afterwards; a zip file on disk is memory-mapped, so its
    tensors are not read just to look at the hyperparameters and count the weights.
    """
    if hasattr(checkpoint, "read"):
        position = checkpoint.tell()  # type: ignore[union-attr]
        loaded = load_weights_only(checkpoint)  # type: ignore[arg-type]
        checkpoint.seek(position)  # type: ignore[union-attr]
    else:
        loaded = load_weights_only(checkpoint, mmap=zipfile.is_zipfile(checkpoint))
    return loaded if isinstance(loaded, Mapping) else {}


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


def untrusted_hparams(
    cls: type, checkpoint: Mapping[Any, Any], source: object, flag: str, given: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The hyperparameters of an untrusted ``checkpoint`` that ``cls`` may receive, checked (see the module docstring).

    Returns the values the file sets, by ``__init__`` parameter; :func:`init_kwargs` completes them.
    ``given`` are the caller's own keyword arguments: they win over the file's, and the module
    is sized with them as it will be built.

    Raises:
        UntrustedCheckpointError: in one line naming ``source`` and, where trusting the file would load it, ``flag``.
    """
    try:
        for _ in nested_entries(checkpoint, "the checkpoint", MAX_CHECKPOINT_VALUES):
            pass  # walked for its bounds only
    except ValueError as error:
        raise _refused(source, str(error), None) from None
    hparams = checkpoint_hparams(checkpoint)
    hparams_type = checkpoint.get(HPARAMS_TYPE_KEY)
    try:
        references = code_references(hparams)
    except ValueError as error:
        raise _refused(source, f"its hyperparameters are not plain data: {error}", flag) from None
    if hparams_type is not None and not isinstance(hparams_type, str):
        references.append(f"{HPARAMS_TYPE_KEY}={SHORT.repr(hparams_type)}")
    if references:
        others = f" (and {len(references) - 1} more)" if len(references) > 1 else ""
        raise _refused(source, f"its hyperparameters name code to import ({references[0]}{others})", flag)
    values = init_values(cls, checkpoint)
    schema: Mapping[str, Callable[[object], object]] | None = getattr(cls, SCHEMA_ATTRIBUTE, None)
    if schema is not None:
        values = _schema_checked(cls.__name__, schema, _init_parameters(cls)[0], values, source, flag)
    built_with = {**init_kwargs(cls, values), **accepted(cls, given or {})}
    _check_sizes(cls, built_with, checkpoint.get("state_dict"), source, flag)
    return values


def init_values(cls: type, checkpoint: Mapping[Any, Any]) -> dict[Any, Any]:
    """The hyperparameters of ``checkpoint`` as Lightning hands them to ``cls.__init__``, unchecked: merged
    (:func:`checkpoint_hparams`), all under one argument where ``hparams_name`` names one of its parameters
    (Lightning's old layout), without the instantiator's entry."""
    values = {key: value for key, value in checkpoint_hparams(checkpoint).items() if key != INSTANTIATOR_KEY}
    if checkpoint.get(HPARAMS_NAME_KEY) in _init_parameters(cls)[0]:
        values = {checkpoint[HPARAMS_NAME_KEY]: values}
    return values


def accepted(cls: type, values: Mapping[Any, Any]) -> dict[Any, Any]:
    """The entries of ``values`` that ``cls.__init__`` takes, as Lightning filters them: all of them when it
    takes ``**kwargs``, else those named by its parameters."""
    parameters, more = _init_parameters(cls)
    return {key: value for key, value in values.items() if more or key in parameters}


def build_from_checkpoint(
    cls: type, checkpoint: Mapping[Any, Any], source: object, *, trusted: bool, flag: str, given: Mapping[str, Any]
) -> Any:
    """``cls`` built from ``checkpoint``'s hyperparameters with the caller's ``given`` keyword arguments winning, as
    Lightning's ``load_from_checkpoint`` builds it before it loads the weights.

    Untrusted, the values are :func:`untrusted_hparams`'s and ``cls`` is called with them. Trusted, they
    are the file's as they are, and a checkpoint written by LightningCLI (which names its instantiator)
    is built by that instantiator, which builds the classes its ``class_path`` entries name.

    Raises:
        UntrustedCheckpointError: untrusted hyperparameters that :func:`untrusted_hparams` refuses.
        ValueError: trusted hyperparameters that name an instantiator other than LightningCLI's.
    """
    instantiator = checkpoint_hparams(checkpoint).get(INSTANTIATOR_KEY) if trusted else None
    values = init_values(cls, checkpoint) if trusted else untrusted_hparams(cls, checkpoint, source, flag, given=given)
    arguments = accepted(cls, {**values, **given})
    if instantiator is None:
        return cls(**arguments)
    if instantiator != LIGHTNING_INSTANTIATOR:
        raise ValueError(
            f"{source}: its hyperparameters name the instantiator {SHORT.repr(instantiator)}, which is not "
            f"LightningCLI's ({LIGHTNING_INSTANTIATOR}) and is never run; nothing was built"
        )
    from lightning.pytorch.cli import instantiate_module  # here: reading checkpoints does not import Lightning

    return instantiate_module(cls, arguments)


def init_kwargs(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``cls.__init__`` from checked ``values``: every parameter with a value or a
    default gets it, and no instantiator is named, so Lightning's merge adds nothing from the file."""
    parameters, more = _init_parameters(cls)
    kwargs = {
        name: values.get(name, parameter.default)
        for name, parameter in parameters.items()
        if name in values or parameter.default is not inspect.Parameter.empty
    }
    extra = {key: value for key, value in values.items() if key not in kwargs} if more else {}
    return {**extra, **kwargs, INSTANTIATOR_KEY: None}


def _init_parameters(cls: type) -> tuple[dict[str, inspect.Parameter], bool]:
    """The named parameters of ``cls.__init__`` (not ``self``, ``*args`` or ``**kwargs``), and whether it takes
    ``**kwargs`` (Lightning passes such an ``__init__`` every hyperparameter, else only its parameters)."""
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    named = {p.name: p for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return named, any(p.kind is p.VAR_KEYWORD for p in parameters)


def _schema_checked(
    name: str,
    schema: Mapping[str, Callable[[object], object]],
    parameters: Mapping[str, inspect.Parameter],
    values: Mapping[Any, Any],
    source: object,
    flag: str,
) -> dict[str, Any]:
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key in schema:
            try:
                checked[key] = schema[key](value)
            except ValueError as error:
                raise _refused(source, f"its {error}", None) from None
        elif key not in parameters:
            raise _refused(source, f"its hyperparameter {key!r} is not one of {name}'s", flag)
    return checked


def _check_sizes(cls: type, kwargs: Mapping[str, Any], state_dict: object, source: object, flag: str) -> None:
    """Refuse ``kwargs`` that build a module holding more values than ``state_dict``, before allocating it.

    The module is built on the meta device (no memory for its tensors), and the build stops
    once it registers more than :func:`_registrations_allowed` parameters and submodules, so
    neither a width nor a depth from the file costs memory before it is compared to the weights.
    """
    from .loading.errors import one_line  # here: the loading package imports this module

    tensors = [t for t in state_dict.values() if isinstance(t, Tensor)] if isinstance(state_dict, Mapping) else []
    held = sum(tensor.numel() for tensor in tensors)
    arguments = {key: value for key, value in kwargs.items() if key != INSTANTIATOR_KEY}
    try:
        with torch.device("meta"), _registrations_at_most(_registrations_allowed(len(tensors))):
            module = cls(**arguments)
    except _TooManyLayers as error:
        raise _refused(source, f"its hyperparameters build {cls.__name__} with {error}", flag) from None
    except ValueError as error:  # a value the module itself refuses, said in its own words
        raise _refused(source, f"its hyperparameters do not build {cls.__name__} ({one_line(error)})", None) from None
    except Exception as error:
        raise _refused(
            source,
            f"cannot check its hyperparameters against its weights: {cls.__name__} does not build on the meta "
            f"device ({one_line(error)})",
            flag,
        ) from None
    needed = sum(tensor.numel() for tensor in module.state_dict().values()) if isinstance(module, nn.Module) else 0
    if needed > held:
        raise _refused(
            source,
            f"its hyperparameters build {cls.__name__} with {needed} weight values but its weights hold "
            f"{held}: the sizes do not come from these weights",
            flag,
        )


def _registrations_allowed(tensors: int) -> int:
    """Parameters and submodules a module may register while it is sized against ``tensors`` stored tensors:
    ten per tensor, and 1000 more, leave room for the layers a constructor builds and drops again."""
    return 10 * tensors + 1000


class _TooManyLayers(Exception):
    """Raised inside a constructor sized on the meta device: it registered more than the checkpoint can fill."""


@contextmanager
def _registrations_at_most(limit: int) -> Iterator[None]:
    """Raise :class:`_TooManyLayers` from any ``register_parameter``/``add_module`` past the ``limit``-th."""
    count = 0

    def counted(*_: object) -> None:
        nonlocal count
        count += 1
        if count > limit:
            raise _TooManyLayers(f"more than {limit} parameters and layers, more than its weights can fill")

    handles = [register_module_parameter_registration_hook(counted), register_module_module_registration_hook(counted)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _refused(source: object, problem: str, flag: str | None) -> UntrustedCheckpointError:
    advice = f". If you trust the checkpoint's origin, pass {flag}" if flag else ""
    return UntrustedCheckpointError(f"{source}: {problem}; nothing was built{advice}")
