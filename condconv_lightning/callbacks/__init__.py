"""Lightning callbacks for CondConv models, one per file as in ``lightning.pytorch.callbacks``."""

from .conversion import CondConvConversion
from .routing_entropy_monitor import RoutingEntropyMonitor
from .temperature import RoutingTemperatureScheduler
from .tuning_cache import TuningCache

__all__ = ["CondConvConversion", "RoutingEntropyMonitor", "RoutingTemperatureScheduler", "TuningCache"]
