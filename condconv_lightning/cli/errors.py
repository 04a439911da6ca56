"""The error the command line reports as one line, exit status 1, without a traceback, and the one place
error lines are printed: names from files in them print as text (:func:`~condconv_lightning.messages.printable`)."""

from __future__ import annotations

import sys
from typing import Any

from ..messages import printable


class CommandError(Exception):
    """A problem with the user's input, stated in one line that says what to do about it.

    ``facts`` (optional) are added to the ``--json`` error document, e.g. the failed check.
    """

    def __init__(self, message: str, *, facts: dict[str, Any] | None = None) -> None:
        super().__init__(printable(message))
        self.facts = facts


class UsageError(CommandError):
    """A command line that cannot work with the model it names, found once the model is read: exit status 2,
    as argparse's own usage errors."""


def print_error(program: str, message: str) -> None:
    """``program: error: message`` on stderr, in one line, control characters escaped."""
    print(f"{program}: error: {printable(' '.join(message.splitlines()))}", file=sys.stderr)
