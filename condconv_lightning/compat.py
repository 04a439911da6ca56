"""The one module that reads names private to torch: probes with no public API, each with a safe fallback.

torch renames its private names without notice (torch 2.14 replaced
``torch.fx._symbolic_trace._is_fx_tracing_flag``, which broke every forward of a library that
read it). Everything else in the package uses public APIs only; a test fails when a private
torch or Lightning name appears anywhere but here (``tests/test_compat.py``).

Each probe is looked up once, by name, at import. Where the running torch lacks one, the
probe falls back to the answer that keeps results correct, and :data:`MISSING` names it:

- the ``can the tuner time now?`` questions answer "yes, something is active", so
  ``strategy="auto"`` decides by its rules without timing (the same function, perhaps slower);
- :func:`weights_only_default_globals` answers with no globals, which only changes which
  global a refusal message names first.

Module surgery also needs two things ``nn.Module`` keeps in private attributes: the hooks
registered on a module (which must move to its replacement, handles included) and the module
inside a ``torch.compile`` wrapper. Those are read here too, attribute by attribute, so a torch
that drops or adds one loses only that one.

The tests assert that :data:`MISSING` is empty on every torch the project tests, and that each
probe answers correctly there.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

__all__ = [
    "MISSING",
    "compiled_module_inside",
    "dispatch_mode_active",
    "forward_pre_hooks",
    "functorch_transform_active",
    "in_backward_pass",
    "move_hooks",
    "saved_tensor_hooks_active",
    "weights_only_default_globals",
]

MISSING: list[str] = []
"""Dotted names of the private torch functions this torch lacks (their probes use the fallback)."""


def _private(module: str, name: str) -> Callable[..., Any] | None:
    """``module.name`` if this torch has it (and it is callable), else None, recorded in :data:`MISSING`."""
    try:
        found = getattr(importlib.import_module(module), name, None)
    except ImportError:
        found = None
    if not callable(found):
        MISSING.append(f"{module}.{name}")
        return None
    return found


_current_dispatch_mode = _private("torch.utils._python_dispatch", "_get_current_dispatch_mode")
_current_graph_task_id = _private("torch._C", "_current_graph_task_id")
_top_saved_tensors_hooks = _private("torch._C._autograd", "_top_saved_tensors_default_hooks")
_functorch_transforms_active = _private("torch._C", "_are_functorch_transforms_active")
_weights_only_allowed_globals = _private("torch._weights_only_unpickler", "_get_allowed_globals")


def dispatch_mode_active() -> bool:
    """Whether a ``TorchDispatchMode`` (FakeTensor, a FLOP counter, op logging) intercepts operations now."""
    return True if _current_dispatch_mode is None else _current_dispatch_mode() is not None


def in_backward_pass() -> bool:
    """Whether the autograd engine is running a backward pass on this thread."""
    return True if _current_graph_task_id is None else _current_graph_task_id() != -1


def saved_tensor_hooks_active() -> bool:
    """Whether default saved-tensor hooks (activation checkpointing, ``save_on_cpu``) are installed."""
    return True if _top_saved_tensors_hooks is None else _top_saved_tensors_hooks(False) is not None


def functorch_transform_active() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``) is running."""
    return True if _functorch_transforms_active is None else bool(_functorch_transforms_active())


def weights_only_default_globals() -> set[str]:
    """``module.name`` of every global ``torch.load(weights_only=True)`` resolves by default (empty if unknown)."""
    return set() if _weights_only_allowed_globals is None else set(_weights_only_allowed_globals())


HOOK_ATTRIBUTES: tuple[str, ...] = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_is_full_backward_hook",
)
"""Attributes of ``nn.Module`` that hold the hooks registered on one module (and how its backward hooks run)."""


def move_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the forward (pre-)hooks and backward hooks registered on ``old``.

    The dicts move as they are, so the handles the caller holds still remove their hooks
    from ``new``. An attribute this torch does not have is skipped.
    """
    for name in HOOK_ATTRIBUTES:
        if hasattr(old, name):
            setattr(new, name, getattr(old, name))


def forward_pre_hooks(module: nn.Module) -> Iterable[Callable[..., Any]]:
    """The forward pre-hooks registered on ``module`` itself (not the global ones)."""
    return tuple(getattr(module, "_forward_pre_hooks", {}).values())


def compiled_module_inside(model: nn.Module) -> nn.Module | None:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) runs, or None for any other module."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else None
