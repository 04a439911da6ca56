"""Command-line options generated from :class:`~condconv_lightning.surgery.ConversionConfig`.

Each field becomes ``--field-name`` with the field's default, its ``Literal`` choices
and its help text, and is validated by the config itself, so a new conversion option
reaches the command line without touching it. A bad value is a usage error (exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from ..surgery import ConversionConfig

NUMBERS: dict[Any, type] = {int: int, float: float}


def add_config_arguments(parser: argparse.ArgumentParser, defaults: Mapping[str, Any] = {}) -> None:
    """Add one option per :class:`ConversionConfig` field; ``defaults`` overrides the config's defaults."""
    hints = typing.get_type_hints(ConversionConfig)
    group = parser.add_argument_group("conversion options (ConversionConfig)")
    for field in dataclasses.fields(ConversionConfig):
        default = defaults.get(field.name, field.default)
        flag = "--" + field.name.replace("_", "-")
        shown = field.metadata.get("default_shown", default) if field.name not in defaults else default
        help_text = f"{field.metadata.get('help', '')} (default: {shown})"
        kind = _unoptional(hints[field.name])
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif typing.get_origin(kind) is typing.Literal:
            group.add_argument(flag, choices=typing.get_args(kind), default=default, help=help_text)
        else:
            parse = NUMBERS.get(kind, _kernel_sizes)
            group.add_argument(
                flag,
                type=_validated(field.name, parse),
                default=default,
                help=help_text,
                metavar=field.metadata.get("metavar", field.name.upper()),
            )


def config_from_args(args: argparse.Namespace) -> ConversionConfig:
    """The :class:`ConversionConfig` that the parsed options describe."""
    return ConversionConfig(**{field.name: getattr(args, field.name) for field in dataclasses.fields(ConversionConfig)})


def _validated(name: str, parse: Any) -> Any:
    """An argparse ``type``: parse the text, then let ConversionConfig validate (and normalize) the value."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            value = text  # unparsable: the config's own check says what the option takes
        try:
            return getattr(ConversionConfig(**{name: value}), name)
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = name  # argparse names the type in its messages
    return convert


def _kernel_sizes(text: str) -> list[tuple[int, int]]:
    """``3,1x3`` -> ``[(3, 3), (1, 3)]``."""
    sizes = []
    for part in text.split(","):
        numbers = [int(n) for n in part.strip().lower().split("x")]
        sizes.append((numbers[0], numbers[0]) if len(numbers) == 1 else tuple(numbers))
    return sizes


def _unoptional(kind: Any) -> Any:
    arguments = [a for a in typing.get_args(kind) if a is not type(None)]
    union = typing.get_origin(kind) in (typing.Union, types.UnionType)
    return arguments[0] if union and len(arguments) == 1 else kind
