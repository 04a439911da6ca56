"""Functional forms: the router, the conditionally parameterized convolution, routing entropy, strategy choice."""

from .auto import choose_strategy
from .autotune import (
    clear_tuning_cache,
    is_tuning_enabled,
    load_tuning_cache,
    save_tuning_cache,
    set_tuning,
    tuning,
    tuning_cache,
)
from .condconv import PADDING_MODES, STRATEGIES, condconv2d, condconv2d_with_strategy, explicit_padding
from .entropy import routing_entropy
from .routing import ROUTINGS, route

__all__ = [
    "PADDING_MODES",
    "ROUTINGS",
    "STRATEGIES",
    "choose_strategy",
    "clear_tuning_cache",
    "condconv2d",
    "condconv2d_with_strategy",
    "explicit_padding",
    "is_tuning_enabled",
    "load_tuning_cache",
    "route",
    "routing_entropy",
    "save_tuning_cache",
    "set_tuning",
    "tuning",
    "tuning_cache",
]
