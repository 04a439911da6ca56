"""The installed version of condconv-lightning (recorded in conversion specs)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("condconv-lightning")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
