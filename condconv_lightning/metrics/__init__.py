"""Metrics of CondConv routing: functional and torchmetrics forms."""

# The module routing_entropy.py is imported first so that the package attribute
# ``routing_entropy`` ends up naming the function, not the submodule.
from .routing_entropy import RoutingEntropy
from .functional import routing_entropy  # noqa: E402  (order matters, see above)

__all__ = ["RoutingEntropy", "routing_entropy"]
