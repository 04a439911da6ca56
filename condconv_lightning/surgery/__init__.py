"""Model surgery: convert chosen ``nn.Conv2d`` layers of any model to CondConv2d, save, load, revert.

- :func:`convert` (:mod:`.convert`) with selectors (:mod:`.select`), returning a
  :class:`ConversionReport` (:mod:`.report`) whose :class:`ConversionSpec` (:mod:`.spec`)
  :func:`apply_spec` repeats on a fresh model; options in :class:`ConversionConfig` (:mod:`.config`);
- :func:`save_converted` / :func:`load_converted` (:mod:`.persist`);
- :func:`revert` (:mod:`.revert`).
"""

from .config import ConversionConfig
from .convert import apply_spec, convert, describe
from .persist import load_converted, read_spec, save_converted
from .report import ConversionReport, ConvertedLayer, SkippedLayer
from .revert import revert
from .select import SelectorError, list_convs
from .spec import ConversionSpec, LayerOptions

__all__ = [
    "ConversionConfig",
    "ConversionReport",
    "ConversionSpec",
    "ConvertedLayer",
    "LayerOptions",
    "SelectorError",
    "SkippedLayer",
    "apply_spec",
    "convert",
    "describe",
    "list_convs",
    "load_converted",
    "read_spec",
    "revert",
    "save_converted",
]
