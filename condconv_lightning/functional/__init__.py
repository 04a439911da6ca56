"""Functional forms: the router, the conditionally parameterized convolution, the rules of ``auto``."""

from .auto import choose_strategy
from .condconv import PADDING_MODES, STRATEGIES, condconv2d, explicit_padding
from .routing import ROUTINGS, route

__all__ = ["PADDING_MODES", "ROUTINGS", "STRATEGIES", "choose_strategy", "condconv2d", "explicit_padding", "route"]
