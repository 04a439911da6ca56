"""Swapping modules inside a model, the way ``nn.SyncBatchNorm.convert_sync_batchnorm`` does.

A module may sit at several paths (a conv used twice): the replacement is keyed by
the old module's ``id``, so every parent that holds it gets the same new module and
sharing survives. Parents are set with ``setattr``, which works for ``Sequential``,
``ModuleList`` and ``ModuleDict`` as for any module.
"""

from __future__ import annotations

import torch.nn as nn

# Module attributes holding the hooks registered on one module. The dicts move as they
# are, so the handles the caller holds still remove their hooks from the new module.
HOOK_DICTS: tuple[str, ...] = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)


def carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the forward (pre-)hooks and backward hooks registered on ``old``, handles included."""
    for attr in HOOK_DICTS:
        setattr(new, attr, getattr(old, attr))
    new._is_full_backward_hook = old._is_full_backward_hook


def replace_modules(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Put ``replacements[id(old)]`` wherever ``old`` is a child of some module in ``model``."""
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])


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
