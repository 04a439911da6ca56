"""The CondConv router as a function: global average pool -> linear -> activation.

Sigmoid routing follows CondConv (Yang et al., NeurIPS 2019, arXiv:1904.04971);
softmax routing with a temperature follows Dynamic Convolution (Chen et al., CVPR
2020, arXiv:1912.03458), whose recipe anneals the temperature from 30 to 1.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Routing = Literal["sigmoid", "softmax"]
ROUTINGS: tuple[str, ...] = ("sigmoid", "softmax")


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
    raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
