"""Validation of the arguments every entry point shares, written once.

Each check returns the value (normalized) or raises a one-line ``ValueError`` that
names the argument and what it takes, in the style of torchmetrics' argument
validation. :class:`CondConv2d`, :class:`~condconv_lightning.surgery.ConversionConfig`
and the spec read from a file all call these, so a value is accepted or refused the
same way whether a user typed it or a file said it. So do
:class:`~condconv_lightning.finetune.ImageClassifier` and its checkpoint schema
(:func:`condconv_lightning.checkpoints.untrusted_hparams`).
"""

from __future__ import annotations

import math
import re
import reprlib
import typing
from collections.abc import Mapping

SEED_LIMIT = 2**63
"""Seeds are integers in ``[0, 2**63)``: what ``torch.Generator.manual_seed`` takes without overflow."""
REGISTRIES = ("timm", "torchvision")
"""Registries a model name may name as ``REGISTRY:NAME`` (:mod:`condconv_lightning.loading.architectures`)."""
MODEL_NAME = re.compile(rf"(?:(?:{'|'.join(REGISTRIES)}):)?[A-Za-z0-9_][A-Za-z0-9_.-]{{0,199}}")
"""A registry or built-in model name: it selects a constructor already registered, and imports nothing it names."""
PlainValue = str | bool | int | float | None
"""A value keyword arguments from a file may take: it names no code, holds nothing nested, and a
parser never resolves it to code (``str`` first, so jsonargparse keeps a string a string)."""
PLAIN_TYPES = typing.get_args(PlainValue)


def check_num_experts(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"num_experts must be a positive integer, got {value!r}")
    return value


def check_temperature(value: object) -> float:
    return check_positive_number("temperature", value)


def check_seed(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2**63) or None, got {value!r}")
    return value


def check_non_negative_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def check_non_negative_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a number >= 0 (finite), got {value!r}")
    return float(value)


def check_positive_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_int_at_least(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_positive_or_none(name: str, value: object, none: str) -> float | None:
    """A positive finite number, or None (``none`` says what None means)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number or None ({none}), got {value!r}")
    return float(value)


def check_number_in(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def check_plain_kwargs(name: str, value: object) -> dict[str, PlainValue] | None:
    """None, or a mapping of names to plain values (``str``, ``bool``, ``int``, finite ``float``, None)."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(
        isinstance(key, str)
        and isinstance(item, PLAIN_TYPES)
        and not (isinstance(item, float) and not math.isfinite(item))
        for key, item in value.items()
    ):
        raise ValueError(
            f"{name} must map names to plain values (str, bool, int, finite float, None) or be None, "
            f"got {reprlib.repr(value)}"
        )
    return dict(value)


def check_model_name(name: str, value: object) -> str | None:
    """None, or a registry or built-in model name (``timm:NAME``, ``torchvision:NAME``, ``resnet_tiny``)."""
    if value is not None and not (isinstance(value, str) and MODEL_NAME.fullmatch(value)):
        raise ValueError(
            f"{name} must be timm:NAME, torchvision:NAME, a built-in model name or None, got {reprlib.repr(value)}"
        )
    return value
