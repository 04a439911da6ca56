"""Swapping modules inside a model, the way ``nn.SyncBatchNorm.convert_sync_batchnorm`` does.

A module may sit at several paths (a conv used twice): the replacement is keyed by
the old module's ``id``, so every parent that holds it gets the same new module and
sharing survives. Parents are set with ``setattr``, which works for ``Sequential``,
``ModuleList`` and ``ModuleDict`` as for any module.
"""

from __future__ import annotations

import torch.nn as nn


def replace_modules(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Put ``replacements[id(old)]`` wherever ``old`` is a child of some module in ``model``."""
    for path, child in list(model.named_modules(remove_duplicate=False)):
        if path and id(child) in replacements:
            parent, _, child_name = path.rpartition(".")
            setattr(model.get_submodule(parent), child_name, replacements[id(child)])


def modules_by_name(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of ``model`` by every name it has: a snapshot :func:`restore_modules` returns to."""
    return dict(model.named_modules(remove_duplicate=False))


def restore_modules(model: nn.Module, before: dict[str, nn.Module]) -> None:
    """Undo replacements made since ``before`` was taken: each name gets its module back."""
    now = modules_by_name(model)
    replace_modules(
        model,
        {id(module): before[name] for name, module in now.items() if name in before and before[name] is not module},
    )
