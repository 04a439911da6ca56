"""The CondConv router as a function: global average pool -> linear -> activation.

Sigmoid routing follows CondConv (Yang et al., NeurIPS 2019, arXiv:1904.04971);
softmax routing with a temperature follows Dynamic Convolution (Chen et al., CVPR
2020, arXiv:1912.03458), whose recipe anneals the temperature from 30 to 1.
``normalized_sigmoid`` divides the sigmoid weights by their sum: CondConv's independent
gates, but weights that sum to one like softmax's.

Weights that sum to one matter for upcycling: a mixture of identical experts is then the
original kernel for *any* router, so a converted layer can start with a random router and
still compute exactly what the conv did (:func:`sums_to_one`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Routing = Literal["sigmoid", "softmax", "normalized_sigmoid"]
ROUTINGS: tuple[str, ...] = ("sigmoid", "softmax", "normalized_sigmoid")


def sums_to_one(routing: str) -> bool:
    """Whether every sample's routing weights sum to one (softmax, normalized sigmoid), whatever the router."""
    return routing in ("softmax", "normalized_sigmoid")


def uniform_routing(routing: str, num_experts: int) -> float:
    """The weight every expert gets from a router with zero weight and bias: ``sigmoid(0)`` or ``1/K``."""
    return 0.5 if routing == "sigmoid" else 1.0 / num_experts


def check_routing(routing: str) -> str:
    """Return ``routing`` if it names a known activation, else raise a one-line ValueError."""
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    return routing


def route(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    routing: Routing = "sigmoid",
    temperature: float | Tensor = 1.0,
) -> Tensor:
    """Routing weights ``[B, K]`` of a CondConv layer for input ``x`` of shape ``[B, C, H, W]``.

    ``weight``/``bias`` are the router's linear layer (``[K, C]``, ``[K]``). The logits
    are divided by ``temperature`` before the activation, for both routings.

    The pooling is a mean over the spatial dimensions, which reads channels_last
    input without a layout copy; under autocast the linear layer and the activation
    produce the dtype autocast chooses for them.
    """
    pooled = x.mean(dim=(-2, -1))
    logits = F.linear(pooled, weight, bias) / temperature
    if routing == "sigmoid":
        return torch.sigmoid(logits)
    if routing == "softmax":
        return torch.softmax(logits, dim=-1)
    if routing == "normalized_sigmoid":
        gates = torch.sigmoid(logits)
        return gates / gates.sum(dim=-1, keepdim=True)
    raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
