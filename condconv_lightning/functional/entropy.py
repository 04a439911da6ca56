"""Routing entropy of CondConv routing weights, as functions (the math, once).

CondConv (Yang et al., NeurIPS 2019, arXiv:1904.04971) routes each sample through a
mixture of K experts; sigmoid routing weights do not sum to one, so every sample's
weights are first normalized into a distribution over experts. Two entropies
describe routing, both divided by ``log K`` so they lie in ``[0, 1]``:

- ``entropy``: mean over samples of the entropy of each sample's distribution.
  0 means every sample uses a single expert, 1 means every sample mixes all experts
  evenly (the kernel is then not conditional at all).
- ``usage_entropy``: entropy of the normalized batch-mean routing, i.e. how evenly
  the experts are used over the data (load balance, as in mixture-of-experts work).
  Values near 0 mean the layer collapsed onto one expert.

With ``K = 1`` both are 0 by definition (``log 1 = 0``: one expert leaves nothing to
balance). A sample whose weights are all zero counts as entropy 0.

The states of :func:`_routing_entropy_update` are sums, so they add across batches and
across processes; :class:`~condconv_lightning.metrics.RoutingEntropy` wraps the same
two functions (torchmetrics' functional/modular pattern).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["routing_entropy"]


def _check_routing_weights(routing: Tensor, num_experts: int | None) -> None:
    """Raise a one-line ValueError unless ``routing`` is ``[..., K]`` floating, finite and non-negative."""
    if not isinstance(routing, Tensor) or not routing.is_floating_point():
        raise ValueError(f"routing weights must be a floating-point tensor, got {type(routing).__name__}")
    if routing.ndim < 2:
        raise ValueError(f"routing weights must have shape [B, K] (experts last), got {tuple(routing.shape)}")
    if num_experts is not None and routing.shape[-1] != num_experts:
        raise ValueError(
            f"routing weights have {routing.shape[-1]} experts in the last dimension, expected {num_experts}"
        )
    if not bool(torch.isfinite(routing).all()) or bool((routing < 0).any()):
        raise ValueError("routing weights must be finite and non-negative (pass the router's sigmoid/softmax output)")


def _normalized_entropy(probabilities: Tensor) -> Tensor:
    """Entropy over the last dimension divided by ``log K`` (``K = 1`` gives 0), in ``[0, 1]``.

    Probabilities rounded a hair above 1 (or a lone 1, whose ``-1 log 1`` is ``-0.0``) would give
    a negative value that prints as ``-0.000``: the result is clamped, and ``+ 0.0`` turns ``-0.0``
    into ``0.0``.
    """
    num_experts = probabilities.shape[-1]
    entropy = -torch.special.xlogy(probabilities, probabilities).sum(dim=-1)
    if num_experts > 1:
        entropy = entropy / math.log(num_experts)
    return entropy.clamp(0.0, 1.0) + 0.0


def _routing_entropy_update(routing: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Additive states of a batch: (sum of per-sample normalized entropies, sample count, per-expert routing sum).

    Half-precision input (autocast) is accumulated in float32; float64 stays float64.
    """
    weights = routing.reshape(-1, routing.shape[-1])
    if weights.dtype in (torch.float16, torch.bfloat16):
        weights = weights.float()
    totals = weights.sum(dim=-1, keepdim=True)
    probabilities = weights / totals.clamp_min(torch.finfo(weights.dtype).tiny)
    entropy_sum = _normalized_entropy(probabilities).sum()
    count = torch.tensor(weights.shape[0], dtype=weights.dtype, device=weights.device)
    return entropy_sum, count, weights.sum(dim=0)


def _routing_entropy_compute(entropy_sum: Tensor, count: Tensor, routing_sum: Tensor) -> dict[str, Tensor]:
    """Final values from the summed states: ``entropy``, ``usage_entropy`` and ``expert_mean`` ``[K]``."""
    expert_mean = routing_sum / count
    usage = expert_mean / expert_mean.sum().clamp_min(torch.finfo(expert_mean.dtype).tiny)
    return {"entropy": entropy_sum / count, "usage_entropy": _normalized_entropy(usage), "expert_mean": expert_mean}


def routing_entropy(routing: Tensor, validate_args: bool = True) -> dict[str, Tensor]:
    """Routing entropy statistics of routing weights ``[B, K]`` (or ``[..., K]``).

    Args:
        routing: non-negative routing weights, experts in the last dimension (for
            example ``CondConv2d.route(x)``); sigmoid weights need not sum to one.
        validate_args: check shape and values first (this reads values on the host,
            i.e. synchronizes with an accelerator; pass False in hot loops).

    Returns:
        ``{"entropy": mean normalized per-sample entropy, "usage_entropy": normalized
        entropy of the normalized mean routing, "expert_mean": mean routing weight per
        expert [K]}``; the entropies lie in ``[0, 1]``.

    Raises:
        ValueError: ``routing`` is not a floating ``[..., K]`` tensor of finite, non-negative values.

    Examples:
        >>> import torch
        >>> stats = routing_entropy(torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
        >>> [round(float(stats[k]), 4) for k in ("entropy", "usage_entropy")]
        [0.5, 0.8113]
    """
    if validate_args:
        _check_routing_weights(routing, None)
    return _routing_entropy_compute(*_routing_entropy_update(routing))
