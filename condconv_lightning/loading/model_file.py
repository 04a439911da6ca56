"""Turn a model file (plus, for weights, an architecture) into an nn.Module without running its code.

Unpickling runs code chosen by whoever wrote the file, which is why ``torch.load``
defaults to ``weights_only=True`` since torch 2.6. Files are opened weights-only; a
file that holds pickled Python objects (a full ``torch.save(model)``) is loaded only
when the caller passes ``trust_pickle=True`` (``--trust-pickle``), and otherwise
refused with the globals it would import, read from its opcodes without executing
anything (:func:`~condconv_lightning.loading.formats.pickled_globals`).

Weights (a state dict, safetensors, a Lightning ``.ckpt``) need the architecture as an
import path ``module.path:callable`` (a class or a factory), as ``uvicorn`` and
``gunicorn`` name applications; a LightningModule class loads a ``.ckpt`` through its
own ``load_from_checkpoint``.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import sys
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..checkpoints import HPARAMS_KEY, UntrustedCheckpointError, plain_hparams
from ..io import SAFETENSORS_SUFFIXES, UnsafeFileError, load_state_dict, load_trusted_pickle, load_weights_only
from ..surgery import load_converted, read_spec
from ..surgery.persist import FILE_FORMAT as CONVERTED_FILE_FORMAT
from ..wrappers import strip_keys, unwrap
from .errors import ModelFileError, one_line
from .formats import FileFormat, detect_format, pickled_globals

MAX_NAMES_SHOWN = 3


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
    file_format = detect_format(path)
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
        content: object = load_state_dict(path)
    else:
        content = _torch_load(path, file_format, trust_pickle)
    if isinstance(content, nn.Module):
        if arch is not None:
            raise ModelFileError(
                f"{path} holds a full module ({type(content).__name__}); drop --arch, which is for weights files"
            )
        model = unwrap(content)
        return LoadedModel(model, True, f"full module ({type(model).__name__})", file_format)
    state, checkpoint = _weights_in(content, path)
    holds = f"{'Lightning checkpoint' if checkpoint else 'state dict'} ({len(state)} tensors)"
    if arch is None:
        raise ModelFileError(
            f"{path} holds a {holds} but no architecture; pass "
            "--arch module.path:ClassOrFactory (and --arch-kwargs JSON if it takes arguments)"
        )
    builder = import_object(arch, "--arch")
    if _is_converted(path, content):
        # Written by this command or save_converted: its spec converts the fresh model first.
        try:
            model = load_converted(path, _build(builder, arch, arch_kwargs or {}))
        except (ValueError, TypeError, RuntimeError, KeyError) as error:
            raise ModelFileError(
                f"the converted weights in {path} do not load into --arch {arch}: {one_line(error)}"
            ) from None
        return LoadedModel(model, False, f"converted weights + spec ({len(state)} tensors)", file_format)
    if checkpoint and _is_lightning_module_class(builder):
        if not trust_pickle:
            try:
                plain_hparams(content.get(HPARAMS_KEY, {}), path, "--trust-pickle")  # type: ignore[union-attr]
            except UntrustedCheckpointError as error:
                raise ModelFileError(str(error)) from None
        model = _load_lightning_checkpoint(builder, path, arch, arch_kwargs or {}, trust_pickle)
    else:
        model = _build(builder, arch, arch_kwargs or {})
    _load_weights(model, state, path, arch)
    return LoadedModel(model, False, holds, file_format)


def import_object(target: str, flag: str) -> Callable[..., Any]:
    """Import ``module.path:attribute`` (the current folder is importable, as for ``python -m``)."""
    module_name, _, attribute = target.partition(":")
    make_cwd_importable()
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelFileError(
            f"{flag} {target}: cannot import {module_name!r} ({error}); check the name, or run from the folder "
            "that contains it"
        ) from None
    except Exception as error:  # the module's own code failed while importing
        raise ModelFileError(f"{flag} {target}: importing {module_name!r} raised {one_line(error)}") from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ModelFileError(
                f"{flag} {target}: {module_name!r} has no attribute {attribute!r}; check the name after ':'"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelFileError(f"{flag} {target} is a {type(obj).__name__}, not a class or function")
    return obj


def make_cwd_importable() -> None:
    """Let ``--arch`` and trusted pickles import the user's modules from the current folder.

    A console script's ``sys.path`` starts at its own folder, unlike ``python -m``; the
    current folder is appended, so it cannot shadow installed packages.
    """
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())


def _torch_load(path: Path, file_format: FileFormat, trust_pickle: bool) -> object:
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it reads fine
            warnings.simplefilter("ignore", UserWarning)
            return load_weights_only(path)
    except pickle.UnpicklingError as error:
        allowed = _weights_only_globals()
        foreign = [g for g in pickled_globals(path, file_format) if g not in allowed]
        if not foreign:  # weights-only loading failed on the data itself, not on a global
            raise _unreadable(path, error) from None
        if not trust_pickle:
            more = f" (and {len(foreign) - 1} more globals)" if len(foreign) > 1 else ""
            raise ModelFileError(
                f"{path} holds pickled Python objects: loading it imports {foreign[0]}{more} and can run code "
                "from the file; nothing was loaded. If you trust its source, pass --trust-pickle"
            ) from None
    except UnsafeFileError as error:
        raise ModelFileError(str(error)) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise _unreadable(path, error) from None
    make_cwd_importable()
    try:
        return load_trusted_pickle(path)
    except (ImportError, AttributeError) as error:
        raise ModelFileError(
            f"unpickling {path} needs code that does not import here ({one_line(error)}); run where the model's "
            "package is installed, or pass its state dict with --arch"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        raise _unreadable(path, error) from None


def _unreadable(path: object, error: BaseException) -> ModelFileError:
    """The one message for a file whose bytes torch cannot parse."""
    return ModelFileError(f"cannot read {path} ({one_line(error)}); it is truncated or corrupted")


def _weights_only_globals() -> set[str]:
    """Globals ``torch.load(weights_only=True)`` resolves: its default allowlist and the user's safe globals.

    The default allowlist is private to torch; without it every global counts as
    foreign, which only makes the refusal message name a torch class first.
    """
    allowlist = getattr(torch._weights_only_unpickler, "_get_allowed_globals", dict)
    user = {
        f"{g.__module__}.{g.__qualname__}" for g in torch.serialization.get_safe_globals() if hasattr(g, "__qualname__")
    }
    return set(allowlist()) | user


def _is_converted(path: Path, content: object) -> bool:
    """Whether ``path`` is a weights file with a conversion spec (the layout of :func:`save_converted`)."""
    if isinstance(content, Mapping) and content.get("format") == CONVERTED_FILE_FORMAT:
        return True
    if path.suffix in SAFETENSORS_SUFFIXES:
        try:
            read_spec(path)
        except ValueError:
            return False
        return True
    return False


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
    cls: Any, path: Path, arch: str, arch_kwargs: Mapping[str, Any], trust_pickle: bool
) -> nn.Module:
    try:
        # strict=False: key mismatches are reported by _load_weights in one line.
        # untrusted: __init__ gets the checkpoint's plain values, not LightningCLI's instantiator
        untrusted = {} if trust_pickle else {"_instantiator": None}
        return cls.load_from_checkpoint(
            path, map_location="cpu", weights_only=not trust_pickle, strict=False, **untrusted, **arch_kwargs
        )
    except Exception as error:
        raise ModelFileError(
            f"--arch {arch}: {cls.__name__}.load_from_checkpoint({path}) failed: {one_line(error)}"
        ) from None


def _build(builder: Callable[..., Any], arch: str, arch_kwargs: Mapping[str, Any]) -> nn.Module:
    try:
        model = builder(**arch_kwargs)
    except Exception as error:
        raise ModelFileError(
            f"--arch {arch} with --arch-kwargs {json.dumps(dict(arch_kwargs))} raised {one_line(error)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ModelFileError(
            f"--arch {arch} returned a {type(model).__name__}, not an nn.Module; name a model class or a factory"
        )
    return model


def _load_weights(model: nn.Module, state: dict[str, Tensor], path: Path, arch: str) -> None:
    """Load strictly, or fail with one line naming the missing, unexpected and reshaped keys."""
    expected = model.state_dict()
    state = _without_common_prefix(state, expected)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_names(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
    if reshaped:
        first = reshaped[0]
        shapes = f"{first}: file {list(state[first].shape)}, model {list(expected[first].shape)}"
        problems.append(f"{len(reshaped)} with another shape ({shapes})")
    if problems:
        raise ModelFileError(
            f"the weights in {path} do not match --arch {arch}: {', '.join(problems)}; "
            "pass the architecture (and --arch-kwargs) they were saved from"
        )
    model.load_state_dict(state, strict=True)


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


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_NAMES_SHOWN])
    return shown + (", ..." if len(keys) > MAX_NAMES_SHOWN else "")
