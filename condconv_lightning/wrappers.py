"""Names added by model wrappers, and the models inside them.

``DataParallel`` and ``DistributedDataParallel`` keep the model as ``.module`` (state
dict keys and module names gain ``module.``); ``torch.compile`` keeps it as
``._orig_mod`` (``_orig_mod.``). Weights saved from a wrapped model must load into an
unwrapped one and the other way round, and selectors written for either must resolve.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

import torch.nn as nn

from .compat import compiled_module_inside

WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
Value = TypeVar("Value")


def strip(name: str) -> str:
    """``name`` without its leading ``module.`` / ``_orig_mod.`` parts (repeatedly, in any order)."""
    while name.startswith(WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def strip_keys(state: Mapping[str, Value]) -> dict[str, Value]:
    """``state`` with every key :func:`strip`-ped."""
    return {strip(key): value for key, value in state.items()}


def match_keys(state: Mapping[str, Value], names: Iterable[str]) -> dict[str, Value]:
    """``state`` with each key renamed to the one of ``names`` it equals without wrapper prefixes.

    A key that is one of ``names`` stays as it is, so a model whose own child is called
    ``module`` loads its keys unchanged, while weights saved from (or for) a wrapped model
    gain or lose the prefix; a key whose stripped form matches several names is left as it is.
    """
    names = set(names)
    by_stripped: dict[str, list[str]] = {}
    for name in names:
        by_stripped.setdefault(strip(name), []).append(name)
    renamed: dict[str, Value] = {}
    for key, value in state.items():
        targets = [key] if key in names else by_stripped.get(strip(key), [])
        renamed[targets[0] if len(targets) == 1 else key] = value
    return renamed


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DataParallel/DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif (compiled := compiled_module_inside(model)) is not None:
            model = compiled
        else:
            return model
