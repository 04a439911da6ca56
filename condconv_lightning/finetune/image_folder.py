"""Fine-tune on a folder of your own images: one subfolder per class, no code.

The layout and class indexing are torchvision's ``ImageFolder`` (the field's standard): class names are the
sorted subfolder names, a class's index is its position in that list, and every PNG or JPEG file below a class
folder is one sample. The transforms are torchvision's ImageNet recipe: for training ``RandomResizedCrop``
(scale 0.08-1, ratio 3/4-4/3) and a horizontal flip, for validation a resize of the shorter side to
``image_size * 256 / 224`` and a center crop; both end in ``ToTensor`` and ``Normalize``. They are written
with Pillow and torch here, so torchvision is not needed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..demos.data import EpochShuffleSampler, ResumableDataLoader

__all__ = ["IMAGE_EXTENSIONS", "DataFolderError", "ImageFolderDataModule", "ImageFolderDataset"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
"""File name endings read as images, compared case-insensitively."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[Image.Image, torch.Generator], Tensor]


def find_classes(folder: Path) -> list[str]:
    """Sorted names of the class subfolders of ``folder`` (hidden folders, such as ``.ipynb_checkpoints``, skipped)."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))


class DataFolderError(ValueError):
    """The image folder cannot serve this run (no images in a class, nothing held out, a batch larger than the
    data): one line saying what to change. Raised while the Trainer sets the data up, so ``condconv-finetune``
    reports it as a usage error."""


def find_samples(folder: Path, classes: Sequence[str]) -> list[tuple[str, int]]:
    """``(path, class index)`` for every image below each class folder, in sorted order, subfolders included."""
    samples: list[tuple[str, int]] = []
    for index, name in enumerate(classes):
        found = []
        for directory, subdirectories, files in os.walk(folder / name, followlinks=True):
            subdirectories.sort()
            found += [
                os.path.join(directory, file) for file in sorted(files) if file.lower().endswith(IMAGE_EXTENSIONS)
            ]
        if not found:
            raise DataFolderError(
                f"class folder {folder / name} has no PNG or JPEG images ({', '.join(IMAGE_EXTENSIONS)}): "
                "add some or remove the folder"
            )
        samples += [(path, index) for path in found]
    return samples


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed per (seed, epoch, sample): mixed, so that no two triples of small numbers share one."""
    return ((((seed * 0x9E3779B1) ^ epoch) * 0x85EBCA77) ^ index) * 0xC2B2AE3D % (2**63)


def _to_tensor(image: Image.Image, mean: Tensor, std: Tensor) -> Tensor:
    """``ToTensor`` (``[3, H, W]`` float in [0, 1]) followed by ``Normalize(mean, std)``."""
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)
    return (pixels.permute(2, 0, 1).float().div(255) - mean[:, None, None]) / std[:, None, None]


class TrainTransform:
    """``RandomResizedCrop(size, scale, ratio)``, ``RandomHorizontalFlip()``, ``ToTensor()``, ``Normalize(mean, std)``.

    The crop follows torchvision's sampling: up to 10 draws of an area fraction (uniform in ``scale``) and an
    aspect ratio (log-uniform in ``ratio``) until the box fits, else the largest central box within ``ratio``.
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        self.size, self.scale, self.ratio = size, scale, ratio
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)

    def crop_box(self, width: int, height: int, generator: torch.Generator) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` of the random crop."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            draws = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * draws[0])
            aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draws[1])
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(height - h + 1, (1,), generator=generator))
                left = int(torch.randint(width - w + 1, (1,), generator=generator))
                return left, top, left + w, top + h
        aspect = width / height
        if aspect < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif aspect > max(self.ratio):
            w, h = round(height * max(self.ratio)), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, image: Image.Image, generator: torch.Generator) -> Tensor:
        box = self.crop_box(image.width, image.height, generator)
        image = image.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)
        if torch.rand(1, generator=generator).item() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _to_tensor(image, self.mean, self.std)


class ValTransform:
    """``Resize(round(size * 256 / 224))`` (the shorter side), ``CenterCrop(size)``, ``ToTensor()``, ``Normalize``."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size, self.resize = size, round(size * 256 / 224)
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> Tensor:
        width, height = image.size
        if width <= height:
            width, height = self.resize, int(self.resize * height / width)
        else:
            width, height = int(self.resize * width / height), self.resize
        image = image.resize((width, height), Image.Resampling.BILINEAR)
        top, left = round((height - self.size) / 2), round((width - self.size) / 2)
        image = image.crop((left, top, left + self.size, top + self.size))
        return _to_tensor(image, self.mean, self.std)


class ImageFolderDataset(Dataset):
    """``(image, class index)`` samples read from disk in ``__getitem__`` (lazily) and converted to RGB.

    A random ``transform`` draws from a generator seeded by ``seed``, ``epoch`` and the sample's index, so a
    sample's augmentation is the same in every run, with any number of workers and on resume; the training
    sampler advances ``epoch``.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Transform, seed: int = 0) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as file:
            image = file.convert("RGB")
        generator = torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, index))
        return self.transform(image, generator), label


class _EpochSampler(EpochShuffleSampler):
    """:class:`EpochShuffleSampler` that also tells its dataset the epoch (Lightning calls ``set_epoch``)."""

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.dataset.epoch = epoch


class ImageFolderDataModule(pl.LightningDataModule):
    """Your own images, one subfolder per class (torchvision's ``ImageFolder`` layout and class indices).

    ``root`` holds either the class folders (``root/<class>/*.png``), of which a seeded, stratified
    ``val_split`` is held out for validation, or ``train/`` and ``val/`` folders with the same class folders
    each. PNG and JPEG files (any case of ``.png``, ``.jpg``, ``.jpeg``) are read when a batch needs them.

    Args:
        root: the image folder.
        val_split: fraction of each class held out for validation, unless ``root`` has ``train/`` and ``val/``
            (rounded per class; every class keeps at least one training image).
        image_size: height and width of the images the model sees.
        batch_size: per-process batch size (the last incomplete training batch is dropped).
        num_workers: DataLoader worker processes.
        pin_memory: pin batches in page-locked memory; None means when CUDA is available.
        mean: per-channel mean of ``Normalize`` (ImageNet's by default, as pretrained networks expect).
        std: per-channel standard deviation of ``Normalize``.
        seed: seeds the split, the training order (a permutation per epoch, :class:`EpochShuffleSampler`) and
            each sample's augmentation (a generator per sample and epoch), independently of the global RNG, of
            ``seed_everything`` and of the number of workers. Training resumes where a checkpoint left it.

    Raises:
        ValueError: at construction, a missing ``root``, no class folders, fewer than 2 classes, ``train/``
            and ``val/`` with different classes, or a ``val_split`` outside (0, 1); in ``setup``, a class
            folder without images, fewer training images than ``batch_size``, or a model whose
            ``num_classes`` differs from the number of classes found.
    """

    def __init__(
        self,
        root: str | Path,
        val_split: float = 0.2,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0 < val_split < 1:
            raise ValueError(
                f"val_split must lie strictly between 0 and 1 (the fraction of images held out), got {val_split!r}"
            )
        for name, value in (("image_size", image_size), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each (R, G, B) and std above 0, got {mean!r}, {std!r}")
        root = str(root)  # hyperparameters in checkpoints must be plain values (a Path is not)
        self.save_hyperparameters()
        self.root = Path(root)
        self.val_split = val_split
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.mean, self.std = tuple(mean), tuple(std)
        self.seed = seed
        if not self.root.is_dir():
            raise ValueError(
                f"image folder {self.root} does not exist: pass a folder with one subfolder of images per class"
            )
        train_dir, val_dir = self.root / "train", self.root / "val"
        self.has_val_folder = train_dir.is_dir() and val_dir.is_dir()
        self.classes = self._classes(train_dir if self.has_val_folder else self.root)
        if self.has_val_folder and (val_classes := self._classes(val_dir)) != self.classes:
            raise ValueError(
                f"{val_dir} has classes {val_classes} but {train_dir} has {self.classes}: give both the same class "
                "folders"
            )
        self.train_set: ImageFolderDataset | None = None
        self.val_set: ImageFolderDataset | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes: the class folders found when the module was created."""
        return len(self.classes)

    @property
    def input_size(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images the model sees (read by ``CondConvConversion`` for its report)."""
        return (3, self.image_size, self.image_size)

    @property
    def class_to_idx(self) -> dict[str, int]:
        """Class name -> index, as torchvision's ``ImageFolder.class_to_idx``."""
        return {name: index for index, name in enumerate(self.classes)}

    def _classes(self, folder: Path) -> list[str]:
        classes = find_classes(folder)
        if not classes:
            raise ValueError(
                f"{folder} has no class folders: put the images of each class in a subfolder named after the class "
                f"({folder}/<class>/*.png)"
            )
        if len(classes) < 2:
            raise ValueError(f"{folder} has one class folder ({classes[0]}); a classifier needs at least 2: add more")
        return classes

    def _split(self, samples: list[tuple[str, int]]) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """Hold out ``val_split`` of each class, chosen by a permutation seeded by ``seed``."""
        generator = torch.Generator().manual_seed(self.seed)
        train: list[tuple[str, int]] = []
        val: list[tuple[str, int]] = []
        for index in range(len(self.classes)):
            members = [sample for sample in samples if sample[1] == index]
            order = torch.randperm(len(members), generator=generator).tolist()
            held_out = min(round(len(members) * self.val_split), len(members) - 1)
            val += [members[i] for i in sorted(order[:held_out])]
            train += [members[i] for i in sorted(order[held_out:])]
        if not val:
            raise DataFolderError(
                f"val_split {self.val_split} of {len(samples)} images holds none out: raise val_split or add images"
            )
        return train, val

    def setup(self, stage: str) -> None:
        if self.train_set is None:
            if self.has_val_folder:
                train = find_samples(self.root / "train", self.classes)
                val = find_samples(self.root / "val", self.classes)
            else:
                train, val = self._split(find_samples(self.root, self.classes))
            self.train_set = ImageFolderDataset(train, TrainTransform(self.image_size, self.mean, self.std), self.seed)
            self.val_set = ImageFolderDataset(val, ValTransform(self.image_size, self.mean, self.std), self.seed)
        model = self.trainer.lightning_module if self.trainer is not None else None
        outputs = getattr(model, "hparams", {}).get("num_classes")
        if isinstance(outputs, int) and outputs != self.num_classes:
            raise DataFolderError(
                f"{self.root} has {self.num_classes} classes but the model has num_classes={outputs}: "
                f"pass --model.num_classes {self.num_classes}"
            )

    def train_dataloader(self) -> ResumableDataLoader:
        shards = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        sampler = _EpochSampler(self.train_set, seed=self.seed, **(shards or {}))
        if len(sampler) < self.batch_size:
            raise DataFolderError(
                f"{len(sampler)} training images per process is less than batch_size {self.batch_size}: "
                "lower batch_size or add images"
            )
        return ResumableDataLoader(
            self.train_set, self.batch_size, sampler, num_workers=self.num_workers, pin_memory=self.pin_memory
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory)
