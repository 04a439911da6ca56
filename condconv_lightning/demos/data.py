"""A synthetic image classification task on which conditional kernels pay off.

Every image carries two gratings (stripes with one of ``num_classes`` orientations,
random frequency and phase), one in the red and one in the blue channel, under a
global colour cast, warm or cool, plus noise. The cast says which grating counts: the
class is the orientation of the red grating in warm images and of the blue grating in
cool ones; the other grating is a distractor of independent orientation. So the right
filter depends on a global property of the image, the situation CondConv targets
(Yang et al., NeurIPS 2019, arXiv:1904.04971): its router sees exactly such global
statistics (the average-pooled input) and can pick different kernels per image.
:func:`make_multicontext_gratings` is a harder variant with more contexts, in which the
same orientation stands for a different class in every context. Generated in memory
from a seed: no downloads.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

__all__ = [
    "EpochShuffleSampler",
    "ResumableDataLoader",
    "SyntheticImageDataModule",
    "make_context_gratings",
    "make_multicontext_gratings",
]

# Colour cast per context (R, G, B offsets), visible to a global average pool, and the
# channel whose grating decides the class in that context.
_CASTS = torch.tensor([[0.6, 0.0, -0.6], [-0.6, 0.0, 0.6]])
_SIGNAL_CHANNEL = (0, 2)


def _gratings(orientation: Tensor, num_classes: int, image_size: int, generator: torch.Generator | None) -> Tensor:
    """Unit-amplitude gratings ``[N, S, S]`` at angles ``pi * orientation / num_classes``, 3-5 cycles per image."""
    frequency = 3.0 + 2.0 * torch.rand(len(orientation), generator=generator, dtype=torch.float64)
    phase = 2 * math.pi * torch.rand(len(orientation), generator=generator, dtype=torch.float64)
    angle = math.pi * orientation.double() / num_classes
    grid = torch.linspace(0.0, 1.0, image_size, dtype=torch.float64)
    v, u = torch.meshgrid(grid, grid, indexing="ij")
    position = u * angle.cos()[:, None, None] + v * angle.sin()[:, None, None]
    return torch.sin(2 * math.pi * frequency[:, None, None] * position + phase[:, None, None]).float()


def _draw_codes(
    num_samples: int, num_classes: int, num_contexts: int, image_size: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Check the sizes, then draw labels, distractor orientations and contexts (in this order), each ``[N]``."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if num_contexts < 1:
        raise ValueError(f"num_contexts must be a positive integer, got {num_contexts}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels to hold a grating, got {image_size}")
    labels = torch.randint(num_classes, (num_samples,), generator=generator)
    distractor = torch.randint(num_classes, (num_samples,), generator=generator)
    return labels, distractor, torch.randint(num_contexts, (num_samples,), generator=generator)


def make_context_gratings(
    num_samples: int,
    num_classes: int = 4,
    image_size: int = 32,
    noise: float = 0.3,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Draw images ``[N, 3, S, S]``, labels, contexts and distractor orientations (each ``[N]``).

    ``context`` 0 (warm cast): the label is the red grating's orientation; 1 (cool
    cast): the blue grating's. The other of the two channels holds a grating with the
    distractor orientation, drawn independently of the label.
    """
    labels, distractor, context = _draw_codes(num_samples, num_classes, 2, image_size, generator)
    signal = _gratings(labels, num_classes, image_size, generator)
    other = _gratings(distractor, num_classes, image_size, generator)
    warm = (context == 0)[:, None, None]
    images = 0.5 * torch.stack(
        [torch.where(warm, signal, other), torch.zeros_like(signal), torch.where(warm, other, signal)], dim=1
    )
    images = images + _CASTS[context][:, :, None, None] + noise * torch.randn(images.shape, generator=generator)
    return images, labels, context, distractor


def multicontext_casts(num_contexts: int) -> Tensor:
    """``[num_contexts, 3]`` colour casts of amplitude 0.6, evenly spaced around the gray axis (zero mean colour).

    Two contexts give the warm/cool pair of :func:`make_context_gratings` (``_CASTS`` up to rounding).
    """
    angle = 2 * math.pi * torch.arange(num_contexts, dtype=torch.float64) / num_contexts
    first = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64) / math.sqrt(2)
    second = torch.tensor([-1.0, 2.0, -1.0], dtype=torch.float64) / math.sqrt(6)
    return (0.6 * math.sqrt(2) * (angle.cos()[:, None] * first + angle.sin()[:, None] * second)).float()


def make_multicontext_gratings(
    num_samples: int,
    num_classes: int = 4,
    num_contexts: int = 4,
    image_size: int = 16,
    noise: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A harder context task: images ``[N, 3, S, S]``, labels, contexts and distractor orientations (each ``[N]``).

    Context ``c`` has a colour cast of its own (:func:`multicontext_casts`), a signal channel of its own
    (``c mod 3``; the distractor grating is in the next channel) and an orientation code of its own: class ``y``
    is drawn as the grating at orientation ``(y + c) mod num_classes``. The same orientation thus stands for a
    different class in different contexts (and contexts ``c`` and ``c + 3`` share a channel), so no single set of
    kernels reads the class from local evidence alone; a kernel chosen by the global cast (what a CondConv router
    sees) can. With ``num_contexts=num_classes`` each orientation stands for every class in some context.
    """
    labels, distractor, context = _draw_codes(num_samples, num_classes, num_contexts, image_size, generator)
    signal = _gratings((labels + context) % num_classes, num_classes, image_size, generator)
    other = _gratings(distractor, num_classes, image_size, generator)
    rows = torch.arange(num_samples)
    images = torch.zeros(num_samples, 3, image_size, image_size)
    images[rows, context % 3] = 0.5 * signal
    images[rows, (context + 1) % 3] = 0.5 * other
    images = images + multicontext_casts(num_contexts)[context][:, :, None, None]
    images = images + noise * torch.randn(images.shape, generator=generator)
    return images, labels, context, distractor


class EpochShuffleSampler(DistributedSampler):
    """A permutation seeded by ``seed + epoch`` (DistributedSampler's), sharded by rank, that can start mid-epoch.

    The order depends on the epoch only, not on how often the loader was built, so a resumed run sees the order an
    uninterrupted one would. Being a DistributedSampler, Lightning keeps it under DDP instead of substituting its
    own; each rank takes every ``num_replicas``-th index, so a step's batches across ranks are a contiguous block of
    the permutation. ``start`` skips the first indices of this rank's share (samples an interrupted run consumed).
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)


class ResumableDataLoader(DataLoader):
    """A DataLoader over an :class:`EpochShuffleSampler` whose position survives a restart.

    Lightning saves ``state_dict()`` of every training DataLoader that has one with the fit loop's state and, on a
    mid-epoch resume, passes it to ``load_state_dict()`` before iterating; it calls the sampler's ``set_epoch`` at
    every epoch start. The state is the epoch and the batches already yielded in it: a resume within that epoch
    skips them (by index, without loading them), one in a later epoch starts it from the beginning.
    """

    sampler: EpochShuffleSampler

    def __init__(self, dataset: Dataset, batch_size: int, sampler: EpochShuffleSampler, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size, sampler=sampler, drop_last=True, **kwargs)
        self._epoch = sampler.epoch
        self._batches = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._epoch, self._batches = state_dict["epoch"], state_dict["batches"]
        self.sampler.set_epoch(self._epoch)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # A generator: the sampler is read at the first batch, after Lightning's set_epoch, even though Lightning
        # calls iter() before it on resume (worker processes would draw indices inside iter()).
        if self.sampler.epoch != self._epoch:
            self._epoch, self._batches = self.sampler.epoch, 0
        self.sampler.start = self._batches * self.batch_size
        for batch in super().__iter__():
            self._batches += 1
            yield batch
        self._batches = 0  # a complete pass: iterating again (without set_epoch) repeats the epoch from its start


class SyntheticImageDataModule(pl.LightningDataModule):
    """Context-dependent gratings (:func:`make_context_gratings`) for training and validation.

    Args:
        num_classes: number of classes (and of orientations).
        image_size: height and width of the images.
        train_size: number of training images.
        val_size: number of validation images.
        batch_size: per-process batch size.
        noise: standard deviation of the Gaussian pixel noise.
        seed: seed of the generator; the same seed gives the same data on every process. The training order
            is a permutation seeded by ``seed`` and the epoch (:class:`EpochShuffleSampler`), sharded across DDP
            processes by this module itself, and resumes where a checkpoint left it (:class:`ResumableDataLoader`).
        num_workers: DataLoader worker processes; None (the default) runs none, as the data is in
            memory. None rather than 0, so that a command line that swaps in another data module
            (``--data ImageFolderDataModule``) carries no worker count over and that module picks its own.

    Examples:

        >>> data = SyntheticImageDataModule(train_size=64, val_size=16, batch_size=8)
        >>> data.setup("fit")
        >>> images, labels = next(iter(data.train_dataloader()))
        >>> tuple(images.shape), tuple(labels.shape)
        ((8, 3, 32, 32), (8,))
    """

    def __init__(
        self,
        num_classes: int = 4,
        image_size: int = 32,
        train_size: int = 2048,
        val_size: int = 512,
        batch_size: int = 64,
        noise: float = 0.3,
        seed: int = 0,
        num_workers: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("train_size", train_size), ("val_size", val_size), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.image_size = image_size
        self.train_size = train_size
        self.val_size = val_size
        self.batch_size = batch_size
        self.noise = noise
        self.seed = seed
        self.num_workers = 0 if num_workers is None else num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    @property
    def input_size(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images (read by ``CondConvConversion`` for its report)."""
        return (3, self.image_size, self.image_size)

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        generator = torch.Generator().manual_seed(self.seed)
        splits = []
        for size in (self.train_size, self.val_size):
            images, labels, _, _ = make_context_gratings(size, self.num_classes, self.image_size, self.noise, generator)
            splits.append(TensorDataset(images, labels))
        self.train_set, self.val_set = splits

    def train_dataloader(self) -> ResumableDataLoader:
        shards = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        sampler = EpochShuffleSampler(self.train_set, seed=self.seed, **(shards or {}))
        return ResumableDataLoader(self.train_set, self.batch_size, sampler, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, num_workers=self.num_workers)
