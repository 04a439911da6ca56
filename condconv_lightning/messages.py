"""Text from files in messages: names print as text, never as terminal control.

State-dict keys, spec layer names, class names in pickles and paths come from files that
anyone may have written. Printed raw, an escape sequence in one of them drives the terminal
(rewrites what is shown, sets the window title, hides the rest of the line), and a bidi
override reverses what follows it. Every message that may hold such a name passes through
:func:`printable` where it leaves the product (the one-line error helpers, warnings, the command
line's output), which writes each character that is not printable as Python's ``repr`` would
(``\\x1b``, ``\\x07``, ``\\r``, ``\\x00``, ``\\u202e``) and leaves everything else as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_NAMES_SHOWN = 3
"""Names a message lists before it says how many more there are."""


def printable(text: str) -> str:
    """``text`` with every character that is not printable (controls, format characters such as bidi
    overrides, line and paragraph separators) escaped as ``repr`` escapes it; plain spaces stay."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() or char == " " else repr(char)[1:-1] for char in text)


def name_list(names: Sequence[str], shown: int = MAX_NAMES_SHOWN) -> str:
    """The first ``shown`` names, comma-separated and :func:`printable`, and how many more there are."""
    listed = ", ".join(printable(name) for name in names[:shown])
    return listed + (f" and {len(names) - shown} more" if len(names) > shown else "")
