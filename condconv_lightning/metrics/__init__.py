"""Metrics of CondConv routing as torchmetrics ``Metric`` classes (the functional forms are in ``functional``).

``routing_entropy`` is re-exported here too, where it was first published.
"""

from ..functional.entropy import routing_entropy
from .entropy import RoutingEntropy

__all__ = ["RoutingEntropy", "routing_entropy"]
