"""The conversion check: the converted model must compute what the original computed.

Exact upcycling (:meth:`CondConv2d.from_conv`) makes a converted
model reproduce the original's outputs up to float32 round-off. The command verifies
that on a random input before it writes anything, so a conversion that would change
the model (a Conv2d subclass with its own forward converted by force, a broken layer)
is caught at conversion time instead of in training. Differences are measured as the
project's tests measure them: largest absolute difference, and that divided by the
largest reference magnitude.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch import Tensor

from ..condconv2d import CondConv2d
from ..modes import evaluating
from .errors import ModelFileError, one_line

# One sample: freshly upcycled layers route every sample identically (constant router), so
# a larger batch would cost forward time without testing anything more.
CHECK_BATCH = 1
# Tried in order: 64x64 is 12x cheaper than 224x224 and enough for any network that pools
# globally; 224x224 (ImageNet) serves networks whose head needs a fixed size.
SPATIAL_SIZES = (64, 224)
DEFAULT_TOLERANCE = 1e-5  # the acceptance bar of exact upcycling: relative difference in float32


def default_tolerance(model: nn.Module) -> float:
    """:data:`DEFAULT_TOLERANCE`, or the machine epsilon of the model's least precise floating dtype if that is
    larger: a bf16 or fp16 model stores each upcycled expert rounded on its own, so the experts' mix is the
    original kernel to within that rounding (a wrong conversion differs by far more)."""
    dtypes = {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}
    return max([DEFAULT_TOLERANCE, *(torch.finfo(dtype).eps for dtype in dtypes)])


@dataclass(frozen=True)
class CheckResult:
    """Largest differences between the original and converted outputs on one random input."""

    input_shape: tuple[int, ...]
    max_abs_diff: float
    max_rel_diff: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_rel_diff <= self.tolerance  # False for NaN too

    def to_dict(self) -> dict:
        return {**asdict(self), "input_shape": list(self.input_shape), "passed": self.passed}


def inferred_input_shapes(model: nn.Module) -> list[tuple[int, ...]]:
    """``(1, C, 64, 64)`` then ``(1, C, 224, 224)``, C the in_channels of the first conv registered.

    Registration order is the forward order in almost every CNN (stems come first).
    Empty when the model has no convolution; a model that fails on both shapes is
    asked for ``--input-shape``.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, CondConv2d)):
            return [(CHECK_BATCH, module.in_channels, size, size) for size in SPATIAL_SIZES]
    return []


def reference_run(model: nn.Module, shapes: Sequence[tuple[int, ...]], seed: int) -> tuple[Tensor, list[Tensor]]:
    """The first of ``shapes`` the model runs on: the random input and the model's float32 outputs."""
    for index, shape in enumerate(shapes):
        x = random_input(shape, seed)
        try:
            return x, float32_outputs(model, x)
        except ModelFileError:
            if index == len(shapes) - 1:
                raise
    raise ModelFileError(
        "cannot infer the check's input shape (the model has no Conv2d); pass --input-shape or --no-check"
    )


def random_input(shape: Sequence[int], seed: int) -> Tensor:
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def float32_outputs(model: nn.Module, x: Tensor) -> list[Tensor]:
    """Every output tensor of ``model(x)`` in float32 eval mode; ``model`` is left as it was.

    A model held in another dtype runs as a float32 copy; each submodule's train/eval
    flag is restored afterwards (models often keep some parts, e.g. frozen BatchNorm,
    in eval mode while training).
    """
    floating = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    runner = model if all(t.dtype == torch.float32 for t in floating) else copy.deepcopy(model).float()
    try:
        with evaluating(runner):
            output = runner(x.to(floating[0].device) if floating else x)
    except Exception as error:
        raise ModelFileError(
            f"the check could not run the model on a random input of shape {_shape(x.shape)} "
            f"({one_line(error)}); pass --input-shape with the shape the model takes, or --no-check"
        ) from None
    tensors = [t.detach().float().cpu() for t in output_tensors(output)]
    if not tensors:
        raise ModelFileError("the model's output holds no tensors to compare; pass --no-check")
    return tensors


def compare(
    reference: list[Tensor], converted: list[Tensor], input_shape: Sequence[int], tolerance: float
) -> CheckResult:
    """Largest absolute difference over all outputs, and relative to the largest reference magnitude."""
    if [t.shape for t in reference] != [t.shape for t in converted]:
        raise ModelFileError(
            "the converted model's outputs have other shapes than the original's; the conversion is broken"
        )
    diffs = torch.cat([(r.double() - c.double()).abs().flatten() for r, c in zip(reference, converted)])
    magnitudes = torch.cat([r.double().abs().flatten() for r in reference])
    max_abs = diffs.max().item() if diffs.numel() else 0.0  # NaN if any output is NaN: the check then fails
    scale = magnitudes.max().item() if magnitudes.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return CheckResult(tuple(input_shape), max_abs, max_rel, tolerance)


def output_tensors(output: object) -> Iterator[Tensor]:
    """Tensors in a (nested) tensor / tuple / list / dict output, in order (the order export flattens them in)."""
    if isinstance(output, Tensor):
        yield output
    elif isinstance(output, dict):
        for value in output.values():
            yield from output_tensors(value)
    elif isinstance(output, (list, tuple)):
        for value in output:
            yield from output_tensors(value)


def _shape(shape: Sequence[int]) -> str:
    return ",".join(str(s) for s in shape)
