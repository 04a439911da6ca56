"""The error of unusable model files, and one-line messages for errors raised by user code.

:class:`ModelFileError` is defined with format detection (:mod:`condconv_lightning.formats`), which
the lower layers (:mod:`condconv_lightning.io`, :mod:`condconv_lightning.surgery`) use too.
"""

from __future__ import annotations

from ..formats import ModelFileError
from ..messages import printable

__all__ = ["ModelFileError", "one_line"]


def one_line(error: BaseException) -> str:
    """``Type: message`` with the message's lines joined and names from files :func:`printable`, for one-line
    reports."""
    text = printable(" ".join(line.strip() for line in str(error).splitlines() if line.strip()))
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
