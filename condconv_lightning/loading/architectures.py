"""Models by name, as ``timm.create_model`` and ``torchvision.models.get_model`` name them.

An architecture is one of

- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, **kwargs)``;
- ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None, **kwargs)``;
- a built-in demo model by its bare name (``resnet_tiny``, ``resnet50_like``, ``mobilenet_tiny``);
- ``module.path:callable``, a model class or factory imported from an installed module or the
  current folder (as ``uvicorn`` and ``gunicorn`` name applications).

Nothing is downloaded: registry models are built without weights (every switch in
:data:`DOWNLOAD_SWITCHES` the constructor takes is set off, and refused from any caller or
file), and pretrained weights come from a local file
(:func:`~condconv_lightning.loading.load_pretrained`). A registry or
built-in name selects a constructor that is already registered, so it is data; only the
``module.path:callable`` form imports code named by the string (see
:func:`condconv_lightning.checkpoints.is_import_path`).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from torch import nn

from ..checkpoints import REGISTRIES, is_import_path
from ..demos import models as builtin_models
from .errors import ModelFileError, one_line
from .imports import import_object

__all__ = ["BUILTIN_MODELS", "DOWNLOAD_SWITCHES", "accepts", "build_architecture", "resolve_architecture"]

BUILTIN_MODELS = ("mobilenet_tiny", "resnet50_like", "resnet_tiny")
"""Bare names of the demo models in :mod:`condconv_lightning.demos`."""

EXAMPLES = "timm:NAME, torchvision:NAME, resnet_tiny or module.path:ClassOrFactory"
DOWNLOAD_SWITCHES = frozenset(
    {
        # timm.create_model: weights from the hub or a URL, another config to fetch them by, a file to load after
        "pretrained",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "checkpoint_path",
        "cache_dir",
        # torchvision builders: the network's and the backbone's weights, and their legacy names
        "weights",
        "weights_backbone",
        "pretrained_backbone",
    }
)
"""Keywords with which timm or torchvision download weights, or read them from a hub, a cache or a file."""


def resolve_architecture(arch: str, flag: str = "--arch") -> Callable[..., Any]:
    """The constructor ``arch`` names (registry models come without weights); see the module docstring.

    Raises:
        ModelFileError: the registry is not installed, has no such model, or the import path fails.
    """
    if is_import_path(arch):
        return import_object(arch, flag)
    registry, _, name = arch.rpartition(":")
    if not registry:
        if name in BUILTIN_MODELS:
            return getattr(builtin_models, name)
        raise ModelFileError(
            f"{flag} {arch}: not a built-in model ({', '.join(BUILTIN_MODELS)}); name one as {EXAMPLES}"
        )
    assert registry in REGISTRIES
    try:
        package = importlib.import_module(registry)
    except Exception as error:  # ImportError, or a package that fails beside this torch build
        raise ModelFileError(
            f"{flag} {arch} needs {registry}, which does not import here ({one_line(error)}); "
            f"install it (pip install {registry}) or name another model"
        ) from None
    if registry == "timm":
        if not package.is_model(name):
            raise _unknown_model(arch, flag, package.list_models(), "timm.list_models()")
        return _offline(partial(package.create_model, name), {"pretrained": False}, arch, flag)
    known = package.models.list_models()
    if name not in known:
        raise _unknown_model(arch, flag, known, "torchvision.models.list_models()")
    builder = package.models.get_model_builder(name)
    parameters = inspect.signature(builder).parameters
    return _offline(builder, {key: None for key in ("weights", "weights_backbone") if key in parameters}, arch, flag)


def _unknown_model(arch: str, flag: str, known: Sequence[str], lister: str) -> ModelFileError:
    """A registry has no model ``arch`` names: the error names its closest models as ``registry:NAME``, if any."""
    registry, _, name = arch.rpartition(":")
    close = difflib.get_close_matches(name, known, n=3)
    if not close:
        return ModelFileError(f"{flag} {arch}: {registry} has no model {name!r}; {lister} lists them")
    names = [f"{registry}:{model}" for model in close]
    guesses = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    return ModelFileError(
        f"{flag} {arch}: {registry} has no model {name!r}; did you mean {guesses}? ({lister} lists them all)"
    )


def _offline(build: Callable[..., Any], off: dict[str, Any], arch: str, flag: str) -> Callable[..., Any]:
    """``build`` with its download switches set ``off``; a caller's keyword naming any switch is refused."""

    def builder(**kwargs: Any) -> Any:
        switches = sorted(DOWNLOAD_SWITCHES & kwargs.keys())
        if switches:
            raise ModelFileError(
                f"{flag} {arch}: {switches[0]}= would fetch weights from the network, a hub or a file; nothing is "
                "ever downloaded: drop it and pass the weights as a local file"
            )
        return build(**kwargs, **off)

    return builder


def accepts(builder: Callable[..., Any], keyword: str) -> bool:
    """Whether ``builder`` takes ``keyword`` (by name, or through ``**kwargs``)."""
    try:
        parameters = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return any(p.name == keyword or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def build_architecture(arch: str, kwargs: Mapping[str, Any] | None = None, flag: str = "--arch") -> nn.Module:
    """``resolve_architecture(arch)(**kwargs)``, checked to be an ``nn.Module``.

    Raises:
        ModelFileError: ``arch`` does not resolve, the constructor raises, or it returns no module.
    """
    builder = resolve_architecture(arch, flag)
    return build_with(builder, arch, kwargs or {}, flag)


def build_with(builder: Callable[..., Any], arch: str, kwargs: Mapping[str, Any], flag: str = "--arch") -> nn.Module:
    """Call ``builder(**kwargs)`` and check that it returns a module, with one-line errors naming ``flag``."""
    try:
        model = builder(**kwargs)
    except ModelFileError:
        raise
    except Exception as error:
        raise ModelFileError(f"{flag} {arch} with arguments {dict(kwargs)} raised {one_line(error)}") from None
    if not isinstance(model, nn.Module):
        raise ModelFileError(
            f"{flag} {arch} returned a {type(model).__name__}, not an nn.Module; name a model class or a factory"
        )
    return model
