"""Model files to modules, safely: what a file is, loading it without running its code, checking a conversion.

- :mod:`.architectures`: models by name (``timm:NAME``, ``torchvision:NAME``, built-in, import path);
- :mod:`condconv_lightning.formats`: what a file is, from its bytes alone (nothing is unpickled);
- :mod:`.model_file`: a file (plus an architecture for weights) to an ``nn.Module``,
  weights-only unless the caller trusts the file;
- :mod:`.check`: a converted model's outputs against the original's on a random input.

Every problem with a file is a :class:`ModelFileError` (a ``ValueError``) with a
one-line message that says what to do; the command line prints it as it is.
"""

from ..formats import DetectedFile, FileFormat, detect_format, pickled_globals
from .architectures import build_architecture, resolve_architecture
from .check import CheckResult, compare, float32_outputs, inferred_input_shapes, reference_run
from .errors import ModelFileError, one_line
from .imports import import_object
from .model_file import LoadedModel, classifier_name, load_model, load_pretrained

__all__ = [
    "CheckResult",
    "DetectedFile",
    "FileFormat",
    "LoadedModel",
    "ModelFileError",
    "build_architecture",
    "classifier_name",
    "compare",
    "detect_format",
    "float32_outputs",
    "import_object",
    "inferred_input_shapes",
    "load_model",
    "load_pretrained",
    "one_line",
    "pickled_globals",
    "reference_run",
    "resolve_architecture",
]
