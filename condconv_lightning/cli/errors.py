"""The error the command line reports as one line, exit status 1, without a traceback."""

from __future__ import annotations

from typing import Any


class CommandError(Exception):
    """A problem with the user's input, stated in one line that says what to do about it.

    ``facts`` (optional) are added to the ``--json`` error document, e.g. the failed check.
    """

    def __init__(self, message: str, *, facts: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.facts = facts
