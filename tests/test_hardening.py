"""Files from anywhere run nothing, allocate nothing they should not, and outputs never clobber.

Each test plays the attacker or the unlucky user: a checkpoint whose hyperparameters
ask for a pickle to be trusted or a class to be built, a spec with a catastrophic
regex or a huge expert count, two writers racing for one output, markup in module
names, a DDP-wrapped model, a zip bomb, a closed pipe, a SIGTERM in the middle of a
write.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from console_scripts import run_script

from condconv_lightning import CondConv2d
from condconv_lightning.checkpoints import UntrustedCheckpointError, code_references
from condconv_lightning.demos import resnet_tiny
from condconv_lightning.finetune import ImageClassifier
from condconv_lightning.io import UnsafeFileError, atomic_write, load_weights_only
from condconv_lightning.surgery import ConversionSpec, convert, load_converted, save_converted

ARCH = "condconv_lightning.finetune.module:ImageClassifier"


class FileCreator:
    """Unpickling this object calls ``open(path, 'w')``: it creates a file (a stand-in for any payload)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def classifier_checkpoint(path: Path, converted: bool = True, **hyper_parameters: object) -> Path:
    """A checkpoint as condconv-finetune writes it (layer3 and layer4 converted), with the hyperparameters given."""
    module = ImageClassifier(num_classes=4)
    if converted:
        convert(module.model, ["layer3", "layer4"])
    hparams = {"num_classes": 4, "_instantiator": "lightning.pytorch.cli.instantiate_module", **hyper_parameters}
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": hparams,
        "pytorch-lightning_version": "2.6.6",
        "epoch": 0,
        "global_step": 0,
    }
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.fixture()
def evil(tmp_path: Path) -> dict[str, Path]:
    """A pickle whose loading creates a marker file, and checkpoints that point at it or name classes."""
    marker = tmp_path / "payload-ran"
    torch.save({"weights": FileCreator(str(marker))}, tmp_path / "evil.pt")
    return {
        "marker": marker,
        "trusting": classifier_checkpoint(
            tmp_path / "trusting.ckpt", weights=str(tmp_path / "evil.pt"), trust_pickle=True
        ),
        "class_path": classifier_checkpoint(
            tmp_path / "class_path.ckpt",
            converted=False,
            model={"class_path": "torch.nn.Linear", "init_args": {"in_features": 2, "out_features": 2}},
        ),
    }


# 1 and 2: a checkpoint's hyperparameters decide nothing about trust and name no code.


def test_checkpoint_cannot_ask_for_its_pickle_to_be_trusted(evil: dict[str, Path]) -> None:
    module = ImageClassifier.load_from_checkpoint(evil["trusting"], weights_only=True)
    assert not evil["marker"].exists()
    assert "trust_pickle" not in module.hparams and "weights" not in module.hparams
    assert isinstance(module.model, nn.Module)


def test_checkpoint_naming_a_class_is_refused_unless_trusted(evil: dict[str, Path]) -> None:
    with pytest.raises(
        UntrustedCheckpointError, match=r"model\.class_path='torch\.nn\.Linear'.*pass trust_checkpoint=True$"
    ):
        ImageClassifier.load_from_checkpoint(evil["class_path"])
    trusted = ImageClassifier.load_from_checkpoint(evil["class_path"], trust_checkpoint=True, strict=False)
    assert isinstance(trusted.model, nn.Linear)  # the caller's decision: Lightning's behaviour


@pytest.mark.parametrize("key", ["hparams", "module_arguments"])
@pytest.mark.parametrize("form", [dict, lambda entries: list(entries.items())], ids=["mapping", "pairs"])
def test_hyperparameters_under_lightnings_older_keys_are_checked_too(tmp_path: Path, key: str, form) -> None:
    """load_from_checkpoint merges them into what __init__ receives: an arch there builds code as well."""
    from lightning.pytorch.core.saving import CHECKPOINT_PAST_HPARAMS_KEYS

    from condconv_lightning.checkpoints import PAST_HPARAMS_KEYS
    from condconv_lightning.loading import ModelFileError, load_model

    assert PAST_HPARAMS_KEYS == CHECKPOINT_PAST_HPARAMS_KEYS  # the keys the installed Lightning merges
    marker = tmp_path / "pwned"
    path = classifier_checkpoint(tmp_path / "legacy.ckpt", converted=False)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint[key] = form({"arch": "os:system", "arch_kwargs": {"command": f"touch {marker}"}})
    torch.save(checkpoint, path)
    with pytest.raises(UntrustedCheckpointError, match=r"arch='os:system'.*trust_checkpoint=True"):
        ImageClassifier.load_from_checkpoint(path)
    with pytest.raises(ModelFileError, match=r"arch='os:system'.*--trust-pickle"):
        load_model(path, arch=ARCH)
    assert not marker.exists()


def test_code_references_are_found_at_any_depth() -> None:
    hparams = {"a": [{"b": {"class_path": "x.Y"}}], "_instantiator": "evil.build", "c": 1}
    assert sorted(code_references(hparams)) == [
        "hyper_parameters._instantiator='evil.build'",
        "hyper_parameters.a[0].b.class_path='x.Y'",
    ]
    assert code_references({"_instantiator": "lightning.pytorch.cli.instantiate_module", "lr": 0.1}) == []


@pytest.mark.slow
def test_command_lines_refuse_untrusted_checkpoints(evil: dict[str, Path], tmp_path: Path) -> None:
    converted = run_script(
        "condconv-convert", evil["trusting"], "--arch", ARCH, "--layers", "model.layer2", "--no-check", cwd=tmp_path
    )
    assert converted.returncode == 0, converted.stderr
    refused = run_script(
        "condconv-convert", evil["class_path"], "--arch", ARCH, "--layers", "model.layer4", cwd=tmp_path
    )
    assert refused.returncode == 1 and "name code to import" in refused.stderr and "--trust-pickle" in refused.stderr
    validate = run_script(
        "condconv-finetune",
        "validate",
        "--ckpt_path",
        evil["trusting"],
        "--data.val_size",
        "8",
        "--data.train_size",
        "8",
        "--data.batch_size",
        "8",
        "--trainer.logger",
        "false",
        cwd=tmp_path,
    )
    assert validate.returncode == 0, validate.stderr[-2000:]
    class_path = run_script("condconv-finetune", "validate", "--ckpt_path", evil["class_path"], cwd=tmp_path)
    assert class_path.returncode == 2 and "--trust_checkpoint true" in class_path.stderr
    assert not evil["marker"].exists()


# 3 and 4: specs are validated before anything is compiled or allocated.


def converted_file(tmp_path: Path) -> tuple[Path, dict]:
    model = resnet_tiny()
    convert(model, "layer4", num_experts=4)
    path = save_converted(model, tmp_path / "converted.pt")
    return path, torch.load(path, weights_only=True)


def rewrite_spec(content: dict, path: Path, edit) -> Path:
    spec = json.loads(content["spec"])
    edit(spec)
    torch.save({**content, "spec": json.dumps(spec)}, path)
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s["layers"].update({"re:(.|.|.)*Z": s["layers"]["layer4.0.conv1"]}), "dotted module paths"),
        (lambda s: s["options"].update(seed="7" * 1000), "seed must be an integer"),
        (lambda s: s["options"].update(seed=2**70), "seed must be an integer"),
        (lambda s: s["options"].update(num_experts="4"), "num_experts must be a positive integer"),
        (
            lambda s: s["layers"]["layer4.0.conv1"].update(temperature=float("inf")),
            "temperature must be a positive finite",
        ),
        (lambda s: s["layers"]["layer4.0.conv1"].update(source_class="os.system; rm"), "source_class must be a dotted"),
        (lambda s: s["options"].update(evil=True), "unknown conversion option"),
        (lambda s: s.update(selectors="layer4"), "selectors must be a list"),
    ],
)
def test_malformed_specs_are_refused_at_once(tmp_path: Path, edit, message: str) -> None:
    _path, content = converted_file(tmp_path)
    bad = rewrite_spec(content, tmp_path / "bad.pt", edit)
    model = resnet_tiny()
    started = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        load_converted(bad, model)
    assert time.perf_counter() - started < 5
    assert not any(isinstance(m, CondConv2d) for m in model.modules())


def test_expert_count_is_checked_against_the_weights_before_allocation(tmp_path: Path) -> None:
    _path, content = converted_file(tmp_path)
    bad = rewrite_spec(content, tmp_path / "bad.pt", lambda s: s["layers"]["layer4.0.conv1"].update(num_experts=5000))
    model = resnet_tiny()
    with pytest.raises(
        ValueError, match=r"gives layer 'layer4.0.conv1' 5000 experts, but the weights hold a tensor of shape \[4, "
    ):
        load_converted(bad, model)
    assert not any(isinstance(m, CondConv2d) for m in model.modules())


def test_failed_load_leaves_the_model_as_it_was(tmp_path: Path) -> None:
    path, _content = converted_file(tmp_path)
    other_width = resnet_tiny(num_classes=7)  # the head differs: the strict load fails after the spec applied
    before = {k: v.clone() for k, v in other_width.state_dict().items()}
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_converted(path, other_width)
    assert not any(isinstance(m, CondConv2d) for m in other_width.modules())
    after = other_width.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_spec_layer_names_are_never_patterns() -> None:
    spec = convert(resnet_tiny(), "layer4.0.conv1").spec.to_dict()
    spec["layers"] = {"layer4.*.conv1": spec["layers"]["layer4.0.conv1"]}
    parsed = ConversionSpec.from_dict(spec)  # a glob character may be part of a ModuleDict key ...
    from condconv_lightning.surgery import apply_spec

    with pytest.raises(ValueError, match="is not a convolution in this model"):
        apply_spec(resnet_tiny(), parsed)  # ... but it is looked up exactly, never matched


# 5: exactly one of two writers wins; symlinks are not followed.


def test_two_writers_one_winner(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def writer(payload: bytes) -> None:
        try:
            with atomic_write(target) as tmp:
                tmp.write_bytes(payload)
                barrier.wait()  # both have passed the existence check and written their bytes
            outcomes.append("won")
        except FileExistsError:
            outcomes.append("lost")

    threads = [threading.Thread(target=writer, args=(p,)) for p in (b"first", b"second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["lost", "won"]
    assert target.read_bytes() in (b"first", b"second") and sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_symlink_at_the_output_is_neither_followed_nor_replaced(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    for name, points_to in (("dangling", tmp_path / "missing"), ("live", victim)):
        link = tmp_path / name
        link.symlink_to(points_to)
        with pytest.raises(FileExistsError, match="already exists"), atomic_write(link) as tmp:
            tmp.write_bytes(b"new")
        assert link.is_symlink() and os.readlink(link) == str(points_to)
    assert victim.read_text() == "keep"


@pytest.mark.slow
def test_concurrent_commands_to_one_output(tmp_path: Path) -> None:
    torch.save(resnet_tiny().eval(), tmp_path / "full.pt")
    command = [
        shutil.which("condconv-convert"),
        "full.pt",
        "--trust-pickle",
        "--layers",
        "layer4",
        "--no-check",
        "-o",
        "same.pt",
    ]
    runs = [
        subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(run.wait(timeout=300), *run.communicate()) for run in runs]
    assert sorted(status for status, _, _ in results) == [0, 1]
    assert sum("wrote same.pt" in out for _, out, _ in results) == 1
    assert any("already exists" in err for _, _, err in results)


# 6: user-controlled text is never rich markup.


@pytest.mark.slow
def test_markup_in_module_names_and_paths_is_printed_as_text(tmp_path: Path) -> None:
    folder = tmp_path / "in[" / "]put"  # the path reads in[/]put, a rich closing tag
    folder.mkdir(parents=True)
    (tmp_path / "markup_arch.py").write_text(MARKUP_ARCH)
    result = run_script(
        "python", "-c", "import torch, markup_arch; torch.save(markup_arch.Net(), 'in[/]put/model.pt')", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    result = run_script("condconv-convert", "in[/]put/model.pt", "--trust-pickle", "--layers", "*", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "[/b]" in result.stdout and "[red]x" in result.stdout and "in[/]put/model.pt" in result.stdout
    listed = run_script(
        "condconv-convert", "in[/]put/model.pt", "--trust-pickle", "--list", "--layers", "*", cwd=tmp_path
    )
    assert listed.returncode == 0 and "convs.[/b]" in listed.stdout


MARKUP_ARCH = """
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleDict({"[/b]": nn.Conv2d(3, 4, 3, padding=1), "[red]x": nn.Conv2d(4, 4, 1)})

    def forward(self, x):
        return self.convs["[red]x"](self.convs["[/b]"](x))
"""


# 7: a DDP-wrapped model is refused, before anything changes.


def test_ddp_wrapped_model_is_refused(tmp_path: Path) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(resnet_tiny())
        with pytest.raises(
            ValueError, match=r"wrapped in DistributedDataParallel.*convert the inner model \(ddp.module\) first"
        ):
            convert(wrapped, "layer4")
        assert not any(isinstance(m, CondConv2d) for m in wrapped.modules())
    finally:
        torch.distributed.destroy_process_group()


# Questionable items: stale temporaries, SIGTERM, byte-identical outputs, modes, closed stdout, zip bombs, seeds.


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    dead = _dead_pid()
    stale = tmp_path / f".out.pt.{dead}.0123abcd.condconv-tmp"
    live = tmp_path / f".out.pt.{os.getpid()}.4567cdef.condconv-tmp"
    stale.write_bytes(b"x" * 100)
    live.write_bytes(b"y")
    warns = pytest.warns(UserWarning, match=r"removed 1 temporary file\(s\) left by an interrupted write")
    with warns, atomic_write(tmp_path / "out.pt") as tmp:
        tmp.write_bytes(b"done")
    assert not stale.exists() and live.exists() and (tmp_path / "out.pt").read_bytes() == b"done"


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.mark.parametrize(
    ("signum", "status", "message"),
    [(signal.SIGTERM, 143, "terminated (SIGTERM)"), (signal.SIGINT, 130, "interrupted")],
    ids=["SIGTERM", "SIGINT"],
)
@pytest.mark.parametrize("inside_the_writer", [False, True], ids=["after-the-write", "inside-the-writer"])
def test_a_signal_during_the_write_removes_the_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, signum, status, message, inside_the_writer: bool
) -> None:
    from condconv_lightning.cli.convert import main

    torch.save(resnet_tiny().eval(), tmp_path / "full.pt")
    real_save = torch.save

    def save_then_signal(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # the bytes are on disk, under a temporary name
        try:
            os.kill(os.getpid(), signum)
        except BaseException as error:
            if inside_the_writer:  # torch's C++ writer turns what its callback raised into a RuntimeError
                raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from error
            raise

    monkeypatch.setattr(torch, "save", save_then_signal)
    monkeypatch.chdir(tmp_path)
    code = main(["full.pt", "--trust-pickle", "--layers", "layer4", "--no-check", "-o", "out.pt"])
    assert code == status and f"{message}; nothing was written" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["full.pt"]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_outputs_are_byte_identical_and_get_the_umask_mode(tmp_path: Path, suffix: str) -> None:
    model = resnet_tiny()
    convert(model, "layer4", seed=0)
    old = os.umask(0o022)
    try:
        first = save_converted(model, tmp_path / f"a{suffix}")
        second = save_converted(model, tmp_path / f"b{suffix}")
    finally:
        os.umask(old)
    assert first.read_bytes() == second.read_bytes()
    assert {first.stat().st_mode & 0o777, second.stat().st_mode & 0o777} == {0o644}


@pytest.mark.slow
def test_closed_stdout_reports_the_written_file_truthfully(tmp_path: Path) -> None:
    torch.save(resnet_tiny().eval(), tmp_path / "full.pt")
    read, write = os.pipe()
    os.close(read)  # `... --json | true`: nobody reads the output
    try:
        result = subprocess.run(
            [
                shutil.which("condconv-convert"),
                "full.pt",
                "--trust-pickle",
                "--layers",
                "layer4",
                "--json",
                "-o",
                "out.pt",
            ],
            cwd=tmp_path,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    finally:
        os.close(write)
    assert result.returncode == 1
    assert "standard output was closed" in result.stderr and "out.pt was written before that" in result.stderr
    assert "Traceback" not in result.stderr and (tmp_path / "out.pt").is_file()


def test_zip_bomb_is_refused_before_it_inflates(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\0" * (64 * 2**20))
    assert bomb.stat().st_size < 2**20
    with pytest.raises(UnsafeFileError, match=r"inflates from \d+ to 67108864 bytes; torch.save never compresses"):
        load_weights_only(bomb)
    result = run_script("condconv-convert", "bomb.pt", "--layers", "x", cwd=tmp_path)
    assert result.returncode == 1 and "zip bomb" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_many_records_each_under_the_limit_are_a_zip_bomb_together(tmp_path: Path) -> None:
    bomb = tmp_path / "many.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for index in range(64):  # each 1 MiB: no single record is over the limit
            archive.writestr(f"archive/data/{index}", b"\0" * 2**20)
    with pytest.raises(UnsafeFileError, match=r"its 64 compressed records inflate from \d+ to 67108864 bytes"):
        load_weights_only(bomb)


def test_a_spec_cannot_make_a_layer_larger_than_its_weights(tmp_path: Path) -> None:
    """The weights' expert count matches the spec's, but each expert is far smaller than the layer's:
    loading would allocate K full-size experts before the weights are found not to fit."""
    model = resnet_tiny()
    report = convert(model, "layer4.0.conv2", num_experts=4)
    state = {**model.state_dict(), "layer4.0.conv2.weight": torch.zeros(4096, 1)}
    spec = json.loads(report.spec.to_json())
    spec["layers"]["layer4.0.conv2"]["num_experts"] = 4096
    path = tmp_path / "huge.pt"
    torch.save({"format": "condconv_lightning.converted/1", "spec": json.dumps(spec), "state_dict": state}, path)
    with pytest.raises(ValueError, match=r"shape \[4096, 1\] for it \(expected \[4096, 147456\]\)"):
        load_converted(path, resnet_tiny())


@pytest.mark.parametrize("seed", [str(2**70), "-1"])
def test_out_of_range_seed_is_a_usage_error(tmp_path: Path, seed: str, capsys) -> None:
    from condconv_lightning.cli.convert import main

    with pytest.raises(SystemExit) as info:
        main(["model.pt", "--layers", "x", "--seed", seed])
    assert info.value.code == 2 and "seed must be an integer in [0, 2**63)" in capsys.readouterr().err


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


@pytest.mark.parametrize(
    "header",
    [
        {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},  # 3 floats in 8 bytes
        {"w": {"dtype": "XYZ", "shape": [2], "data_offsets": [0, 8]}},
        {"__metadata__": {"a": 1}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        },
    ],
    ids=["short-data", "unknown-dtype", "metadata-not-text", "overlapping"],
)
def test_a_crafted_safetensors_header_is_one_clear_line(tmp_path: Path, header: dict) -> None:
    from condconv_lightning.io import load_state_dict
    from condconv_lightning.loading import ModelFileError, load_model

    path = tmp_path / "crafted.safetensors"
    path.write_bytes(safetensors_bytes(header, b"\0" * 8))
    with pytest.raises(
        ValueError, match=r"cannot read .*crafted.safetensors as a safetensors file \(.*\); it is corrupted$"
    ):
        load_state_dict(path)
    with pytest.raises(ModelFileError, match=r"as a safetensors file") as info:
        load_model(path, arch="resnet_tiny")
    assert "\n" not in str(info.value)


def test_files_are_read_by_their_bytes_not_their_suffix(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from condconv_lightning.io import load_state_dict
    from condconv_lightning.loading import load_model

    state = resnet_tiny().state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "safetensors.pt")
    torch.save(state, tmp_path / "torch.safetensors")  # torch.load itself would read this as safetensors
    for name in ("safetensors.pt", "torch.safetensors"):
        loaded = load_state_dict(tmp_path / name)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
        assert load_model(tmp_path / name, arch="resnet_tiny").holds.startswith("state dict")


def test_a_damaged_pickle_is_unreadable_without_advice_to_unpickle_it(tmp_path: Path) -> None:
    from condconv_lightning.loading import ModelFileError, load_model

    path = tmp_path / "damaged.pt"
    torch.save(resnet_tiny().state_dict(), path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        record = next(info for info in archive.infolist() if info.filename.endswith("data.pkl"))
    data[record.header_offset + 30 + len(record.filename) + 84] ^= 0x55  # inside the stored pickle
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"cannot read .*damaged.pt \(.*\); it is truncated or corrupted$") as info:
        load_model(path, arch="resnet_tiny")
    assert "weights_only=False" not in str(info.value) and "\x1b" not in str(info.value)


def test_a_spec_nested_beyond_pythons_stack_is_invalid_json() -> None:
    with pytest.raises(ValueError, match="conversion spec is not valid JSON"):
        ConversionSpec.from_json("[" * 100_000 + "]" * 100_000)
