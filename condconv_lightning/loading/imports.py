"""Importing what the user names on the command line: ``module.path:attribute``, the current folder included."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from .errors import ModelFileError, one_line

__all__ = ["import_object", "make_cwd_importable"]


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
