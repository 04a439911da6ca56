"""``condconv-finetune``'s parser: a ``--help`` a person can read, and errors in one line.

LightningCLI's help lists every Trainer, model, optimizer and scheduler option with its
whole docstring (over a thousand lines for ``condconv-finetune fit``). The short help
keeps the options a fine-tuning run sets, each with the first sentence of its help, in
argparse's usual layout; ``--help_full`` prints LightningCLI's complete help. Help texts
come from docstrings written for Sphinx: both helps print them as plain text
(:func:`plain_text`, applied by :class:`PlainTextHelp` where argparse wraps text). A bad
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

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser

from .errors import print_error

__all__ = ["FULL_HELP_FLAG", "FinetuneParser", "plain_text"]

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


SPHINX_ROLE = re.compile(r"(?::[\w-]+)+:`([^`]+)`")
"""``:class:`target```, ``:py:func:`~a.b` ``, ``:paramref:`title <target>` ``: a cross-reference; group 1 its text."""
LITERAL = re.compile(r"``(.+?)``")
LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`_{1,2}")
INTERPRETED = re.compile(r"`([^`]+)`")


def plain_text(text: str) -> str:
    """Sphinx and reST markup in a help text as the words a reader sees: a cross-reference as its target (the
    last name after ``~``) or its title, a literal or interpreted text without backticks, a link as its title."""

    def reference(match: re.Match[str]) -> str:
        target = match.group(1).strip()
        titled = re.fullmatch(r"(.+?)\s*<[^<>]+>", target)
        if titled:
            return titled.group(1)
        target = target.lstrip("!")
        return target.rpartition(".")[2] if target.startswith("~") else target

    text = SPHINX_ROLE.sub(reference, text)
    text = LITERAL.sub(r"\1", text)
    text = LINK.sub(r"\1", text)
    return INTERPRETED.sub(r"\1", text)


class PlainTextHelp(argparse.HelpFormatter):
    """Every text of a help as plain text (:func:`plain_text`): the parser's, each group's title and description,
    and each option's help (argparse's one step that wraps it)."""

    def start_section(self, heading: str | None) -> None:
        super().start_section(heading and plain_text(heading))

    def add_text(self, text: str | None) -> None:
        super().add_text(text and plain_text(text))

    def _split_lines(self, text: str, width: int) -> list[str]:
        return super()._split_lines(plain_text(text), width)


class FullHelpFormatter(PlainTextHelp, DefaultHelpFormatter):
    """jsonargparse's help (each option's type and default), as plain text."""


class _FullHelpAction(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        parser.full_help = True  # type: ignore[attr-defined]
        parser.print_help()
        parser.exit()


class FinetuneParser(LightningArgumentParser):
    """LightningArgumentParser with the short ``--help`` (``--help_full``: the complete one), help texts as plain
    text, and one-line errors."""

    full_help = False

    def __init__(
        self, *args: Any, formatter_class: type[argparse.HelpFormatter] = FullHelpFormatter, **kwargs: Any
    ) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)
        self.add_argument(
            FULL_HELP_FLAG, action=_FullHelpAction, help="Show every option (Trainer, model, data) and exit."
        )

    def format_help(self) -> str:
        if self.full_help or not self._runs_the_trainer():
            with _first_sentences(_subcommand_choices(self)):  # LightningCLI cuts their docstrings mid-sentence
                return super().format_help()
        formatter_class, self.formatter_class = self.formatter_class, PlainTextHelp
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

    def _runs_the_trainer(self) -> bool:
        """Whether this is a subcommand's parser, with the Trainer's options: other parsers (the subcommand list,
        ``--data.help NAME``'s options) are short already, and show everything they hold."""
        return any(name.startswith("--trainer.") for action in self._actions for name in action.option_strings)


def _shown(action: argparse.Action) -> bool:
    names = set(action.option_strings)
    if names & SHORT_HELP_OPTIONS:
        return True
    return any(n.startswith("--model.") and not n.endswith(".help") for n in names) and not names & HIDDEN_MODEL_OPTIONS


def _first_sentence(text: str) -> str:
    text = " ".join(plain_text(text).split())
    match = re.match(r"(.+?\.)(\s|$)", text)
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


def _subcommand_choices(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The entries of the subcommand list (``fit``, ``validate``, ...), if ``parser`` has one."""
    subcommands = (action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return [choice for action in subcommands for choice in action._get_subactions()]


@contextmanager
def _first_sentences(actions: list[argparse.Action]) -> Iterator[None]:
    """Cut the help of ``actions`` to its first sentence."""
    saved = [(action, action.help) for action in actions]
    try:
        for action, text in saved:
            if text and text != argparse.SUPPRESS:
                action.help = _first_sentence(text)
        yield
    finally:
        for action, text in saved:
            action.help = text


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
