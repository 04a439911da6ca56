"""Demo material, in the spirit of ``lightning.pytorch.demos``: small CNNs built in code and synthetic data.

Tests, benchmarks, examples and the fine-tuning defaults use them; nothing in the
library depends on them. The models import eagerly; the data module (which needs
Lightning) on first use, so that ``--arch condconv_lightning.demos:resnet_tiny`` stays fast.
"""

from importlib import import_module
from typing import Any

from .models import MobileNet, ResNet, mobilenet_tiny, resnet50_like, resnet_tiny

_LAZY = {
    "SyntheticImageDataModule": ".data",
    "make_context_gratings": ".data",
    "make_multicontext_gratings": ".data",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MobileNet",
    "ResNet",
    "SyntheticImageDataModule",
    "make_context_gratings",
    "make_multicontext_gratings",
    "mobilenet_tiny",
    "resnet50_like",
    "resnet_tiny",
]
