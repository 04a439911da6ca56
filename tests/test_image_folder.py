"""ImageFolderDataModule on real image files: classes, split, transforms, determinism, hostile folders, the CLI."""

from __future__ import annotations

import csv
import os
import random
import re
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import suggested_max_num_workers
from peak_memory import PRELUDE
from PIL import Image

from condconv_lightning.finetune import ImageClassifier, ImageFolderDataModule, image_folder
from condconv_lightning.finetune.image_folder import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_ASPECT_RATIO,
    MAX_IMAGE_PIXELS,
    BadImageError,
    DataFolderError,
    ResizeCenterCrop,
    default_transforms,
)

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"blue": (0, 0, 255), "green": (0, 200, 0), "red": (255, 0, 0)}


def make_images(folder: Path, per_class: int = 6, classes: dict[str, tuple[int, int, int]] = COLOURS) -> Path:
    """``per_class`` 40x30 images per class, alternating PNG and upper-case JPEG, of one colour per class."""
    for name, colour in classes.items():
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            image = Image.new("RGB", (40, 30), colour)
            image.putpixel((i, i), (128, 128, 128))  # distinct files
            image.save(
                folder / name / (f"{i}.png" if i % 2 == 0 else f"{i}.JPG"), format=None if i % 2 == 0 else "JPEG"
            )
    return folder


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB pixels but holds almost none: its header is all it says."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def truncated_png(path: Path) -> None:
    """A PNG whose header reads fine but whose pixel data stops halfway."""
    image = Image.new("RGB", (40, 30))
    for i in range(30):
        image.putpixel((i, i), (255, i * 8, 0))
    image.save(path, format="PNG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def samples(data: ImageFolderDataModule) -> tuple[list[str], list[str]]:
    return [path for path, _ in data.train_set.samples], [path for path, _ in data.val_set.samples]


def identities(paths: list[str]) -> set[tuple[int, int]]:
    return {(os.stat(path).st_dev, os.stat(path).st_ino) for path in paths}


class RandomShift:
    """A transform of your own drawing from torch's and Python's generators: the val recipe plus a random offset."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        tensor = ResizeCenterCrop(16, 18, IMAGENET_MEAN, IMAGENET_STD)(image)
        return tensor + torch.rand(1) + random.random()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_images(tmp_path / "images")


@pytest.fixture
def no_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on the torch 2.13 build, where torchvision does not import."""
    monkeypatch.setattr(image_folder, "torchvision_transforms", lambda: None)


def test_classes_split_and_batches(root: Path) -> None:
    (root / "red" / "notes.txt").write_text("not an image")
    (root / "red" / "._0.png").write_bytes(b"\0\5\26\7")  # a resource fork: hidden, skipped
    data = ImageFolderDataModule(root, val_split=0.34, image_size=24, batch_size=4, num_workers=0)
    data.setup("fit")
    assert data.classes == ["blue", "green", "red"] and data.num_classes == 3
    assert data.class_to_idx == {"blue": 0, "green": 1, "red": 2}
    assert (len(data.train_set), len(data.val_set)) == (12, 6)  # round(6 * 0.34) = 2 per class held out
    assert sorted(label for _, label in data.val_set.samples) == [0, 0, 1, 1, 2, 2]
    assert not set(samples(data)[0]) & set(samples(data)[1])
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 24, 24) and images.dtype == torch.float32 and type(images) is torch.Tensor
    assert labels.shape == (4,) and labels.dtype == torch.int64
    assert len(data.train_dataloader()) == 3
    images, labels = next(iter(data.val_dataloader()))
    assert images.shape == (4, 3, 24, 24) and labels.tolist() == [0, 0, 1, 1]


def test_image_extensions_are_torchvisions() -> None:
    folder = pytest.importorskip("torchvision.datasets.folder")
    assert IMAGE_EXTENSIONS == folder.IMG_EXTENSIONS


def test_every_image_extension_is_read_in_any_case(root: Path) -> None:
    for suffix, format in ((".BMP", "BMP"), (".tiff", "TIFF"), (".webp", "WEBP"), (".ppm", "PPM")):
        Image.new("RGB", (40, 30), (9, 9, 9)).save(root / "red" / f"more{suffix}", format=format)
    data = ImageFolderDataModule(
        root,
        image_size=16,
        batch_size=2,
        num_workers=0,
        val_transform=ResizeCenterCrop(16, 18, IMAGENET_MEAN, IMAGENET_STD),
    )
    data.setup("fit")
    assert len(data.train_set) + len(data.val_set) == 22
    for index in range(len(data.val_set)):
        assert data.val_set[index][0].shape == (3, 16, 16)


def test_val_transform_normalizes_a_constant_image(root: Path) -> None:
    data = ImageFolderDataModule(root, image_size=16, batch_size=2)
    data.setup("fit")
    Image.new("RGB", (40, 30), (255, 0, 128)).save(data.val_set.samples[0][0], format="PNG")  # lossless
    image, _ = data.val_set[0]
    expected = (torch.tensor([255, 0, 128]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert image.shape == (3, 16, 16)
    torch.testing.assert_close(image, expected[:, None, None].expand(3, 16, 16), atol=1e-6, rtol=0)


def test_default_transforms_are_torchvisions_imagenet_recipe() -> None:
    v2 = pytest.importorskip("torchvision.transforms.v2")
    train, val = default_transforms(224, IMAGENET_MEAN, IMAGENET_STD)
    assert [type(t) for t in train.transforms] == [
        v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.PILToTensor, v2.ToDtype, v2.Normalize, v2.ToPureTensor
    ]  # fmt: skip
    crop = train.transforms[0]
    assert (tuple(crop.size), crop.scale, crop.ratio) == ((224, 224), (0.08, 1.0), (3 / 4, 4 / 3))
    assert [type(t) for t in val.transforms][:2] == [v2.Resize, v2.CenterCrop]
    assert list(val.transforms[0].size) == [256] and tuple(val.transforms[1].size) == (224, 224)
    assert val.transforms[4].mean == list(IMAGENET_MEAN) and val.transforms[4].std == list(IMAGENET_STD)


def test_the_fallback_is_torchvisions_validation_recipe_bit_for_bit() -> None:
    pytest.importorskip("torchvision.transforms.v2")
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    _, val = default_transforms(16, mean, std)
    fallback = ResizeCenterCrop(16, 18, mean, std)
    generator = torch.Generator().manual_seed(0)
    for size in [(40, 30), (30, 40), (17, 100), (100, 17), (18, 18), (300, 10), (5, 7)]:
        pixels = torch.randint(0, 256, (size[0] * size[1] * 3,), generator=generator, dtype=torch.uint8)
        image = Image.frombytes("RGB", size, bytes(pixels.tolist()))
        assert torch.equal(val(image), fallback(image)), size


def test_without_torchvision_both_sets_resize_and_center_crop_and_a_warning_says_so(
    root: Path, no_torchvision: None
) -> None:
    data = ImageFolderDataModule(root, image_size=16, batch_size=2, num_workers=0)
    with pytest.warns(UserWarning, match="torchvision does not import here: training images are resized and center"):
        data.setup("fit")
    assert isinstance(data.train_set.transform, ResizeCenterCrop) and data.val_set.transform is data.train_set.transform
    assert data.train_set[0][0].shape == (3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # your own training transform: nothing to warn about
        ImageFolderDataModule(root, image_size=16, train_transform=RandomShift()).setup("fit")


def test_your_own_transforms_are_used_for_train_and_val(root: Path) -> None:
    calls: list[str] = []

    def train(image: Image.Image) -> torch.Tensor:
        calls.append("train")
        return torch.zeros(3, 8, 8)

    def val(image: Image.Image) -> torch.Tensor:
        calls.append(f"val {image.mode} {image.size}")
        return torch.ones(3, 4, 4)

    data = ImageFolderDataModule(root, batch_size=2, num_workers=0, train_transform=train, val_transform=val)
    data.setup("fit")
    assert next(iter(data.train_dataloader()))[0].shape == (2, 3, 8, 8)
    assert next(iter(data.val_dataloader()))[0].shape == (2, 3, 4, 4)
    assert calls == ["train", "train", "val RGB (40, 30)", "val RGB (40, 30)"]
    assert "train_transform" not in data.hparams  # objects stay out of checkpoints
    with pytest.raises(ValueError, match=r"^train_transform must be callable \(PIL image -> tensor\) or None, got 3$"):
        ImageFolderDataModule(root, train_transform=3)


def test_your_own_torchvision_transforms_from_a_yaml_class_path(root: Path, tmp_path: Path) -> None:
    v2 = pytest.importorskip("torchvision.transforms.v2")
    from jsonargparse import ArgumentParser

    config = tmp_path / "data.yaml"
    config.write_text(
        f"root: {root}\nimage_size: 16\nnum_workers: 0\ntrain_transform:\n"
        "  class_path: torchvision.transforms.v2.Compose\n  init_args:\n    transforms:\n"
        "      - class_path: torchvision.transforms.v2.RandomResizedCrop\n        init_args: {size: 12}\n"
        "      - class_path: torchvision.transforms.v2.PILToTensor\n"
    )
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ImageFolderDataModule, "data")
    parser.add_argument("--config", action="config")
    data = parser.instantiate(parser.parse_args(["--data", str(config)])).data
    data.setup("fit")
    assert isinstance(data.train_set.transform, v2.Compose)
    image, _ = data.train_set[0]
    assert image.shape == (3, 12, 12) and image.dtype == torch.uint8


def test_deterministic_for_a_seed_and_the_global_generators_are_left_alone(root: Path) -> None:
    def first_batches(seed: int, epoch: int = 0, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        data = ImageFolderDataModule(root, batch_size=6, seed=seed, num_workers=workers, train_transform=RandomShift())
        data.setup("fit")
        loader = data.train_dataloader()
        loader.sampler.set_epoch(epoch)
        images, labels = next(iter(loader))
        return images, labels, samples(data)[1]

    torch.manual_seed(1)
    random.seed(1)
    a = first_batches(0)
    data = ImageFolderDataModule(root, num_workers=0, train_transform=RandomShift())
    data.setup("fit")
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    data.train_set[0]
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state  # restored
    torch.manual_seed(2)  # the global generators play no part
    random.seed(2)
    b = first_batches(0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert torch.equal(first_batches(0, workers=2)[0], a[0])  # nor does the number of workers
    other = first_batches(1)
    assert other[2] != a[2] and not torch.equal(other[0], a[0])
    assert not torch.equal(first_batches(0, epoch=1)[0], a[0])  # a new order and new draws every epoch


def test_train_and_val_folders(tmp_path: Path) -> None:
    make_images(tmp_path / "train", per_class=4)
    make_images(tmp_path / "val", per_class=2)
    data = ImageFolderDataModule(tmp_path, image_size=16, batch_size=4)
    data.setup("fit")
    assert data.classes == ["blue", "green", "red"]
    assert (len(data.train_set), len(data.val_set)) == (12, 6)
    assert all("/val/" in path for path, _ in data.val_set.samples)


def test_errors_say_what_to_do(tmp_path: Path) -> None:
    def error(root: Path, **kwargs: object) -> str:
        with pytest.raises(ValueError) as raised:
            data = ImageFolderDataModule(root, **kwargs)
            data.setup("fit")
            data.train_dataloader()
        assert "\n" not in str(raised.value)
        return str(raised.value)

    missing = tmp_path / "missing"
    assert error(missing) == (
        f"image folder {missing} does not exist: pass a folder with one subfolder of images per class"
    )
    (tmp_path / "empty").mkdir()
    assert error(tmp_path / "empty") == (
        f"{tmp_path / 'empty'} has no class folders: put the images of each class in a subfolder named after the "
        f"class ({tmp_path / 'empty'}/<class>/*.png)"
    )
    one = make_images(tmp_path / "one", classes={"red": (255, 0, 0)})
    assert error(one) == f"{one} has one class folder (red); a classifier needs at least 2: add more"
    root = make_images(tmp_path / "images")
    (root / "yellow").mkdir()
    (root / "yellow" / "readme.txt").write_text("no images here")
    assert error(root) == (
        f"class folder {root / 'yellow'} has no usable images (.jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, "
        ".webp): add some or remove the folder"
    )
    for val_split in (0, 1, 1.5, -0.1):
        assert error(root, val_split=val_split) == (
            f"val_split must lie strictly between 0 and 1 (the fraction of images held out), got {val_split!r}"
        )
    assert error(root, bad_images="ignore") == "bad_images must be 'error' or 'skip', got 'ignore'"
    assert error(root, num_workers=-1) == "num_workers must be 0 or more (None: one per spare CPU, up to 4), got -1"
    small = make_images(tmp_path / "small", per_class=2)
    assert error(small, val_split=0.1) == "val_split 0.1 of 6 images holds none out: raise val_split or add images"
    make_images(tmp_path / "split" / "train")
    make_images(tmp_path / "split" / "val", classes={"blue": (0, 0, 255), "red": (255, 0, 0)})
    assert re.fullmatch(
        r".* has classes \['blue', 'red'\] but .* has \['blue', 'green', 'red'\]: give both the same class folders",
        error(tmp_path / "split"),
    )


def test_a_folder_smaller_than_a_batch_trains_on_batches_of_all_its_images(tmp_path: Path) -> None:
    root = make_images(tmp_path / "images", per_class=12)  # 36 images: 30 train, 6 val
    data = ImageFolderDataModule(root, image_size=16, batch_size=64, num_workers=0)
    data.setup("fit")
    with pytest.warns(UserWarning) as warned:
        loader = data.train_dataloader()
    assert [str(w.message) for w in warned] == [
        "30 training images per process is less than batch_size 64: each training batch holds all 30; pass a "
        "batch_size of at most 30 to silence this"
    ]
    batches = list(loader)
    assert len(batches) == 1 and batches[0][0].shape == (30, 3, 16, 16)
    assert [len(labels) for _, labels in data.val_dataloader()] == [6]


def test_symlink_loops_end_and_a_file_reached_by_two_paths_is_one_image(tmp_path: Path) -> None:
    root = make_images(tmp_path / "images", per_class=4)
    (root / "red" / "loop").symlink_to(root / "red", target_is_directory=True)  # red/loop/loop/... forever
    (root / "red" / "up").symlink_to(root, target_is_directory=True)  # every class again, below red
    (root / "blue" / "again").symlink_to(root / "blue" / "deeper", target_is_directory=True)
    (root / "blue" / "deeper").mkdir()
    (root / "blue" / "deeper" / "x.png").symlink_to(root / "blue" / "0.png")  # the same file, two names
    os.link(root / "green" / "1.JPG", root / "green" / "hard.jpg")  # a hard link: the same file too
    with pytest.warns(UserWarning, match=r"^2 files in .* reached by more than one path \(links\): each image is"):
        data = ImageFolderDataModule(root, val_split=0.5, image_size=16, batch_size=2, num_workers=0)
        data.setup("fit")
    train, val = samples(data)
    assert len(train) + len(val) == 12 and len(identities(train + val)) == 12  # each file once
    assert not identities(train) & identities(val)  # never in both train and validation
    assert sorted(label for _, label in data.train_set.samples) == [0, 0, 1, 1, 2, 2]


def test_a_file_in_both_train_and_val_folders_is_left_out_of_validation(tmp_path: Path) -> None:
    make_images(tmp_path / "train", per_class=2)
    make_images(tmp_path / "val", per_class=2)
    (tmp_path / "val" / "red" / "leak.png").symlink_to(tmp_path / "train" / "red" / "0.png")
    with pytest.warns(UserWarning, match="^1 file in .* reached by more than one path"):
        data = ImageFolderDataModule(tmp_path, image_size=16, batch_size=2, num_workers=0)
        data.setup("fit")
    assert not identities(samples(data)[0]) & identities(samples(data)[1])
    assert len(data.val_set) == 6


def run_with_timeout(function, fifo: Path, timeout: float = 20.0) -> None:
    """Run ``function`` in a thread; fail if it has not returned within ``timeout`` (unblocking a reader of ``fifo``)."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            function()
        except BaseException as error:  # handed to the test's thread
            errors.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the blocked open returns, and reads nothing
        pytest.fail(f"still blocked on {fifo} after {timeout} s")
    if errors:
        raise errors[0]


def test_fifos_and_devices_are_never_opened(root: Path) -> None:
    fifo = root / "red" / "x.png"
    os.mkfifo(fifo)
    (root / "green" / "zero.png").symlink_to("/dev/zero")

    def setup_and_read_everything(bad_images: str) -> ImageFolderDataModule:
        data = ImageFolderDataModule(root, image_size=16, batch_size=2, num_workers=0, bad_images=bad_images)
        data.setup("fit")
        for loader in (data.train_dataloader(), data.val_dataloader()):
            list(loader)
        return data

    with pytest.raises(DataFolderError) as raised:
        run_with_timeout(lambda: setup_and_read_everything("error"), fifo)
    assert str(raised.value) == (
        f"2 files in {root} cannot be used as images: green/zero.png (not a regular file), red/x.png (not a "
        "regular file); remove or replace them, or pass bad_images='skip' (--data.bad_images skip) to leave them out"
    )
    kept: list[ImageFolderDataModule] = []
    with pytest.warns(UserWarning, match=r"left out 2 files in .* that cannot be used as images: green/zero.png"):
        run_with_timeout(lambda: kept.append(setup_and_read_everything("skip")), fifo)
    assert str(fifo) not in [path for path, _ in kept[0].train_set.samples + kept[0].val_set.samples]
    with pytest.raises(BadImageError, match=r"x.png cannot be used as an image \(not a regular file\): remove"):
        run_with_timeout(lambda: image_folder.load_image(str(fifo)), fifo)


def test_bad_images_are_found_in_setup_and_named_in_one_line(root: Path) -> None:
    (root / "blue" / "empty.png").write_bytes(b"")
    (root / "blue" / "notes.jpg").write_text("not an image")
    Image.new("RGB", (1, 8192)).save(root / "green" / "tall.png")  # 109 bytes, a 2 GB validation resize
    (root / "green" / "huge.png").write_bytes(png_header(9000, 9000))  # 81 megapixels, a few bytes
    Image.new("RGB", (40, 30)).save(root / "red" / "drawing.png", format="GIF")  # no decoder of the extensions
    Image.new("RGB", (MAX_ASPECT_RATIO, 1)).save(root / "red" / "wide.png")  # at the bound: an image
    (root / "red" / "broken.png").symlink_to(root / "nowhere.png")
    with pytest.raises(DataFolderError) as raised:
        ImageFolderDataModule(root, image_size=16).setup("fit")
    assert str(raised.value) == (
        f"6 files in {root} cannot be used as images: blue/empty.png (empty file), blue/notes.jpg (not a JPEG, "
        f"PNG, PPM, BMP, TIFF or WebP image), green/huge.png (9000 x 9000 pixels, more than {MAX_IMAGE_PIXELS}), "
        "green/tall.png (1 x 8192 pixels, an aspect ratio above 32), red/broken.png (cannot be read: No such file "
        "or directory) and 1 more; remove or replace them, or pass bad_images='skip' (--data.bad_images skip) to "
        "leave them out"
    )
    data = ImageFolderDataModule(root, image_size=16, batch_size=4, num_workers=0, bad_images="skip")
    with pytest.warns(UserWarning, match=r"^left out 6 files in .* that cannot be used as images: blue/empty.png"):
        data.setup("fit")
    assert (len(data.train_set), len(data.val_set)) == (16, 3)  # the 18 images and wide.png
    assert sum(len(labels) for _, labels in data.train_dataloader()) == 16


def test_a_file_damaged_behind_its_header_is_left_out_of_its_batch_with_a_warning(tmp_path: Path) -> None:
    make_images(tmp_path / "train", per_class=2)
    make_images(tmp_path / "val", per_class=1)
    truncated_png(tmp_path / "val" / "red" / "truncated.png")
    data = ImageFolderDataModule(tmp_path, image_size=16, batch_size=4, num_workers=0)
    data.setup("fit")  # its header is fine: nothing is decoded in setup
    index = [path for path, _ in data.val_set.samples].index(str(tmp_path / "val" / "red" / "truncated.png"))
    with pytest.raises(BadImageError, match=r"truncated.png cannot be used as an image \(cannot be decoded: image"):
        data.val_set[index]
    with pytest.warns(UserWarning, match=r"^left .*truncated.png out of its batch: cannot be decoded: image file is"):
        batches = [labels.tolist() for _, labels in data.val_dataloader()]
    assert batches == [[0, 1, 2]]  # the other three
    data.val_set.samples = [data.val_set.samples[index]] * 2
    with pytest.raises(DataFolderError, match=r"^no image of a batch can be decoded: .*truncated.png \(cannot be"):
        list(data.val_dataloader())


def test_decoding_and_resizing_a_hostile_image_stays_within_bounded_memory(tmp_path: Path) -> None:
    """A 1 x 8192 PNG (109 bytes) took 2 GB when its shorter side was resized to 256; now setup refuses it."""
    make_images(tmp_path / "train", per_class=1)
    make_images(tmp_path / "val", per_class=1)
    Image.new("RGB", (1, 8192)).save(tmp_path / "val" / "red" / "tall.png")
    script = PRELUDE + (
        "import sys\n"
        "from condconv_lightning.finetune import ImageFolderDataModule\n"
        "reset_peak()\n"
        "data = ImageFolderDataModule(sys.argv[1], image_size=224, batch_size=1, num_workers=0)\n"
        "try:\n"
        "    data.setup('fit')\n"
        "    for dataset in (data.train_set, data.val_set):\n"
        "        [dataset[i] for i in range(len(dataset))]\n"
        "except ValueError as error:\n"
        "    print(error)\n"
        "print(peak_growth() // 2**20)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120, check=True
    )
    grown_mib = int(done.stdout.split()[-1])
    assert grown_mib < 100, done.stdout
    assert "val/red/tall.png (1 x 8192 pixels, an aspect ratio above 32)" in done.stdout


def test_num_workers_fit_the_machine_and_lightning_warns_of_none(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    data = ImageFolderDataModule(root, image_size=16, batch_size=4)
    trainer = Trainer(
        accelerator="cpu", max_steps=1, limit_val_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    model = ImageClassifier(num_classes=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, data)
    about_workers = [str(w.message) for w in caught if "worker" in str(w.message)]
    assert about_workers == []
    assert data.train_dataloader().num_workers == min(4, suggested_max_num_workers(1)) == 4
    assert ImageFolderDataModule(root, num_workers=0).hparams["num_workers"] == 0


def test_the_recipe_leaves_num_workers_to_the_machine() -> None:
    recipe = yaml.safe_load((ROOT / "examples" / "configs" / "pretrained_folder.yaml").read_text())
    assert "num_workers" not in recipe["data"]["init_args"] and "num_classes" not in recipe["model"]


def finetune(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CONDCONV_TUNE": "0"}
    command = [sys.executable, "-m", "condconv_lightning.cli.finetune", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_finetune_cli_on_an_image_folder(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from condconv_lightning.cli.finetune import main

    monkeypatch.setattr("sys.argv", ["condconv-finetune"])  # args replace these, as on the command line
    common = ["--data", "ImageFolderDataModule", "--data.root", str(root), "--data.image_size", "32"]
    common += ["--data.batch_size", "4", "--data.num_workers", "0", "--trainer.accelerator", "cpu"]
    common += ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    common += ["--trainer.default_root_dir", str(tmp_path)]
    main(["fit", *common, "--trainer.max_steps", "2"])  # no --model.num_classes: the folder's 3 classes
    assert "layer4" in capsys.readouterr().out  # the default callbacks converted the network
    checkpoint = next(tmp_path.glob("checkpoints/*.ckpt"))
    module = ImageClassifier.load_from_checkpoint(checkpoint)
    assert module.hparams["num_classes"] == 3 and module.model.fc.out_features == 3
    with pytest.raises(SystemExit):
        main(["fit", *common, "--model.num_classes", "2", "--trainer.max_steps", "1"])
    assert capsys.readouterr().err.strip() == (
        "condconv-finetune: error: the data has 3 classes but --model.num_classes is 2: pass 3"
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--data", "ImageFolderDataModule", "--data.root", "missing"],
            "image folder missing does not exist: pass a folder with one subfolder of images per class",
        ),
        (
            ["--data", "ImageFolderDataModul", "--data.root", "images"],
            "--data ImageFolderDataModul: no such data module; did you mean ImageFolderDataModule? (known here: "
            "ImageFolderDataModule, SyntheticImageDataModule; or give module.Class)",
        ),
        (
            ["--data", "mydata", "--data.root", "images"],
            "--data mydata: no such data module (known here: ImageFolderDataModule, SyntheticImageDataModule; or "
            "give module.Class)",
        ),
        (
            ["--data", "ImageFolderDataModule", "--data.root", "images", "--data.bad_images", "skip"],
            None,
        ),
        (
            ["--data", "ImageFolderDataModule", "--data.root", "images"],
            "1 file in images cannot be used as images: red/empty.png (empty file); remove or replace them, or pass "
            "bad_images='skip' (--data.bad_images skip) to leave them out",
        ),
    ],
    ids=["missing-folder", "close-name", "no-close-name", "bad-image-skipped", "bad-image"],
)
def test_data_errors_are_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, arguments: list[str], message: str | None
) -> None:
    from condconv_lightning.cli.finetune import main

    make_images(tmp_path / "images")
    (tmp_path / "images" / "red" / "empty.png").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["condconv-finetune"])
    common = ["--trainer.max_steps", "1", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false"]
    common += ["--trainer.enable_progress_bar", "false", "--data.num_workers", "0", "--data.batch_size", "4"]
    if message is None:
        with pytest.warns(UserWarning, match="^left out 1 file in images that cannot be used as images: red/empty"):
            main(["fit", *arguments, *common])
        return
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *arguments, *common])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.strip().splitlines()[-1] == f"condconv-finetune: error: {message}", err
    assert "Traceback" not in err


def test_a_batch_none_of_whose_images_decode_stops_in_one_line_even_from_a_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from condconv_lightning.cli.finetune import main

    make_images(tmp_path / "train", per_class=2)
    for name in COLOURS:
        (tmp_path / "val" / name).mkdir(parents=True)
        truncated_png(tmp_path / "val" / name / "t.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["condconv-finetune"])
    with pytest.raises(SystemExit) as exit_:
        main([
            "fit", "--data", "ImageFolderDataModule", "--data.root", ".", "--data.image_size", "32",
            "--data.batch_size", "2", "--data.num_workers", "1", "--trainer.max_steps", "1", "--trainer.logger",
            "false", "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks", "[]",
        ])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.strip().splitlines()[-1] == (
        "condconv-finetune: error: no image of a batch can be decoded: val/blue/t.png (cannot be decoded: image "
        "file is truncated), val/green/t.png (cannot be decoded: image file is truncated); remove or replace them"
    )


@pytest.mark.slow
def test_ddp_on_a_folder_smaller_than_a_batch_infers_its_classes_and_trains(tmp_path: Path) -> None:
    """36 images, batch_size 64, 2 processes: each trains on its 15 images; num_classes comes from the folder."""
    images = make_images(tmp_path / "images", per_class=12)
    done = finetune(
        "fit", "--data", "ImageFolderDataModule", "--data.root", str(images), "--data.image_size", "32",
        "--data.batch_size", "64", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--trainer.strategy", "ddp", "--trainer.max_steps", "2", "--trainer.logger", "CSVLogger",
        "--trainer.logger.save_dir", ".", "--trainer.enable_progress_bar", "false",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MEMBER: 2/2" in done.stderr
    assert done.stderr.count("15 training images per process is less than batch_size 64: each training batch") == 1
    assert "worker" not in done.stderr
    with open(next(tmp_path.glob("lightning_logs/version_0/metrics.csv"))) as file:
        rows = list(csv.DictReader(file))
    assert [int(row["step"]) for row in rows if row["train_loss"]] == [0, 1]  # one batch per epoch, two epochs
    hparams = (tmp_path / "lightning_logs" / "version_0" / "hparams.yaml").read_text()
    assert "num_classes: 3" in hparams
