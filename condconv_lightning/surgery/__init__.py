"""Model surgery: convert chosen ``nn.Conv2d`` layers of any model to CondConv2d, save, load, revert.

- :func:`convert` (:mod:`.convert`) with selectors (:mod:`.select`), returning a
  :class:`ConversionReport` (:mod:`.report`) whose :class:`ConversionSpec` (:mod:`.spec`)
  repeats the conversion on a fresh model;
- :func:`save_converted` / :func:`load_converted` (:mod:`.persist`);
- :func:`revert` (:mod:`.revert`).
"""

from .convert import convert
from .persist import load_converted, read_spec, save_converted
from .report import ConversionReport, ConvertedLayer, SkippedLayer
from .revert import revert
from .select import SelectorError, list_convs
from .spec import ConversionSpec, LayerOptions

__all__ = [
    "ConversionReport",
    "ConversionSpec",
    "ConvertedLayer",
    "LayerOptions",
    "SelectorError",
    "SkippedLayer",
    "convert",
    "list_convs",
    "load_converted",
    "read_spec",
    "revert",
    "save_converted",
]
