"""Fine-tuning with Lightning: the image classifier, its parameter groups, checkpoints that carry the conversion.

``SyntheticImageDataModule`` and ``make_context_gratings`` live in
:mod:`condconv_lightning.demos`; they are re-exported here, where they were first published.
"""

from ..demos.data import SyntheticImageDataModule, make_context_gratings
from .checkpointing import ConversionCheckpointMixin, load_converted_checkpoint, restore_conversion, save_conversion
from .image_folder import DataFolderError, ImageFolderDataModule
from .module import ImageClassifier, parameter_groups

__all__ = [
    "ConversionCheckpointMixin",
    "DataFolderError",
    "ImageClassifier",
    "ImageFolderDataModule",
    "SyntheticImageDataModule",
    "load_converted_checkpoint",
    "make_context_gratings",
    "parameter_groups",
    "restore_conversion",
    "save_conversion",
]
