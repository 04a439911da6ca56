"""Fine-tuning CondConv image classifiers with Lightning: the module, synthetic data and the CLI."""

from .data import SyntheticImageDataModule, make_context_gratings
from .module import ImageClassifier, parameter_groups

__all__ = ["ImageClassifier", "SyntheticImageDataModule", "make_context_gratings", "parameter_groups"]
