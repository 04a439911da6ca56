"""Fine-tune on a folder of your own images: one subfolder per class, no code.

The layout, class indexing and file types are torchvision's ``ImageFolder``'s (the field's standard): class
names are the sorted subfolder names, a class's index is its position in that list, and every file below a class
folder whose name ends in one of torchvision's image extensions is one sample. The transforms are
``torchvision.transforms.v2`` where torchvision imports (its ImageNet recipe, or the user's own callables); where
it does not (the torch 2.13 CPU build has no torchvision), a minimal equivalent of the validation recipe, written
with Pillow and torch, serves training and validation alike.

Every file in the folder is untrusted, and none can stall or exhaust the run: directories are walked without
entering one twice (a link loop ends), a file reached by two paths is one image, only regular files are opened
(never a FIFO or a device), and each image's header (format and size) is checked in ``setup`` before anything
is decoded, so an image whose decode or resize would take unbounded memory, an empty file or a file that is no
image is reported before training (or skipped, by ``bad_images``), never found by a traceback mid-training.
"""

from __future__ import annotations

import os
import random
import stat
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn, suggested_max_num_workers
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..demos.data import EpochShuffleSampler, ResumableDataLoader

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_ASPECT_RATIO",
    "MAX_IMAGE_PIXELS",
    "BadImageError",
    "DataFolderError",
    "ImageFolderDataModule",
    "ImageFolderDataset",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""File name endings read as images, compared case-insensitively: ``torchvision.datasets.folder.IMG_EXTENSIONS``."""

IMAGE_FORMATS = ("JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP")
"""The Pillow decoders a file may use: those of :data:`IMAGE_EXTENSIONS` (JPEG includes a camera's multi-picture
JPEG). A file that holds another format, whatever its name, is a bad image: no other decoder ever runs."""

MAX_IMAGE_PIXELS = 2**26
"""Largest width x height decoded (8192 x 8192; a 48-megapixel photo fits): about 200 MB as 8-bit RGB."""

MAX_ASPECT_RATIO = 32
"""Largest ratio of the longer side to the shorter. Resizing the shorter side to ``image_size * 256 / 224`` (the
validation recipe) makes an image of ratio ``r`` that many pixels times ``r``; the bound keeps it within
``3 * 32 * (image_size * 256 / 224) ** 2`` bytes (6.3 MB at 224)."""

BAD_IMAGES_NAMED = 5
"""How many bad files a message names before it gives the count of the rest."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[Image.Image], Any]
"""A PIL image (RGB) -> what the model gets (a ``[3, H, W]`` tensor for the built-in network), as torchvision's."""


class DataFolderError(ValueError):
    """The image folder cannot serve this run (no images in a class, nothing held out, bad images): one line
    saying what to change. Raised while the Trainer sets the data up, so ``condconv-finetune`` reports it as a
    usage error."""


class BadImageError(DataFolderError):
    """One file that cannot be used as an image; ``path`` and ``reason`` (for example ``empty file``) say which
    and why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path} cannot be used as an image ({reason}): remove or replace it")
        self.path, self.reason = path, reason


def find_classes(folder: Path) -> list[str]:
    """Sorted names of the class subfolders of ``folder`` (hidden folders, such as ``.ipynb_checkpoints``, skipped)."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk(top: Path, seen_directories: set[tuple[int, int]]) -> Iterator[tuple[str, os.stat_result | str]]:
    """``(path, stat)`` of every image-named entry below ``top`` in sorted order (a directory's files, then its
    subdirectories), or ``(path, reason)`` where it cannot be read.

    Links are followed, to directories too, but no directory is entered twice (by device and inode, across the
    calls that share ``seen_directories``): a link loop ends, and a folder linked from two places is walked once.
    Hidden entries (names starting with ``.``, such as ``._photo.jpg`` resource forks) are skipped.
    """
    info = os.stat(top)
    seen_directories.add((info.st_dev, info.st_ino))
    stack = [str(top)]
    while stack:
        directory = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as error:
            message = f"cannot list {directory} ({error.strerror}): make it readable or remove it"
            raise DataFolderError(message) from None
        subdirectories = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                info = entry.stat()  # follows links
            except OSError as error:
                if _is_image_name(entry.name):
                    yield entry.path, f"cannot be read: {error.strerror}"
                continue
            if stat.S_ISDIR(info.st_mode):
                if (info.st_dev, info.st_ino) not in seen_directories:
                    seen_directories.add((info.st_dev, info.st_ino))
                    subdirectories.append(entry.path)
            elif _is_image_name(entry.name):
                yield entry.path, info
        stack += reversed(subdirectories)


@contextmanager
def open_image(path: str) -> Iterator[Image.Image]:
    """The image at ``path``, opened lazily (its header read, nothing decoded), or :class:`BadImageError`.

    Refused before any pixel is decoded: what is not a regular file (a FIFO, a device: never opened, and opened
    non-blocking so that one swapped in after the check cannot stall the read), an empty file, a file no decoder
    of :data:`IMAGE_FORMATS` recognizes, and an image beyond :data:`MAX_IMAGE_PIXELS` or :data:`MAX_ASPECT_RATIO`.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise BadImageError(path, "not a regular file")
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise BadImageError(path, f"cannot be read: {error.strerror}") from None
    with os.fdopen(descriptor, "rb") as file:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise BadImageError(path, "not a regular file")
        if info.st_size == 0:
            raise BadImageError(path, "empty file")
        try:
            image = Image.open(file, formats=IMAGE_FORMATS)
        except Image.UnidentifiedImageError:
            raise BadImageError(path, "not a JPEG, PNG, PPM, BMP, TIFF or WebP image") from None
        except Image.DecompressionBombError:  # Pillow's own bound, above this module's
            raise BadImageError(path, f"more than {MAX_IMAGE_PIXELS} pixels") from None
        except Exception as error:  # Pillow's decoders raise many types on malformed headers
            raise BadImageError(path, f"damaged header: {_first_line(error)}") from None
        with image:
            width, height = image.size
            if min(width, height) < 1:
                raise BadImageError(path, f"{width} x {height} pixels")
            if width * height > MAX_IMAGE_PIXELS:
                raise BadImageError(path, f"{width} x {height} pixels, more than {MAX_IMAGE_PIXELS}")
            if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
                raise BadImageError(path, f"{width} x {height} pixels, an aspect ratio above {MAX_ASPECT_RATIO}")
            yield image


def image_problem(path: str) -> str | None:
    """Why ``path`` cannot be used as an image, from its header alone (cheap: nothing is decoded); None if it can."""
    try:
        with open_image(path):
            return None
    except BadImageError as error:
        return error.reason


def load_image(path: str) -> Image.Image:
    """The image at ``path`` decoded as RGB (checked first by :func:`open_image`), or :class:`BadImageError`."""
    with open_image(path) as image:
        try:
            return image.convert("RGB")
        except Exception as error:  # truncated or corrupt data behind a valid header
            raise BadImageError(path, f"cannot be decoded: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _named(bad: Sequence[tuple[str, str]]) -> str:
    """The first :data:`BAD_IMAGES_NAMED` of ``(path, reason)`` as ``path (reason)``, then a count of the rest."""
    named = [f"{path} ({reason})" for path, reason in bad[:BAD_IMAGES_NAMED]]
    more = len(bad) - len(named)
    return ", ".join(named) + (f" and {more} more" if more else "")


def _files(count: int) -> str:
    return f"{count} file" if count == 1 else f"{count} files"


class _Listing:
    """The images of one or more folders, each file once, its header checked; what could not be used, with why."""

    def __init__(self) -> None:
        self.seen_directories: set[tuple[int, int]] = set()
        self.seen_files: set[tuple[int, int]] = set()
        self.bad: list[tuple[str, str]] = []
        self.duplicates = 0

    def samples(self, folder: Path, classes: Sequence[str]) -> list[tuple[str, int]]:
        """``(path, class index)`` of the usable images below each class folder, in sorted order."""
        found: list[tuple[str, int]] = []
        for index, name in enumerate(classes):
            for path, info in _walk(folder / name, self.seen_directories):
                if isinstance(info, str):
                    self.bad.append((path, info))
                elif (info.st_dev, info.st_ino) in self.seen_files:
                    self.duplicates += 1
                else:
                    self.seen_files.add((info.st_dev, info.st_ino))
                    found.append((path, index))
        with ThreadPoolExecutor(max_workers=8) as pool:  # reading headers waits on the disk, not the CPU
            problems = list(pool.map(image_problem, [path for path, _ in found]))
        self.bad += [(path, problem) for (path, _), problem in zip(found, problems) if problem is not None]
        return [sample for sample, problem in zip(found, problems) if problem is None]


def _require_every_class(folder: Path, classes: Sequence[str], samples: Sequence[tuple[str, int]]) -> None:
    present = {label for _, label in samples}
    for index, name in enumerate(classes):
        if index not in present:
            raise DataFolderError(
                f"class folder {folder / name} has no usable images ({', '.join(IMAGE_EXTENSIONS)}): add some or "
                "remove the folder"
            )


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed per (seed, epoch, sample): mixed, so that no two triples of small numbers share one."""
    return ((((seed * 0x9E3779B1) ^ epoch) * 0x85EBCA77) ^ index) * 0xC2B2AE3D % (2**63)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """torch's CPU generator and Python's ``random`` seeded by ``seed`` inside the block, both restored after."""
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)


def torchvision_transforms() -> ModuleType | None:
    """``torchvision.transforms.v2``, or None where torchvision does not import (not installed, or built for
    another torch)."""
    try:
        from torchvision.transforms import v2
    except Exception:  # a torchvision for another torch fails in its own import, with various errors
        return None
    return v2


def _to_tensor(image: Image.Image, mean: Tensor, std: Tensor) -> Tensor:
    """``ToTensor`` (``[3, H, W]`` float in [0, 1]) followed by ``Normalize(mean, std)``, in torchvision's
    arithmetic (times 1/255, minus mean, over std), so that both paths give the same bits."""
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)
    return pixels.permute(2, 0, 1).float().mul_(1 / 255).sub_(mean[:, None, None]).div_(std[:, None, None])


class ResizeCenterCrop:
    """``Resize(resize)`` of the shorter side, ``CenterCrop(size)``, ``ToTensor()``, ``Normalize(mean, std)``.

    torchvision's validation recipe with its sizes and rounding (the same pixels), for where torchvision does
    not import.
    """

    def __init__(self, size: int, resize: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size, self.resize = size, resize
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)

    def __call__(self, image: Image.Image) -> Tensor:
        width, height = image.size
        if width <= height:
            width, height = self.resize, int(self.resize * height / width)
        else:
            width, height = int(self.resize * width / height), self.resize
        image = image.resize((width, height), Image.Resampling.BILINEAR)
        top, left = round((height - self.size) / 2), round((width - self.size) / 2)
        image = image.crop((left, top, left + self.size, top + self.size))
        return _to_tensor(image, self.mean, self.std)


def default_transforms(image_size: int, mean: Sequence[float], std: Sequence[float]) -> tuple[Transform, Transform]:
    """``(train, val)``: torchvision's ImageNet recipe where torchvision imports, else :class:`ResizeCenterCrop`
    for both.

    Training: ``RandomResizedCrop(image_size)`` (scale 0.08-1, ratio 3/4-4/3) and ``RandomHorizontalFlip()``;
    validation: ``Resize(round(image_size * 256 / 224))`` and ``CenterCrop(image_size)``; both end in
    ``PILToTensor``, ``ToDtype(float32, scale=True)`` and ``Normalize(mean, std)``, as torchvision's
    classification references do.
    """
    resize = round(image_size * 256 / 224)
    v2 = torchvision_transforms()
    if v2 is None:
        fallback = ResizeCenterCrop(image_size, resize, mean, std)
        return fallback, fallback
    to_tensor = [
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
        v2.ToPureTensor(),
    ]
    train = v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip(), *to_tensor])
    val = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(image_size), *to_tensor])
    return train, val


class ImageFolderDataset(Dataset):
    """``(transform(image), class index)`` samples, the image read from disk in ``__getitem__`` (lazily) as RGB.

    The transform runs with torch's CPU generator and Python's ``random`` seeded by ``seed``, ``epoch`` and the
    sample's index (both restored after), so a random transform (torchvision's, or your own drawing from either)
    augments a sample the same way in every run, with any number of workers and on resume; the training
    sampler advances ``epoch``.

    A file that passed the header check but cannot be decoded (truncated data) raises :class:`BadImageError`
    from ``__getitem__``; in a batch (``__getitems__``, what the DataLoader calls) it is left out with a warning
    naming it, so one damaged file does not end the run.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Transform, seed: int = 0) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = load_image(path)
        with _seeded(_sample_seed(self.seed, self.epoch, index)):
            return self.transform(image), label

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, int]]:
        """The samples of a batch, without those whose image cannot be decoded (each named in a warning)."""
        samples, failed = [], []
        for index in indices:
            try:
                samples.append(self[index])
            except BadImageError as error:
                failed.append(error)
        if not samples:
            named = _named([(error.path, error.reason) for error in failed])
            raise DataFolderError(f"no image of a batch can be decoded: {named}; remove or replace them")
        for error in failed:
            warnings.warn(f"left {error.path} out of its batch: {error.reason}", stacklevel=2)
        return samples


class _EpochSampler(EpochShuffleSampler):
    """:class:`EpochShuffleSampler` that also tells its dataset the epoch (Lightning calls ``set_epoch``)."""

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.dataset.epoch = epoch


class ImageFolderDataModule(pl.LightningDataModule):
    """Your own images, one subfolder per class (torchvision's ``ImageFolder`` layout, extensions and indices).

    ``root`` holds either the class folders (``root/<class>/*.png``), of which a seeded, stratified
    ``val_split`` is held out for validation, or ``train/`` and ``val/`` folders with the same class folders
    each. Files ending in one of :data:`IMAGE_EXTENSIONS` (any case) are images, in subfolders too; hidden files
    and folders (names starting with ``.``) are skipped; links are followed, but no folder is walked twice and a
    file reached by two paths is one image. Images are read when a batch needs them.

    ``setup`` checks every image's header (cheap: nothing is decoded). A file that is empty, not an image, not a
    regular file, or larger than :data:`MAX_IMAGE_PIXELS` or :data:`MAX_ASPECT_RATIO` allows is a bad image:
    ``bad_images="error"`` stops there with one line naming the files, ``"skip"`` leaves them out with a
    warning. A file whose data turns out damaged when it is read (truncated behind a valid header) is left out
    of its batch with a warning naming it.

    Args:
        root: the image folder.
        val_split: fraction of each class held out for validation, unless ``root`` has ``train/`` and ``val/``
            (rounded per class; every class keeps at least one training image).
        image_size: height and width of the images the model sees (of the default transforms).
        batch_size: per-process batch size. The last incomplete training batch is dropped; with fewer training
            images per process than ``batch_size``, a batch holds them all (a warning says so).
        num_workers: DataLoader worker processes; None: ``min(4, cpus per process - 1)``, at least 1 (Lightning's
            ``suggested_max_num_workers``, so that it warns of none).
        pin_memory: pin batches in page-locked memory; None means when CUDA is available.
        mean: per-channel mean of ``Normalize`` (ImageNet's by default, as pretrained networks expect).
        std: per-channel standard deviation of ``Normalize``.
        seed: seeds the split, the training order (a permutation per epoch, :class:`EpochShuffleSampler`) and
            each sample's augmentation (torch's and Python's generators, per sample and epoch), independently of
            the global RNG, of ``seed_everything`` and of the number of workers. Training resumes where a
            checkpoint left it.
        train_transform: PIL image -> model input for training images, such as a ``torchvision.transforms.v2``
            pipeline (YAML: ``class_path: torchvision.transforms.v2.Compose`` with ``init_args``). None:
            torchvision's ImageNet recipe (:func:`default_transforms`), without torchvision a resize and center
            crop (a warning says so).
        val_transform: the same for validation images; None: resize and center crop.
        bad_images: ``"error"`` (stop in ``setup``) or ``"skip"`` (leave them out with a warning).

    Raises:
        ValueError: at construction, a missing ``root``, no class folders, fewer than 2 classes, ``train/``
            and ``val/`` with different classes, a ``val_split`` outside (0, 1), or an unknown ``bad_images``;
            in ``setup`` (:class:`DataFolderError`), bad images, a class folder without usable images, a split
            that holds nothing out, or a model whose ``num_classes`` differs from the number of classes found.
    """

    def __init__(
        self,
        root: str | Path,
        val_split: float = 0.2,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        seed: int = 0,
        train_transform: Transform | None = None,
        val_transform: Transform | None = None,
        bad_images: Literal["error", "skip"] = "error",
    ) -> None:
        super().__init__()
        if not 0 < val_split < 1:
            raise ValueError(
                f"val_split must lie strictly between 0 and 1 (the fraction of images held out), got {val_split!r}"
            )
        for name, value in (("image_size", image_size), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"num_workers must be 0 or more (None: one per spare CPU, up to 4), got {num_workers!r}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each (R, G, B) and std above 0, got {mean!r}, {std!r}")
        if bad_images not in ("error", "skip"):
            raise ValueError(f"bad_images must be 'error' or 'skip', got {bad_images!r}")
        for name, transform in (("train_transform", train_transform), ("val_transform", val_transform)):
            if transform is not None and not callable(transform):
                raise ValueError(f"{name} must be callable (PIL image -> tensor) or None, got {transform!r}")
        root = str(root)  # hyperparameters in checkpoints must be plain values (a Path is not)
        self.save_hyperparameters(ignore=["train_transform", "val_transform"])  # objects, not plain values
        self.root = Path(root)
        self.val_split = val_split
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.mean, self.std = tuple(mean), tuple(std)
        self.seed = seed
        self.train_transform, self.val_transform = train_transform, val_transform
        self.bad_images = bad_images
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

    def _find_samples(self) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """Training and validation samples; bad images reported (``bad_images``), files reached twice used once."""
        listing = _Listing()
        folders = [self.root / "train", self.root / "val"] if self.has_val_folder else [self.root]
        found = [listing.samples(folder, self.classes) for folder in folders]
        bad = sorted((os.path.relpath(path, self.root), reason) for path, reason in listing.bad)
        if bad and self.bad_images == "error":
            raise DataFolderError(
                f"{_files(len(bad))} in {self.root} cannot be used as images: {_named(bad)}; remove or replace "
                "them, or pass bad_images='skip' (--data.bad_images skip) to leave them out"
            )
        if bad:
            rank_zero_warn(f"left out {_files(len(bad))} in {self.root} that cannot be used as images: {_named(bad)}")
        if listing.duplicates:
            rank_zero_warn(
                f"{_files(listing.duplicates)} in {self.root} reached by more than one path (links): each image is "
                "used once"
            )
        for folder, samples in zip(folders, found):
            _require_every_class(folder, self.classes, samples)
        return (found[0], found[1]) if self.has_val_folder else self._split(found[0])

    def setup(self, stage: str) -> None:
        if self.train_set is None:
            train, val = self._find_samples()
            default_train, default_val = default_transforms(self.image_size, self.mean, self.std)
            if self.train_transform is None and torchvision_transforms() is None:
                rank_zero_warn(
                    "torchvision does not import here: training images are resized and center-cropped, without "
                    "augmentation; install torchvision for its random resized crops and flips, or pass "
                    "train_transform"
                )
            self.train_set = ImageFolderDataset(train, self.train_transform or default_train, self.seed)
            self.val_set = ImageFolderDataset(val, self.val_transform or default_val, self.seed)
        model = self.trainer.lightning_module if self.trainer is not None else None
        outputs = getattr(model, "hparams", {}).get("num_classes")
        if isinstance(outputs, int) and outputs != self.num_classes:
            raise DataFolderError(
                f"{self.root} has {self.num_classes} classes but the model has num_classes={outputs}: "
                f"pass --model.num_classes {self.num_classes}"
            )

    def _workers(self) -> int:
        if self.num_workers is not None:
            return self.num_workers
        processes = self.trainer.num_devices if self.trainer is not None else 1
        return min(4, suggested_max_num_workers(processes))

    def train_dataloader(self) -> ResumableDataLoader:
        shards = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        sampler = _EpochSampler(self.train_set, seed=self.seed, **(shards or {}))
        if len(sampler) == 0:
            raise DataFolderError(
                f"{len(self.train_set)} training images cannot be shared among {sampler.num_replicas} processes: "
                "add images or use fewer processes"
            )
        batch_size = min(self.batch_size, len(sampler))
        if batch_size < self.batch_size:
            rank_zero_warn(
                f"{len(sampler)} training images per process is less than batch_size {self.batch_size}: each "
                f"training batch holds all {batch_size}; pass a batch_size of at most {batch_size} to silence this"
            )
        return ResumableDataLoader(
            self.train_set, batch_size, sampler, num_workers=self._workers(), pin_memory=self.pin_memory
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, num_workers=self._workers(), pin_memory=self.pin_memory)
