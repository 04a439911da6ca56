"""The error of unusable model files, and one-line messages for errors raised by user code."""

from __future__ import annotations

from typing import Any


class ModelFileError(ValueError):
    """A model file (or the architecture named for it) that cannot be used, stated in one line saying what to do.

    ``facts`` (optional) carry structured details, e.g. the failed check's numbers, for
    programs that report errors as JSON.
    """

    def __init__(self, message: str, *, facts: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.facts = facts


def one_line(error: BaseException) -> str:
    """``Type: message`` with the message's lines joined, for one-line reports."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
