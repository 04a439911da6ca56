"""The ``condconv-convert`` command: safe loading, conversion, checking and saving of model files.

- :mod:`.formats`: what a file is, from its bytes (no unpickling);
- :mod:`.loading`: a file (plus ``--arch`` for weights) to an nn.Module, weights-only unless trusted;
- :mod:`.check`: original versus converted outputs on a random input;
- :mod:`.listing`: the ``--list`` table;
- :mod:`.convert`: the command itself (``main``).
"""

from .errors import CommandError
from .formats import FileFormat, detect_format, pickled_globals
from .loading import LoadedModel, load_model

__all__ = ["CommandError", "FileFormat", "LoadedModel", "detect_format", "load_model", "pickled_globals"]
