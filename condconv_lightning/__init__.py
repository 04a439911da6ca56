"""condconv-lightning: turn ordinary CNNs into CondConv networks and fine-tune them with Lightning."""

from importlib.metadata import PackageNotFoundError, version

from .condconv2d import CondConv2d

try:
    __version__ = version("condconv-lightning")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["CondConv2d", "__version__"]
