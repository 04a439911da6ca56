"""Model files to modules, safely: what a file is, loading it without running its code, checking a conversion.

- :mod:`.formats`: what a file is, from its bytes alone (nothing is unpickled);
- :mod:`.model_file`: a file (plus an architecture for weights) to an ``nn.Module``,
  weights-only unless the caller trusts the file;
- :mod:`.check`: a converted model's outputs against the original's on a random input.

Every problem with a file is a :class:`ModelFileError` (a ``ValueError``) with a
one-line message that says what to do; the command line prints it as it is.
"""

from .check import CheckResult, compare, float32_outputs, inferred_input_shapes, reference_run
from .errors import ModelFileError, one_line
from .formats import FileFormat, detect_format, pickled_globals
from .model_file import LoadedModel, import_object, load_model

__all__ = [
    "CheckResult",
    "FileFormat",
    "LoadedModel",
    "ModelFileError",
    "compare",
    "detect_format",
    "float32_outputs",
    "import_object",
    "inferred_input_shapes",
    "load_model",
    "one_line",
    "pickled_globals",
    "reference_run",
]
