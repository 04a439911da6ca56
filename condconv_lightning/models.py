"""Alias of :mod:`condconv_lightning.demos.models`, where the demo CNNs live; kept because this name was published."""

from .demos.models import MobileNet, ResNet, mobilenet_tiny, resnet50_like, resnet_tiny

__all__ = ["MobileNet", "ResNet", "mobilenet_tiny", "resnet50_like", "resnet_tiny"]
