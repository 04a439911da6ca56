"""Names added by model wrappers, and the models inside them.

``DataParallel`` and ``DistributedDataParallel`` keep the model as ``.module`` (state
dict keys and module names gain ``module.``); ``torch.compile`` keeps it as
``._orig_mod`` (``_orig_mod.``). Weights saved from a wrapped model must load into an
unwrapped one and the other way round, and selectors written for either must resolve.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import torch.nn as nn

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


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DataParallel/DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model
