"""``RoutingEntropy``: the torchmetrics ``Metric`` form of :func:`~condconv_lightning.functional.routing_entropy`.

The states are sums (``dist_reduce_fx="sum"``): per-sample normalized entropies,
the sample count and the routing weight per expert. Summing them across batches and
processes and computing the entropies once at the end gives exactly the value over
the concatenated global batch; averaging per-process entropies would not (the
usage entropy of a mean is not the mean of usage entropies).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from ..functional.entropy import _check_routing_weights, _routing_entropy_compute, _routing_entropy_update

__all__ = ["RoutingEntropy"]


class RoutingEntropy(Metric):
    """Accumulates routing weights ``[B, K]`` and computes their routing entropy statistics.

    ``compute()`` returns ``{"entropy", "usage_entropy", "expert_mean"}`` as
    :func:`~condconv_lightning.functional.routing_entropy` does for all samples seen since
    the last ``reset()``.

    Args:
        num_experts: K, the size of the routing weights' last dimension.
        validate_args: check every update's shape and values (a host read per update;
            the routing monitor turns it off to keep training free of synchronizations).
        kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``, ...).

    Raises:
        ValueError: ``num_experts`` is not a positive integer, or (with ``validate_args``)
            an update is not ``[..., num_experts]`` finite non-negative weights.

    Examples:
        >>> import torch
        >>> metric = RoutingEntropy(num_experts=2)
        >>> metric.update(torch.tensor([[1.0, 0.0]]))
        >>> metric.update(torch.tensor([[0.5, 0.5]]))
        >>> round(float(metric.compute()["usage_entropy"]), 4)
        0.8113
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    entropy_sum: Tensor
    count: Tensor
    routing_sum: Tensor

    def __init__(self, num_experts: int, validate_args: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}")
        self.num_experts = num_experts
        self.validate_args = validate_args
        self.add_state("entropy_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("routing_sum", default=torch.zeros(num_experts), dist_reduce_fx="sum")

    def update(self, routing: Tensor) -> None:
        """Add a batch of routing weights ``[B, K]`` (or ``[..., K]``)."""
        if self.validate_args:
            _check_routing_weights(routing, self.num_experts)
        entropy_sum, count, routing_sum = _routing_entropy_update(routing)
        self.entropy_sum += entropy_sum.to(self.entropy_sum.dtype)
        self.count += count.to(self.count.dtype)
        self.routing_sum += routing_sum.to(self.routing_sum.dtype)

    def compute(self) -> dict[str, Tensor]:
        """``{"entropy", "usage_entropy", "expert_mean"}`` over everything accumulated."""
        return _routing_entropy_compute(self.entropy_sum, self.count, self.routing_sum)
