"""``--list``: every convolution of a model, and what ``--layers`` selects among them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn as nn
from rich import box
from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

from ..condconv2d import CondConv2d
from ..messages import printable


def conv_rows(model: nn.Module) -> list[dict[str, Any]]:
    """One JSON-ready row per Conv2d (subclasses included) or CondConv2d, in registration order."""
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, CondConv2d)):
            rows.append(
                {
                    "name": name,
                    "type": type(module).__name__,
                    "in_channels": module.in_channels,
                    "out_channels": module.out_channels,
                    "kernel_size": list(module.kernel_size),
                    "stride": list(module.stride),
                    "groups": module.groups,
                    "parameters": sum(p.numel() for p in module.parameters()),
                }
            )
    return rows


def mark_selection(
    rows: list[dict[str, Any]], selected: set[str], skipped: Mapping[str, str], already: set[str]
) -> None:
    """Add ``selected`` (bool) and ``note`` (why a matching layer is not converted) to each row."""
    for row in rows:
        row["selected"] = row["name"] in selected
        row["note"] = skipped.get(row["name"]) or ("already CondConv2d" if row["name"] in already else None)


class WholeNamesTable(Table):
    """A rich Table that keeps the ``whole`` columns (names) unwrapped while the console is wide enough.

    Rich narrows the widest wrappable column first, which can fold a name while a shorter note
    would have wrapped instead; names fold (never truncate) only when they cannot fit whole.
    """

    def __init__(self, *args: Any, whole: Sequence[int] = (0,), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.whole = tuple(whole)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for index in self.whole:
            self.columns[index].no_wrap = True
        if self.__rich_measure__(console, options).minimum > options.max_width:
            for index in self.whole:
                self.columns[index].no_wrap = False
        yield from super().__rich_console__(console, options)


def conv_table(rows: list[dict[str, Any]], title: str | None = None) -> Table:
    """The rows as a rich table; the ``selected`` column appears once a selection was marked.

    No vertical rules and one space between columns, so ResNet-50's names and every column fit in 80;
    nothing is ever cut short: notes fold first, and names fold only when they cannot fit whole.
    """
    marked = bool(rows) and "selected" in rows[0]
    table = WholeNamesTable(
        title=Text(printable(title)) if title is not None else None,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=(0, 0),
        whole=(0, 1),
    )
    for header, justify in [
        ("name", "left"),
        ("type", "left"),
        ("in->out", "right"),
        ("kernel", "right"),
        ("stride", "right"),
        ("groups", "right"),
        ("params", "right"),
    ]:
        table.add_column(header, justify=justify, no_wrap=header not in ("name", "type"), overflow="fold")
    if marked:
        table.add_column("--layers", justify="left", overflow="fold")
    for row in rows:
        cells: list[Any] = [  # names and notes are text from the model, never markup or terminal control
            Text(printable(row["name"])),
            Text(printable(row["type"])),
            f"{row['in_channels']}->{row['out_channels']}",
            "x".join(map(str, row["kernel_size"])),
            "x".join(map(str, row["stride"])),
            str(row["groups"]),
            f"{row['parameters']:,}",
        ]
        if marked:
            note = Text(printable(row["note"] or ""), "yellow")
            cells.append(Text("selected", "bold green") if row["selected"] else note)
        table.add_row(*cells)
    return table
