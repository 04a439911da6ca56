"""Fine-tuning CondConv image classifiers with Lightning: the LightningModule and its parameter groups.

``SyntheticImageDataModule`` and ``make_context_gratings`` live in
:mod:`condconv_lightning.demos`; they are re-exported here, where they were first published.
"""

from ..demos.data import SyntheticImageDataModule, make_context_gratings
from .module import ImageClassifier, parameter_groups

__all__ = ["ImageClassifier", "SyntheticImageDataModule", "make_context_gratings", "parameter_groups"]
