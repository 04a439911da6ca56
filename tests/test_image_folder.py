"""ImageFolderDataModule on real PNG and JPEG files: classes, split, transforms, determinism, errors, the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from condconv_lightning.finetune import ImageClassifier, ImageFolderDataModule
from condconv_lightning.finetune.image_folder import IMAGENET_MEAN, IMAGENET_STD, TrainTransform

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


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_images(tmp_path / "images")


def test_classes_split_and_batches(root: Path) -> None:
    (root / "red" / "notes.txt").write_text("not an image")
    data = ImageFolderDataModule(root, val_split=0.34, image_size=24, batch_size=4)
    data.setup("fit")
    assert data.classes == ["blue", "green", "red"] and data.num_classes == 3
    assert data.class_to_idx == {"blue": 0, "green": 1, "red": 2}
    assert (len(data.train_set), len(data.val_set)) == (12, 6)  # round(6 * 0.34) = 2 per class held out
    assert sorted(label for _, label in data.val_set.samples) == [0, 0, 1, 1, 2, 2]
    assert not {path for path, _ in data.train_set.samples} & {path for path, _ in data.val_set.samples}
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 24, 24) and images.dtype == torch.float32
    assert labels.shape == (4,) and labels.dtype == torch.int64
    assert len(data.train_dataloader()) == 3
    images, labels = next(iter(data.val_dataloader()))
    assert images.shape == (4, 3, 24, 24) and labels.tolist() == [0, 0, 1, 1]


def test_val_transform_normalizes_a_constant_image(root: Path) -> None:
    data = ImageFolderDataModule(root, image_size=16, batch_size=2)
    data.setup("fit")
    Image.new("RGB", (40, 30), (255, 0, 128)).save(data.val_set.samples[0][0], format="PNG")  # lossless
    image, _ = data.val_set[0]
    expected = (torch.tensor([255, 0, 128]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert image.shape == (3, 16, 16)
    torch.testing.assert_close(image, expected[:, None, None].expand(3, 16, 16), atol=1e-6, rtol=0)


def test_random_resized_crop_stays_in_the_image_and_in_its_ranges() -> None:
    transform = TrainTransform(8, IMAGENET_MEAN, IMAGENET_STD)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        left, top, right, bottom = transform.crop_box(40, 30, generator)
        width, height = right - left, bottom - top
        assert 0 <= left < right <= 40 and 0 <= top < bottom <= 30
        assert 0.08 * 1200 * 0.8 <= width * height <= 1200 and 3 / 4 * 0.8 <= width / height <= 4 / 3 * 1.2
    assert transform.crop_box(400, 10, generator) == (193, 0, 206, 10)  # no fit: the central box at ratio 4/3


def test_deterministic_for_a_seed(root: Path) -> None:
    def first_batches(seed: int, epoch: int = 0, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        data = ImageFolderDataModule(root, image_size=16, batch_size=6, seed=seed, num_workers=workers)
        data.setup("fit")
        loader = data.train_dataloader()
        loader.sampler.set_epoch(epoch)
        images, labels = next(iter(loader))
        return images, labels, [path for path, _ in data.val_set.samples]

    torch.manual_seed(1)
    a = first_batches(0)
    torch.manual_seed(2)  # the global RNG plays no part
    b = first_batches(0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert torch.equal(first_batches(0, workers=2)[0], a[0])  # nor does the number of workers
    other = first_batches(1)
    assert other[2] != a[2] and not torch.equal(other[0], a[0])
    assert not torch.equal(first_batches(0, epoch=1)[0], a[0])  # a new order and new crops every epoch


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
        f"class folder {root / 'yellow'} has no PNG or JPEG images (.png, .jpg, .jpeg): add some or remove the folder"
    )
    for val_split in (0, 1, 1.5, -0.1):
        assert error(root, val_split=val_split) == (
            f"val_split must lie strictly between 0 and 1 (the fraction of images held out), got {val_split!r}"
        )
    small = make_images(tmp_path / "small", per_class=2)
    assert error(small, val_split=0.1) == "val_split 0.1 of 6 images holds none out: raise val_split or add images"
    assert (
        error(small, val_split=0.5, batch_size=8)
        == "3 training images per process is less than batch_size 8: lower batch_size or add images"
    )
    make_images(tmp_path / "split" / "train")
    make_images(tmp_path / "split" / "val", classes={"blue": (0, 0, 255), "red": (255, 0, 0)})
    assert re.fullmatch(
        r".* has classes \['blue', 'red'\] but .* has \['blue', 'green', 'red'\]: give both the same class folders",
        error(tmp_path / "split"),
    )


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
    ],
    ids=["missing-folder", "close-name", "no-close-name"],
)
def test_data_errors_are_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, arguments: list[str], message: str
) -> None:
    from condconv_lightning.cli.finetune import main

    make_images(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["condconv-finetune"])
    common = ["--trainer.max_steps", "1", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false"]
    common += ["--trainer.enable_progress_bar", "false", "--data.num_workers", "0", "--data.batch_size", "4"]
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *arguments, *common])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.strip().splitlines()[-1] == f"condconv-finetune: error: {message}", err
    assert "Traceback" not in err
