"""condconv-lightning: turn ordinary CNNs into CondConv networks and fine-tune them with Lightning.

The layer and model surgery import eagerly. The Lightning pieces (metrics, callbacks,
fine-tuning) are re-exported lazily (PEP 562 ``__getattr__``), so ``import
condconv_lightning`` and the ``condconv-convert`` command do not pay for importing
Lightning.
"""

from importlib import import_module
from typing import Any

from .condconv2d import CondConv2d
from .functional.entropy import routing_entropy
from .surgery import (
    ConversionConfig,
    ConversionReport,
    ConversionSpec,
    SelectorError,
    apply_spec,
    convert,
    describe,
    list_convs,
    load_converted,
    revert,
    save_converted,
)
from .version import __version__

_LAZY = {
    "RoutingEntropy": "condconv_lightning.metrics",
    "RoutingEntropyMonitor": "condconv_lightning.callbacks",
    "CondConvConversion": "condconv_lightning.callbacks",
    "RoutingTemperatureScheduler": "condconv_lightning.callbacks",
    "TuningCache": "condconv_lightning.callbacks",
    "ImageClassifier": "condconv_lightning.finetune",
    "ImageFolderDataModule": "condconv_lightning.finetune",
    "ConversionCheckpointMixin": "condconv_lightning.finetune",
    "load_converted_checkpoint": "condconv_lightning.finetune",
    "SyntheticImageDataModule": "condconv_lightning.demos",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'condconv_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "CondConv2d",
    "CondConvConversion",
    "ConversionCheckpointMixin",
    "ConversionConfig",
    "ConversionReport",
    "ConversionSpec",
    "ImageClassifier",
    "ImageFolderDataModule",
    "RoutingEntropy",
    "RoutingEntropyMonitor",
    "RoutingTemperatureScheduler",
    "SelectorError",
    "SyntheticImageDataModule",
    "TuningCache",
    "__version__",
    "apply_spec",
    "convert",
    "describe",
    "list_convs",
    "load_converted",
    "load_converted_checkpoint",
    "revert",
    "routing_entropy",
    "save_converted",
]
