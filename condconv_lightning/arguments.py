"""Validation of the arguments every entry point shares, written once.

Each check returns the value (normalized) or raises a one-line ``ValueError`` that
names the argument and what it takes, in the style of torchmetrics' argument
validation. :class:`CondConv2d`, :class:`~condconv_lightning.surgery.ConversionConfig`
and the spec read from a file all call these, so a value is accepted or refused the
same way whether a user typed it or a file said it.
"""

from __future__ import annotations

import math

SEED_LIMIT = 2**63
"""Seeds are integers in ``[0, 2**63)``: what ``torch.Generator.manual_seed`` takes without overflow."""


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
