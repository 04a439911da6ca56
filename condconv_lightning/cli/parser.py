"""``condconv-finetune``'s parser: a ``--help`` a person can read, and errors in one line.

LightningCLI's help lists every Trainer, model, optimizer and scheduler option with its
whole docstring (over a thousand lines for ``condconv-finetune fit``). The short help
keeps the options a fine-tuning run sets, each with the first sentence of its help, in
argparse's usual layout; ``--help_full`` prints LightningCLI's complete help. A bad
option is reported in one line (a class that does not import: which, and why; a data
module name that matches none: the close names) instead of the usage block and
jsonargparse's nested explanation.
"""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser

from .errors import print_error

__all__ = ["FULL_HELP_FLAG", "FinetuneParser"]

FULL_HELP_FLAG = "--help_full"

SHORT_HELP_OPTIONS = frozenset(
    {
        "--help",
        FULL_HELP_FLAG,
        "--config",
        "--print_config",
        "--seed_everything",
        "--trust_checkpoint",
        "--ckpt_path",
        "--data",
        "--trainer.accelerator",
        "--trainer.strategy",
        "--trainer.devices",
        "--trainer.precision",
        "--trainer.max_epochs",
        "--trainer.max_steps",
        "--trainer.val_check_interval",
        "--trainer.log_every_n_steps",
        "--trainer.callbacks",
        "--trainer.logger",
        "--trainer.default_root_dir",
    }
)
"""Options the short help shows, besides every plain ``--model.NAME`` option."""

GROUP_TITLES = {"--trainer": "trainer", "--model": "model", "--data": "data", "--ckpt_path": "resuming"}
"""Short titles of the option groups (LightningCLI titles them with the first line of each class's docstring)."""

HIDDEN_MODEL_OPTIONS = frozenset({"--model", "--model.model"})
"""Model options left to the full help: a config path, and the network as a class path (``--model.arch`` names it)."""


SHORT_HELP_EPILOG = f"""\
data: --data ImageFolderDataModule --data.root DIR (your images, a folder per class), or
SyntheticImageDataModule (the default); --data.help NAME lists a data module's options.
This is the short help; {FULL_HELP_FLAG} lists every option with its type."""


class _FullHelpAction(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        parser.full_help = True  # type: ignore[attr-defined]
        parser.print_help()
        parser.exit()


class FinetuneParser(LightningArgumentParser):
    """LightningArgumentParser with the short ``--help`` (``--help_full``: the complete one) and one-line errors."""

    full_help = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument(
            FULL_HELP_FLAG, action=_FullHelpAction, help="Show every option (Trainer, model, data) and exit."
        )

    def format_help(self) -> str:
        if self.full_help or self._lists_subcommands():
            return super().format_help()
        formatter_class, self.formatter_class = self.formatter_class, argparse.HelpFormatter
        try:
            with _shortened(self):
                text = super().format_help()
        finally:
            self.formatter_class = formatter_class
        return f"{text}\n{SHORT_HELP_EPILOG}\n"

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Print ``condconv-finetune: error: ...`` in one line and exit with status 2, as argparse does."""
        print_error("condconv-finetune", _one_line(message))
        raise SystemExit(2)

    def _lists_subcommands(self) -> bool:
        """Whether this is the top-level parser, whose help lists the subcommands only (short already)."""
        return any(isinstance(action, argparse._SubParsersAction) for action in self._actions)


def _shown(action: argparse.Action) -> bool:
    names = set(action.option_strings)
    if names & SHORT_HELP_OPTIONS:
        return True
    return any(n.startswith("--model.") and not n.endswith(".help") for n in names) and not names & HIDDEN_MODEL_OPTIONS


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    match = re.match(r"(.+?[.;])(\s|$)", text)
    return match.group(1) if match else text


def _one_line(message: str) -> str:
    """jsonargparse's nested explanation cut to its cause: a class that does not import, else its first lines."""
    key = re.search(r'Parser key "([^"]+)"', message)
    where = f"--{key.group(1)}: " if key else ""
    unknown = re.search(r"Expected a dot import path string: (\S+)", message)
    if key and key.group(1) == "data" and unknown:
        return _unknown_data_module(unknown.group(1))
    problem = re.search(r"Problem with given class_path '([^']+)':\s*\n\s*(.+)", message)
    if problem:
        return (
            f"{where}cannot use {problem.group(1)} ({problem.group(2).strip()}); check the name, or run from the "
            "folder that contains its module"
        )
    lines = [line.strip(" -") for line in message.splitlines() if line.strip(" -")]
    if key and len(lines) > 1:
        lines = lines[1:]
    return where + " ".join(lines[:2])


def _unknown_data_module(name: str) -> str:
    """``--data NAME`` names no class: the close names among the data modules imported here, and the other way."""
    known, stack = set(), [LightningDataModule]
    while stack:
        for subclass in stack.pop().__subclasses__():
            stack.append(subclass)
            if not subclass.__name__.startswith("_"):
                known.add(subclass.__name__)
    close = difflib.get_close_matches(name, sorted(known), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"--data {name}: no such data module{hint} (known here: {', '.join(sorted(known))}; or give module.Class)"


def _default(action: argparse.Action) -> str:
    """`` (default: X)`` for a plain default value, as argparse's ``ArgumentDefaultsHelpFormatter`` shows it."""
    if isinstance(action.default, (str, int, float)) and action.default != argparse.SUPPRESS:
        return f" (default: {action.default})"
    return ""


@contextmanager
def _shortened(parser: argparse.ArgumentParser) -> Iterator[None]:
    """Hide the options the short help leaves out, and cut the others' help and the groups' texts to a sentence."""
    saved_actions = [(action, action.help) for action in parser._actions]
    saved_groups = [(group, group.title, group.description) for group in parser._action_groups]
    try:
        for action, text in saved_actions:
            if not _shown(action):
                action.help = argparse.SUPPRESS
            elif text and text != argparse.SUPPRESS:
                action.help = _first_sentence(text) + _default(action)
        for group, _, _ in saved_groups:
            group.description = None
            first = next((a.option_strings[-1] for a in group._group_actions if a.option_strings), "")
            group.title = GROUP_TITLES.get(first.split(".")[0].split(" ")[0], group.title)
        yield
    finally:
        for action, text in saved_actions:
            action.help = text
        for group, title, description in saved_groups:
            group.title, group.description = title, description
