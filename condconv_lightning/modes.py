"""Probing forwards: run a model in eval mode without autograd, then leave every module as it was.

Shape probes for the conversion report, routing statistics for ``revert`` and the
conversion check all run such a forward. Eval mode keeps BatchNorm running statistics
unchanged; each submodule's own flag is restored, since models often keep some parts
(frozen BatchNorm) in eval mode while training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Yield ``model`` in eval mode under ``torch.no_grad``; every module's mode is restored on exit."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, training in modes:
            module.training = training
