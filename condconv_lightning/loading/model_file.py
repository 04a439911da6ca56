"""Turn a model file (plus, for weights, an architecture) into an nn.Module without running its code.

Unpickling runs code chosen by whoever wrote the file, which is why ``torch.load``
defaults to ``weights_only=True`` since torch 2.6. Files are opened weights-only; a
file that holds pickled Python objects (a full ``torch.save(model)``) is loaded only
when the caller passes ``trust_pickle=True`` (``--trust-pickle``), and otherwise
refused with the globals it would import, read from its opcodes without executing
anything (:func:`~condconv_lightning.formats.pickled_globals`).

Weights (a state dict, safetensors, a Lightning ``.ckpt``) need the architecture, named
as :mod:`.architectures` describes (``timm:NAME``, ``torchvision:NAME``, a built-in model or
``module.path:callable``); a LightningModule class loads a ``.ckpt`` through its own
``load_from_checkpoint``. A file that carries a conversion spec (weights + spec written by
``save_converted``, or the checkpoint of a converted run, whose keys and spec share the
LightningModule's ``model.``) converts the fresh architecture by it first, then loads its
weights strictly. :func:`load_pretrained` loads such weights into a model the caller built
(pretrained weights before conversion and fine-tuning).
"""

from __future__ import annotations

import dataclasses
import pickle
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .. import compat
from ..checkpoints import CONVERSION_KEY, UntrustedCheckpointError, init_kwargs, untrusted_hparams
from ..formats import DetectedFile, FileFormat, detect_format, pickled_globals
from ..io import (
    UnsafeFileError,
    key_mismatches,
    load_state_dict,
    load_trusted_pickle,
    load_weights_only,
)
from ..messages import name_list, printable
from ..surgery import ConversionSpec, load_converted
from ..surgery.persist import FILE_FORMAT as CONVERTED_FILE_FORMAT
from ..surgery.persist import SPEC_KEY, load_into
from ..wrappers import match_keys, strip_keys, unwrap
from .architectures import build_with, resolve_architecture
from .errors import ModelFileError, one_line
from .imports import make_cwd_importable


@dataclass
class LoadedModel:
    """A model read from a file, and what the file held (the output mirrors it)."""

    model: nn.Module
    full_module: bool  # True: a pickled module (written back as one); False: weights (written with the spec)
    holds: str  # what the file held, for people: "full module (ResNet)", "state dict (122 tensors)", ...
    file_format: FileFormat


def load_model(
    path: Path,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
) -> LoadedModel:
    """Read ``path`` onto the CPU as an nn.Module (see the module docstring for the rules).

    Raises:
        ModelFileError: the file is unusable, needs ``--trust-pickle`` or ``--arch``, or the
            architecture does not import or does not match the weights.
    """
    detected = detect_format(path)
    content = _read(detected, trust_pickle)
    if isinstance(content, nn.Module):
        if arch is not None:
            raise ModelFileError(
                f"{path} holds a full module ({type(content).__name__}); drop --arch, which is for weights files"
            )
        model = unwrap(content)
        return LoadedModel(model, True, f"full module ({type(model).__name__})", detected.format)
    state, checkpoint = _weights_in(content, path)
    converted = _is_converted(detected, content)
    if converted:
        holds = f"converted weights + spec ({len(state)} tensors)"
    elif checkpoint:
        spec = ", conversion spec" if CONVERSION_KEY in content else ""  # type: ignore[operator]
        holds = f"Lightning checkpoint ({len(state)} tensors{spec})"
    else:
        holds = f"state dict ({len(state)} tensors)"
    if arch is None:
        raise ModelFileError(
            f"{path} holds a {holds} but no architecture; pass --arch timm:NAME, torchvision:NAME or "
            "module.path:ClassOrFactory (and --arch-kwargs JSON if it takes arguments)"
        )
    builder = resolve_architecture(arch, "--arch")
    label = f"--arch {arch}"
    if checkpoint and not converted and _is_lightning_module_class(builder):
        kwargs = dict(arch_kwargs or {})
        if not trust_pickle:
            try:
                values = untrusted_hparams(builder, content, path, "--trust-pickle", given=kwargs)  # type: ignore[arg-type]
            except UntrustedCheckpointError as error:
                raise ModelFileError(str(error)) from None
            kwargs = {**init_kwargs(builder, values), **kwargs}
        model = _load_lightning_checkpoint(builder, path, arch, kwargs, trust_pickle)
        _load_weights(model, state, path, label)
        return LoadedModel(model, False, holds, detected.format)
    model = build_with(builder, arch, arch_kwargs or {})
    carried = _load_carried_conversion(detected, content, state, model, label)
    if carried is None:
        _load_weights(model, state, path, label)
    return LoadedModel(model if carried is None else carried, False, holds, detected.format)


def load_pretrained(
    path: str | Path,
    model: nn.Module,
    *,
    trust_pickle: bool = False,
    label: str = "the model",
    trust_flag: str = "trust_pickle=True",
) -> nn.Module:
    """Load the weights in ``path`` into ``model`` before conversion or fine-tuning; returns the model to use.

    ``path`` may hold a state dict (``.pt``/``.pth``/``.bin``), safetensors, a Lightning
    ``.ckpt`` (keys with one common prefix such as ``model.`` are matched), or weights plus
    a conversion spec written by ``condconv-convert``/``save_converted`` (the spec converts
    ``model`` first). Loading is strict, with one exception a fine-tuning user expects: when
    only the classifier differs in shape (a 1000-class pretrained head, a 3-class task), the
    model keeps its new head and a warning names the keys left out, as timm does for
    ``pretrained=True, num_classes=N``. A pickled whole module replaces ``model`` only
    with ``trust_pickle=True`` (errors name ``trust_flag`` as the way to allow it).

    Raises:
        ModelFileError: the file is unusable, or its weights do not match ``model`` (``label`` names it).
    """
    path = Path(path)
    detected = detect_format(path)
    content = _read(detected, trust_pickle, trust_flag)
    if isinstance(content, nn.Module):
        return unwrap(content)
    state, _ = _weights_in(content, path)
    carried = _load_carried_conversion(detected, content, state, model, label)
    if carried is not None:
        return carried
    head = classifier_name(model)
    left_out = _load_weights(model, state, path, label, new_head=head)
    if left_out:
        warnings.warn(
            printable(
                f"{path}: kept the model's new classifier {head!r} ({', '.join(left_out)} differ in shape from the "
                "pretrained ones, which were left out)"
            ),
            stacklevel=2,
        )
    return model


def classifier_name(model: nn.Module) -> str | None:
    """The dotted name of the model's classifier: timm's ``get_classifier()``, else the last ``nn.Linear``."""
    get_classifier = getattr(model, "get_classifier", None)
    classifier = get_classifier() if callable(get_classifier) else None
    last = None
    for name, module in model.named_modules():
        if module is classifier:
            return name
        if isinstance(module, nn.Linear):
            last = name
    return last


def _read(detected: DetectedFile, trust_pickle: bool, trust_flag: str = "--trust-pickle") -> object:
    """What the file holds: a state dict, a checkpoint mapping, or (trusted pickles only) a module."""
    path, file_format = detected.path, detected.format
    if file_format is FileFormat.TORCHSCRIPT:
        raise ModelFileError(
            f"{path} is a TorchScript archive (torch.jit.save): it holds compiled code, not the Python modules "
            "to convert; pass torch.save(model.state_dict()) with --arch, or a torch.save(model) file"
        )
    if file_format is FileFormat.TORCH_EXPORT:
        raise ModelFileError(
            f"{path} is a torch.export archive: its graph has no Conv2d modules to convert; pass "
            "torch.save(model.state_dict()) with --arch, or a torch.save(model) file"
        )
    if file_format is FileFormat.SAFETENSORS:
        try:
            return load_state_dict(detected)
        except ValueError as error:  # a crafted header, a tensor that is no mapping of names
            raise ModelFileError(str(error)) from None
    return _torch_load(detected, trust_pickle, trust_flag)


def _load_carried_conversion(
    detected: DetectedFile, content: object, state: dict[str, Tensor], model: nn.Module, label: str
) -> nn.Module | None:
    """``model`` converted by the spec the file carries, its weights then loaded strictly; None when it carries
    none. Written by ``condconv-convert``/``save_converted`` (weights + spec), or a Lightning checkpoint of a
    converted run (:data:`~condconv_lightning.checkpoints.CONVERSION_KEY`)."""
    if _is_converted(detected, content):
        return _load_converted(detected.path, model, label)
    if isinstance(content, Mapping) and CONVERSION_KEY in content and isinstance(content.get("state_dict"), Mapping):
        return _load_converted_run(detected.path, model, content[CONVERSION_KEY], state, label)
    return None


def _load_converted_run(path: Path, model: nn.Module, spec: object, state: dict[str, Tensor], label: str) -> nn.Module:
    """A checkpoint of a converted run: its spec (layer names relative to the LightningModule, as its state dict's
    keys) converts ``model`` first, both read without the first name component they all share (``model.``)."""

    def load() -> nn.Module:
        parsed = ConversionSpec.from_dict(spec)
        firsts = {key.split(".", 1)[0] for key in state}
        prefix = f"{firsts.pop()}." if len(firsts) == 1 else ""
        if not all(name.startswith(prefix) for name in parsed.layers):
            prefix = ""
        layers = {name.removeprefix(prefix): options for name, options in parsed.layers.items()}
        relative = {key.removeprefix(prefix): value for key, value in state.items()}
        return load_into(model, dataclasses.replace(parsed, layers=layers), relative, path)

    return _converted(path, label, load)


def _load_converted(path: Path, model: nn.Module, label: str) -> nn.Module:
    return _converted(path, label, lambda: load_converted(path, model))


def _converted(path: Path, label: str, load: Callable[[], nn.Module]) -> nn.Module:
    """``load()`` of converted weights, its failure as one line naming ``label``."""
    try:
        return load()
    except (ValueError, TypeError, RuntimeError, KeyError) as error:
        raise ModelFileError(
            f"the converted weights in {path} do not load into {label}: {one_line(error)}; {_saved_from(label)}"
        ) from None


def _saved_from(label: str) -> str:
    """The advice for weights that do not fit: the architecture named by ``label`` is not theirs."""
    arguments = "--arch-kwargs" if label.startswith("--") else "arch_kwargs"
    return f"pass the architecture (and {arguments}) they were saved from"


def _torch_load(detected: DetectedFile, trust_pickle: bool, trust_flag: str) -> object:
    path = detected.path
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it reads fine
            warnings.simplefilter("ignore", UserWarning)
            return load_weights_only(detected)
    except pickle.UnpicklingError as error:
        allowed = _weights_only_globals()
        try:
            foreign = [g for g in pickled_globals(detected) if g not in allowed]
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, StopIteration):  # a damaged data.pkl
            raise _unreadable(path, error) from None
        if not foreign:  # weights-only loading failed on the data itself, not on a global
            raise _unreadable(path, error) from None
        if not trust_pickle:
            more = f" (and {len(foreign) - 1} more globals)" if len(foreign) > 1 else ""
            raise ModelFileError(
                f"{path} holds pickled Python objects: loading it imports {foreign[0]}{more} and can run code "
                f"from the file; nothing was loaded. If you trust its source, pass {trust_flag}"
            ) from None
    except UnsafeFileError as error:
        raise ModelFileError(str(error)) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise _unreadable(path, error) from None
    make_cwd_importable()
    try:
        return load_trusted_pickle(detected)
    except (ImportError, AttributeError) as error:
        raise ModelFileError(
            f"unpickling {path} needs code that does not import here ({one_line(error)}); run where the model's "
            "package is installed, or pass its state dict with --arch"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        raise _unreadable(path, error) from None


def _unreadable(path: object, error: BaseException) -> ModelFileError:
    """The one message for a file whose bytes torch cannot parse (not torch's own advice to load the file
    with ``weights_only=False``, which would run code from a file nobody can read)."""
    reason = "its pickled data is damaged" if isinstance(error, pickle.UnpicklingError) else one_line(error)
    return ModelFileError(f"cannot read {path} ({reason}); it is truncated or corrupted")


def _weights_only_globals() -> set[str]:
    """Globals ``torch.load(weights_only=True)`` resolves: its default allowlist and the user's safe globals.

    The default allowlist is private to torch (:mod:`condconv_lightning.compat`); without it every
    global counts as foreign, which only makes the refusal message name a torch class first.
    """
    user = {
        f"{g.__module__}.{g.__qualname__}" for g in torch.serialization.get_safe_globals() if hasattr(g, "__qualname__")
    }
    return compat.weights_only_default_globals() | user


def _is_converted(detected: DetectedFile, content: object) -> bool:
    """Whether the file holds weights with a conversion spec (the layout of :func:`save_converted`)."""
    if isinstance(content, Mapping) and content.get("format") == CONVERTED_FILE_FORMAT:
        return True
    return SPEC_KEY in detected.metadata


def _weights_in(content: object, path: Path) -> tuple[dict[str, Tensor], bool]:
    """The state dict in ``content`` and whether it came from a Lightning checkpoint."""
    checkpoint = isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping)
    state = content["state_dict"] if checkpoint else content  # type: ignore[index]
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelFileError(
            f"{path} holds a {type(content).__name__}, not a model, a state dict or a Lightning checkpoint"
        )
    return strip_keys(state), checkpoint


def _is_lightning_module_class(obj: object) -> bool:
    """Checked by name so that loading plain models never imports Lightning (a slow import)."""
    return isinstance(obj, type) and any(
        base.__name__ == "LightningModule" and base.__module__.startswith(("lightning.pytorch", "pytorch_lightning"))
        for base in obj.__mro__
    )


def _load_lightning_checkpoint(
    cls: Any, path: Path, arch: str, kwargs: Mapping[str, Any], trust_pickle: bool
) -> nn.Module:
    """``cls.load_from_checkpoint`` with ``kwargs`` for ``__init__`` (untrusted: every parameter, checked)."""
    try:
        # strict=False: key mismatches are reported by _load_weights in one line.
        return cls.load_from_checkpoint(path, map_location="cpu", weights_only=not trust_pickle, strict=False, **kwargs)
    except Exception as error:
        raise ModelFileError(
            f"--arch {arch}: {cls.__name__}.load_from_checkpoint({path}) failed: {one_line(error)}"
        ) from None


def _load_weights(
    model: nn.Module, state: dict[str, Tensor], path: Path, label: str, new_head: str | None = None
) -> list[str]:
    """Load strictly, or fail with one line naming the missing, unexpected and reshaped keys.

    Keys of the module ``new_head`` may differ in shape (all of them keep the model's values);
    they are returned.
    """
    expected = model.state_dict()
    state = match_keys(_without_common_prefix(state, expected), expected)
    missing, unexpected, reshaped = key_mismatches(expected, state)
    head_keys = [k for k in expected if new_head is not None and k.startswith(f"{new_head}.")]
    left_out: list[str] = []
    if reshaped and not missing and not unexpected and set(reshaped) <= set(head_keys):
        left_out = head_keys
        state = {**state, **{k: expected[k] for k in head_keys}}
        reshaped = []
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({name_list(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({name_list(unexpected)})")
    if reshaped:
        first = reshaped[0]
        shapes = f"{first}: file {list(state[first].shape)}, model {list(expected[first].shape)}"
        problems.append(f"{len(reshaped)} with another shape ({shapes})")
    if problems:
        raise ModelFileError(f"the weights in {path} do not match {label}: {', '.join(problems)}; {_saved_from(label)}")
    model.load_state_dict(state, strict=True)
    return left_out


def _without_common_prefix(state: dict[str, Tensor], expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop a first name component shared by every key (a LightningModule's ``model.``) if the names then match."""
    if set(state) == set(expected):
        return state
    heads = {key.split(".", 1)[0] for key in state}
    if len(heads) == 1 and all("." in key for key in state):
        stripped = {key.split(".", 1)[1]: value for key, value in state.items()}
        if set(stripped) == set(expected):
            return stripped
    return state
