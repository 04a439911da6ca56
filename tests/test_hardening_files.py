"""Files in and out: outputs are regular files, failed writes leave nothing, names from files print as text,
formats are told apart by their bytes within the bytes the file holds, and what a file sets is checked.

Each test plays the attacker or the unlucky user: ``--force`` aimed at a device or a FIFO, a legal but
long output name, a full disk, escape sequences in state-dict keys, a safetensors header whose length
starts with the pickle opcode, a 20-byte pickle declaring a 2**62-byte string, a NaN temperature in
a state dict, a spec that names one layer under a hundred aliases.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from console_scripts import run_script
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from condconv_lightning.demos import resnet_tiny
from condconv_lightning.functional import save_tuning_cache
from condconv_lightning.io import OutputPathError, WriteError, atomic_write, save_state_dict
from condconv_lightning.surgery import convert, save_converted


def run_convert(*args: object, cwd: Path, limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    """The installed console script; ``limit_bytes`` caps the size of every file it writes
    (``RLIMIT_FSIZE``, with ``SIGXFSZ`` ignored: a write past it fails with ``EFBIG``, as on a full disk)."""
    limit = None if limit_bytes is None else lambda: _limit_file_size(limit_bytes)
    return run_script("condconv-convert", *args, cwd=cwd, preexec_fn=limit)


def _limit_file_size(limit_bytes: int) -> None:
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))


def listing(folder: Path) -> dict[str, bytes | str]:
    """What a folder holds: each regular file's bytes, and the kind of everything else."""
    return {
        entry.name: entry.read_bytes()
        if entry.is_file() and not entry.is_symlink()
        else stat.filemode(entry.lstat().st_mode)
        for entry in sorted(folder.iterdir())
    }


# Outputs are regular files: --force replaces a regular file or a symlink, nothing else.


def make_special(path: Path, kind: str) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        cwd = os.getcwd()
        os.chdir(path.parent)  # a socket path is limited to 108 bytes; its name alone fits
        try:
            server.bind(path.name)
        finally:
            os.chdir(cwd)
            server.close()
    elif kind == "device":
        if os.geteuid() != 0:
            pytest.skip("creating a device node needs root")
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # what /dev/null is
    else:
        path.mkdir()


SPECIAL_KINDS = {
    "fifo": "FIFO (named pipe)",
    "socket": "socket",
    "device": "character device",
    "directory": "directory",
}


@pytest.mark.parametrize("kind", list(SPECIAL_KINDS))
def test_overwrite_never_replaces_a_device_fifo_socket_or_folder(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "out.pt"
    make_special(target, kind)
    before = listing(tmp_path)
    model = resnet_tiny()
    convert(model, "layer4")
    for write in (
        lambda: save_converted(model, target, overwrite=True),
        lambda: save_state_dict(model.state_dict(), target, overwrite=True),
        lambda: save_tuning_cache(target),  # replaces its file without being asked
    ):
        with pytest.raises(
            (OutputPathError, IsADirectoryError), match=re.escape(f"out.pt is a {SPECIAL_KINDS[kind]}")
        ) as info:
            write()
        assert "\n" not in str(info.value)
    assert listing(tmp_path) == before


@pytest.mark.slow
def test_force_on_the_command_line_never_replaces_a_device_or_fifo(tmp_path: Path) -> None:
    torch.save(resnet_tiny().state_dict(), tmp_path / "weights.pt")
    kinds = ["fifo", "socket"] + (["device"] if os.geteuid() == 0 else [])
    for kind in kinds:
        make_special(tmp_path / f"{kind}.pt", kind)
    before = listing(tmp_path)
    for kind in kinds:
        result = run_convert(
            "weights.pt", "--arch", "resnet_tiny", "--layers", "layer4", "-o", f"{kind}.pt", "--force", cwd=tmp_path
        )
        message = result.stderr.strip()
        assert result.returncode == 1 and len(message.splitlines()) == 1, message
        assert f"-o: {kind}.pt is a {SPECIAL_KINDS[kind]}, not a regular file" in message
    assert listing(tmp_path) == before


def test_overwrite_replaces_a_symlink_itself_never_its_target(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, points_to in (("to-file", victim), ("to-folder", folder), ("dangling", tmp_path / "missing")):
        link = tmp_path / name
        link.symlink_to(points_to)
        with atomic_write(link, overwrite=True) as tmp:
            tmp.write_bytes(b"new")
        assert not link.is_symlink() and link.read_bytes() == b"new"
    assert victim.read_text() == "keep" and list(folder.iterdir()) == []


def test_a_long_legal_output_name_is_written_and_its_temporaries_found_again(tmp_path: Path) -> None:
    """237 characters fit in a file name; its temporary name must too, and a write killed before it
    finished (no cleanup ran) must be recognized and removed by the next write to that name."""
    target = tmp_path / ("m" * 234 + ".pt")
    assert len(target.name) == 237
    model = resnet_tiny()
    convert(model, "layer4")
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sys\n"
            "from condconv_lightning.io import atomic_write\n"
            "with atomic_write(sys.argv[1]) as tmp:\n"
            "    tmp.write_bytes(b'partial')\n"
            "    os._exit(0)  # as SIGKILL: no cleanup runs\n",
            str(target),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == 0, killed.stderr
    (leftover,) = [entry for entry in tmp_path.iterdir()]
    assert leftover.name.endswith(".condconv-tmp") and len(os.fsencode(leftover.name)) <= 255
    with pytest.warns(UserWarning, match=r"removed 1 temporary file\(s\) left by an interrupted write"):
        save_converted(model, target)
    assert [entry.name for entry in tmp_path.iterdir()] == [target.name]
    with pytest.raises(FileExistsError, match="already exists"):
        save_converted(model, target)


def test_temporaries_of_a_shortened_name_belong_to_that_name_only(tmp_path: Path) -> None:
    """Two long names that share their first 221 bytes get different shortened temporaries."""
    first, second = tmp_path / ("n" * 240 + "a.pt"), tmp_path / ("n" * 240 + "b.pt")
    for target in (first, second):
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import os, sys\nfrom condconv_lightning.io import atomic_write\n"
                "with atomic_write(sys.argv[1]):\n    os._exit(0)\n",
                str(target),
            ],
            check=True,
            timeout=120,
        )
    for target in (first, second):
        with pytest.warns(UserWarning, match=r"removed 1 temporary file"), atomic_write(target) as tmp:
            tmp.write_bytes(target.name.encode())
    assert listing(tmp_path) == {first.name: first.name.encode(), second.name: second.name.encode()}


@pytest.mark.parametrize("name", ["x" * 253 + ".pt", "é" * 126 + "x.pt"], ids=["256 characters", "256 bytes"])
def test_a_name_longer_than_the_file_system_allows_fails_first_in_one_line(tmp_path: Path, name: str) -> None:
    model = resnet_tiny()
    with pytest.raises(OutputPathError, match=r"is 256 bytes long; this file system allows 255: choose a shorter name"):
        save_converted(model, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_name_too_long_is_reported_before_the_input_is_read(tmp_path: Path) -> None:
    result = run_convert("missing.pt", "--layers", "layer4", "-o", "é" * 126 + "x.pt", cwd=tmp_path)
    message = result.stderr.strip()
    assert result.returncode == 1 and len(message.splitlines()) == 1 and "256 bytes long" in message, message
    assert "no such file" not in message and list(tmp_path.iterdir()) == []


def test_a_temporary_file_with_an_impossible_process_id_does_not_stop_writes(tmp_path: Path) -> None:
    planted = tmp_path / f".out.pt.{10**20}.0123abcd.condconv-tmp"  # os.kill cannot take such a number
    planted.write_bytes(b"x")
    with pytest.warns(UserWarning, match="removed 1 temporary file"), atomic_write(tmp_path / "out.pt") as tmp:
        tmp.write_bytes(b"done")
    assert listing(tmp_path) == {"out.pt": b"done"}


# A failed write is one line naming the output, and nothing was written.

WRITERS = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from condconv_lightning.demos import resnet_tiny
    from condconv_lightning.io import WriteError, save_state_dict
    from condconv_lightning.surgery import convert, save_converted

    model = resnet_tiny()
    convert(model, "layer4")
    writes = {
        "save_converted.pt": lambda path, force: save_converted(model, path, overwrite=force),
        "save_converted.safetensors": lambda path, force: save_converted(model, path, overwrite=force),
        "as_module.pt": lambda path, force: save_converted(model, path, as_module=True, overwrite=force),
        "save_state_dict.pt": lambda path, force: save_state_dict(model.state_dict(), path, overwrite=force),
        "save_state_dict.safetensors": lambda path, force: save_state_dict(model.state_dict(), path, overwrite=force),
    }
    results = {}
    for name, write in writes.items():
        path = Path(sys.argv[1]) / name
        try:
            write(path, path.exists())
            results[name] = "written"
        except WriteError as error:
            results[name] = [str(error), error.errno]
    print(json.dumps(results))
    """
)


def run_writers(folder: Path, limit_bytes: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", WRITERS, str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: _limit_file_size(limit_bytes),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("existing", [False, True], ids=["new output", "replacing an output"])
def test_a_write_past_the_file_size_limit_is_one_line_and_leaves_nothing(tmp_path: Path, existing: bool) -> None:
    old = {}
    if existing:
        for name in (
            "save_converted.pt",
            "save_converted.safetensors",
            "as_module.pt",
            "save_state_dict.pt",
            "save_state_dict.safetensors",
        ):
            (tmp_path / name).write_bytes(b"the previous output")
        old = listing(tmp_path)
    results = run_writers(tmp_path, limit_bytes=50_000)  # resnet_tiny's files are ~10x larger
    for name, outcome in results.items():
        assert outcome != "written", name
        message, code = outcome
        assert code == 27  # EFBIG
        assert message.startswith(f"cannot write {tmp_path / name} (File too large); nothing was written: ")
        assert "\n" not in message and "inline_container" not in message
    assert listing(tmp_path) == old  # no temporary file left, every replaced output as it was


@pytest.mark.slow
def test_a_full_disk_on_the_command_line_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    torch.save(resnet_tiny().state_dict(), tmp_path / "weights.pt")
    (tmp_path / "out.pt").write_bytes(b"the previous output")
    before = listing(tmp_path)
    for output in ("out.pt", "out.safetensors"):
        result = run_convert(
            "weights.pt",
            "--arch",
            "resnet_tiny",
            "--layers",
            "layer4",
            "-o",
            output,
            "--force",
            cwd=tmp_path,
            limit_bytes=(tmp_path / "weights.pt").stat().st_size // 2,
        )
        message = result.stderr.strip()
        assert result.returncode == 1 and len(message.splitlines()) == 1, message
        assert message.startswith(
            f"condconv-convert: error: cannot write {output} (File too large); nothing was written"
        )
        assert "unexpected" not in message and "inline_container" not in message
    assert listing(tmp_path) == before


@pytest.fixture()
def small_disk(tmp_path: Path):
    """A 256 KiB tmpfs: a real ENOSPC (needs the right to mount, as root in a container has)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_is_one_line_naming_the_output(small_disk: Path) -> None:
    model = resnet_tiny()  # ~0.7 MB of weights: more than the disk holds
    for name in ("out.pt", "out.safetensors"):
        with pytest.raises(
            WriteError, match=rf"cannot write .*{name} \(No space left on device\); nothing was written"
        ):
            save_state_dict(model.state_dict(), small_disk / name)
    assert list(small_disk.iterdir()) == []


# Formats are told apart by their bytes, safetensors by its header before any pickle opcode.


def safetensors_file(path: Path, header_size: int) -> dict[str, torch.Tensor]:
    """A real safetensors file (written by safetensors) whose header is ``header_size`` bytes long
    (a multiple of 8, as safetensors pads it), padded through its metadata."""
    from safetensors.torch import save_file

    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    save_file(tensors, path, metadata={"pad": ""})
    pad = header_size - int.from_bytes(path.read_bytes()[:8], "little")
    assert pad >= 0 and pad % 8 == 0, pad
    save_file(tensors, path, metadata={"pad": "p" * pad})
    assert int.from_bytes(path.read_bytes()[:8], "little") == header_size
    return tensors


def assert_read_as_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from condconv_lightning.formats import FileFormat, detect_format
    from condconv_lightning.io import load_state_dict

    assert detect_format(path).format is FileFormat.SAFETENSORS
    loaded = load_state_dict(path)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("residue", range(0, 256, 8))
def test_safetensors_is_recognized_whatever_its_header_length(tmp_path: Path, residue: int) -> None:
    """Every header length modulo 256 that safetensors writes; 128 starts the file with pickle's PROTO byte."""
    path = tmp_path / "w.safetensors"
    tensors = safetensors_file(path, 256 + residue)
    assert (path.read_bytes()[0] == 0x80) == (residue == 128)
    assert_read_as_safetensors(path, tensors)


@given(blocks=st.integers(min_value=12, max_value=2000))
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_safetensors_of_any_header_length_is_detected_and_loads(tmp_path: Path, blocks: int) -> None:
    path = tmp_path / f"{blocks}.pt"  # the suffix says nothing: the bytes do
    tensors = safetensors_file(path, 8 * blocks)
    assert_read_as_safetensors(path, tensors)


plain_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@given(value=plain_values, protocol=st.integers(min_value=0, max_value=5))
@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_pickles_are_never_mistaken_for_safetensors(tmp_path: Path, value: object, protocol: int) -> None:
    import pickle

    from condconv_lightning.formats import FileFormat, ModelFileError, detect_format

    path = tmp_path / "value.pt"
    path.write_bytes(pickle.dumps(value, protocol=protocol))
    try:
        detected = detect_format(path)
    except ModelFileError as error:
        assert "safetensors file (" not in str(error) and "truncated safetensors" not in str(error)
    else:
        assert detected.format is not FileFormat.SAFETENSORS


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_files_are_never_mistaken_for_safetensors(tmp_path: Path, legacy: bool) -> None:
    from condconv_lightning.formats import FileFormat, detect_format

    for size in range(0, 300, 7):
        path = tmp_path / f"{size}.safetensors"
        torch.save({"w": torch.zeros(size), "pad": "x" * size}, path, _use_new_zipfile_serialization=not legacy)
        expected = FileFormat.TORCH_LEGACY if legacy else FileFormat.TORCH_ZIP
        assert detect_format(path).format is expected


# Declared lengths are checked against the bytes the file holds before anything is read.

HUGE = 2**62
DECLARING_PICKLES = {
    # opcode, then a declared length the file does not hold
    "BINUNICODE8": b"\x80\x04\x8d" + HUGE.to_bytes(8, "little") + b"abcdefgh.",
    "BINBYTES8": b"\x80\x04\x8e" + HUGE.to_bytes(8, "little") + b"abcdefgh.",
    "BYTEARRAY8": b"\x80\x05\x96" + HUGE.to_bytes(8, "little") + b"abcdefgh.",
    "BINUNICODE": b"\x80\x02X" + (2**32 - 1).to_bytes(4, "little") + b"abcdefgh.",
    "LONG4": b"\x80\x02\x8b" + (2**31 - 1).to_bytes(4, "little") + b"abcdefgh.",
}


def legacy_torch_file(path: Path, object_pickle: bytes) -> None:
    """torch's legacy layout: magic number, protocol, system info, then ``object_pickle``."""
    import pickle

    header = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    path.write_bytes(
        pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
        + pickle.dumps(1001, protocol=2)
        + pickle.dumps(header, protocol=2)
        + object_pickle
    )


@pytest.mark.parametrize("opcode", list(DECLARING_PICKLES))
@pytest.mark.parametrize("where", ["alone", "legacy torch file", "zip data.pkl"])
def test_a_declared_length_beyond_the_file_is_refused_before_it_is_read(
    tmp_path: Path, opcode: str, where: str
) -> None:
    import zipfile

    from condconv_lightning.formats import ModelFileError, detect_format, pickled_globals
    from condconv_lightning.loading import load_model

    payload = DECLARING_PICKLES[opcode]
    path = tmp_path / "declares.pt"
    if where == "alone":
        path.write_bytes(payload)
    elif where == "legacy torch file":
        legacy_torch_file(path, payload)
    else:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", payload)
    assert path.stat().st_size < 400
    if where == "zip data.pkl":
        assert pickled_globals(detect_format(path)) == []  # the opcodes before the lie, none of them global
    else:
        with pytest.raises(ModelFileError, match=r"declares.pt is a truncated or corrupted pickle"):
            detect_format(path)
    with pytest.raises(ModelFileError, match=r"truncated or corrupted") as info:
        load_model(path, arch="resnet_tiny")
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_a_20_byte_pickle_declaring_an_exabyte_is_one_line_on_the_command_line(tmp_path: Path) -> None:
    (tmp_path / "tiny.pt").write_bytes(DECLARING_PICKLES["BINUNICODE8"])
    result = run_convert("tiny.pt", "--layers", "layer4", cwd=tmp_path)
    message = result.stderr.strip()
    assert result.returncode == 1 and message.splitlines() == [message], message
    assert "tiny.pt is a truncated or corrupted pickle" in message and "MemoryError" not in message


@pytest.mark.parametrize("kind", ["fifo", "socket", "device"])
def test_only_regular_files_are_read(tmp_path: Path, kind: str) -> None:
    """A FIFO named like a model would block the reader forever; a device is never opened."""
    from condconv_lightning.formats import ModelFileError, detect_format
    from condconv_lightning.io import load_state_dict

    path = tmp_path / "model.pt"
    make_special(path, kind)
    for read in (detect_format, load_state_dict):
        with pytest.raises(ModelFileError, match=rf"model.pt is a {re.escape(SPECIAL_KINDS[kind])}, not a regular"):
            read(path)


# The temperature a file brings is checked as the argument is.

BAD_TEMPERATURES = [0.0, -1.0, float("inf"), float("nan")]


@pytest.mark.parametrize("value", BAD_TEMPERATURES, ids=["zero", "negative", "inf", "nan"])
def test_a_temperature_from_a_file_is_checked_before_the_layer_changes(tmp_path: Path, value: float) -> None:
    from condconv_lightning import CondConv2d, load_converted

    model = resnet_tiny()
    report = convert(model, "layer4")
    state = model.state_dict()
    key = "layer4.0.conv1.temperature"
    target = resnet_tiny()
    convert(target, "layer4")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=rf"state dict entry '{key}': temperature must be a positive finite number"):
        target.load_state_dict({**state, key: torch.tensor(value)})
    layer = target.get_submodule("layer4.0.conv1")
    assert isinstance(layer, CondConv2d)
    assert all(torch.equal(v, before[f"layer4.0.conv1.{k}"]) for k, v in layer.state_dict().items())

    state[key].fill_(value)  # as a file would hold it
    path = tmp_path / "bad.pt"  # as save_converted writes it, the spec saying 1.0 and the buffer not
    torch.save({"format": "condconv_lightning.converted/1", "spec": report.spec.to_json(), "state_dict": state}, path)
    fresh = resnet_tiny()
    with pytest.raises(ValueError, match=rf"'{key}': temperature must be a positive finite number"):
        load_converted(path, fresh)
    assert not any(isinstance(m, CondConv2d) for m in fresh.modules())  # left as it was


def test_a_lightning_checkpoint_with_a_nan_temperature_is_refused(tmp_path: Path) -> None:
    from condconv_lightning.finetune import ImageClassifier

    module = ImageClassifier(num_classes=4)
    convert(module.model, "layer4")
    checkpoint = {
        "state_dict": {**module.state_dict(), "model.layer4.0.conv2.temperature": torch.tensor(float("nan"))},
        "hyper_parameters": {"num_classes": 4},
        "pytorch-lightning_version": "2.6.6",
    }
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "nan.ckpt")
    with pytest.raises(ValueError, match=r"'model.layer4.0.conv2.temperature': temperature must be a positive"):
        ImageClassifier.load_from_checkpoint(tmp_path / "nan.ckpt")


def test_a_valid_temperature_still_loads_in_any_dtype() -> None:
    from condconv_lightning import CondConv2d

    layer = CondConv2d(4, 4, 3, num_experts=2)
    for value in (torch.tensor(0.5), torch.tensor(3), torch.tensor(2.0, dtype=torch.bfloat16)):
        layer.load_state_dict({**layer.state_dict(), "temperature": value})
        assert float(layer.temperature) == float(value)


# A spec that names one layer under many aliases builds it once.


def test_a_spec_listing_one_layer_under_a_hundred_aliases_builds_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from condconv_lightning import CondConv2d, load_converted

    model = resnet_tiny()
    report = convert(model, "layer4.0.conv2", num_experts=4)
    spec = json.loads(report.spec.to_json())
    options = spec["layers"]["layer4.0.conv2"]
    spec["layers"] = {"module." * i + "_orig_mod." * (i % 2) + "layer4.0.conv2": options for i in range(100)}
    path = tmp_path / "aliases.pt"
    torch.save(
        {"format": "condconv_lightning.converted/1", "spec": json.dumps(spec), "state_dict": model.state_dict()}, path
    )
    built = []
    real_init = CondConv2d.__init__

    def counting_init(self, *args, **kwargs):
        built.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(CondConv2d, "__init__", counting_init)
    loaded = load_converted(path, resnet_tiny())
    assert len(built) == 1
    assert [name for name, m in loaded.named_modules() if isinstance(m, CondConv2d)] == ["layer4.0.conv2"]


def test_aliases_of_a_shared_layer_with_different_options_are_one_line() -> None:
    import torch.nn as nn

    from condconv_lightning import apply_spec
    from condconv_lightning.surgery import ConversionSpec, LayerOptions

    shared = nn.Conv2d(3, 3, 3, padding=1)
    model = nn.Sequential(shared, nn.ReLU(), shared)  # one conv at the paths 0 and 2
    spec = ConversionSpec(
        layers={"0": LayerOptions(4, "sigmoid", 1.0, "auto"), "2": LayerOptions(2, "sigmoid", 1.0, "auto")}
    )
    with pytest.raises(ValueError, match=r"spec layers '0' and '2' name the same layer with different options; keep"):
        apply_spec(model, spec)
    assert model[0] is shared and model[2] is shared
    same = ConversionSpec(
        layers={"0": LayerOptions(4, "sigmoid", 1.0, "auto"), "2": LayerOptions(4, "sigmoid", 1.0, "auto")}
    )
    apply_spec(model, same)
    assert model[0] is model[2] and model[0].num_experts == 4


# Names from files print as text: control characters and bidi overrides are escaped in every message.

HOSTILE = "\x1b]0;owned\x07\x1b[2J\rfake prompt$ \x00\u202etxt.exe"
ESCAPED = "\\x1b]0;owned\\x07\\x1b[2J\\rfake prompt$ \\x00\\u202etxt.exe"
RAW = ("\x1b", "\x07", "\r", "\x00", "\u202e")


def test_printable_escapes_controls_and_bidi_overrides_only() -> None:
    from condconv_lightning.loading import one_line
    from condconv_lightning.messages import name_list, printable

    assert printable(HOSTILE) == ESCAPED
    assert printable("layer3.0.conv1 é 名前 \\x1b") == "layer3.0.conv1 é 名前 \\x1b"  # printable text stays
    assert printable(printable(HOSTILE)) == ESCAPED
    joined = ESCAPED.replace("\\r", " ")  # one_line joins lines, and \r ends one
    assert one_line(ValueError(f"bad key {HOSTILE}\nsecond line")) == f"ValueError: bad key {joined} second line"
    assert name_list([HOSTILE, "b", "c", "d"]) == f"{ESCAPED}, b, c and 1 more"


def unicode_op(text: str) -> bytes:
    """Pickle's BINUNICODE opcode pushing ``text``."""
    data = text.encode("utf-8", "surrogatepass")
    return b"X" + len(data).to_bytes(4, "little") + data


def hostile_files(folder: Path) -> None:
    import zipfile

    state = resnet_tiny().state_dict()
    torch.save({**state, f"{HOSTILE}.weight": torch.zeros(1)}, folder / "keys.pt")
    torch.save({}, folder / "empty.pt")  # a real torch archive, its data.pkl replaced: unpickling imports a name
    with zipfile.ZipFile(folder / "empty.pt") as source, zipfile.ZipFile(folder / "global.pt", "w") as archive:
        for info in source.infolist():
            hostile = b"\x80\x04" + unicode_op(HOSTILE) + unicode_op("name") + b"\x93)R."  # STACK_GLOBAL
            archive.writestr(info, hostile if info.filename.endswith("/data.pkl") else source.read(info))
    (folder / "empty.pt").unlink()


def test_names_from_files_reach_python_errors_escaped(tmp_path: Path) -> None:
    from condconv_lightning.loading import ModelFileError, load_model, load_pretrained

    hostile_files(tmp_path)
    for read in (
        lambda: load_model(tmp_path / "keys.pt", arch="resnet_tiny"),
        lambda: load_pretrained(tmp_path / "keys.pt", resnet_tiny()),
        lambda: load_model(tmp_path / "global.pt"),
    ):
        with pytest.raises(ModelFileError) as info:
            read()
        message = str(info.value)
        assert not any(char in message for char in RAW), message
        assert "\\x1b]0;owned\\x07" in message


@pytest.mark.slow
def test_names_from_files_reach_the_terminal_escaped(tmp_path: Path) -> None:
    hostile_files(tmp_path)
    runs = [
        run_convert("keys.pt", "--arch", "resnet_tiny", "--layers", "layer4", cwd=tmp_path),
        run_convert("global.pt", "--layers", "layer4", cwd=tmp_path),
    ]
    for result in runs:
        message = result.stderr.strip()
        assert result.returncode == 1 and len(message.splitlines()) == 1, message
        assert not any(char in result.stderr for char in RAW) and "\\x1b]0;owned\\x07" in message, message


def test_a_legacy_file_declaring_more_tensor_bytes_than_it_holds_is_refused_before_torch_allocates(
    tmp_path: Path,
) -> None:
    """torch's legacy reader allocates each storage at the size its pickle declares, then reads it:
    a 350-byte file declaring 2**30 floats would take 4 GiB."""
    from condconv_lightning.formats import ModelFileError, detect_format
    from condconv_lightning.loading import load_model

    path = tmp_path / "legacy.pt"
    torch.save(torch.zeros(77), path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    assert data.count(b"KMNt") == 1  # BININT1 77 (the storage's numel), NONE, TUPLE: the persistent id's end
    path.write_bytes(data.replace(b"KMNt", b"J" + (2**30).to_bytes(4, "little") + b"Nt"))
    with pytest.raises(ModelFileError, match=r"declares 4294967296 bytes of tensors but holds \d+ bytes"):
        detect_format(path)
    with pytest.raises(ModelFileError, match=r"declares 4294967296 bytes"):
        load_model(path, arch="resnet_tiny")
    path.write_bytes(data)
    assert detect_format(path).format.name == "TORCH_LEGACY"  # the honest file


@pytest.mark.parametrize("content", ["declares", "truncated"])
def test_an_unreadable_checkpoint_for_finetune_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, content: str
) -> None:
    from condconv_lightning.cli.finetune import main

    checkpoint = tmp_path / "bad.ckpt"
    if content == "declares":
        checkpoint.write_bytes(DECLARING_PICKLES["BINUNICODE8"])
    else:
        torch.save({"state_dict": resnet_tiny().state_dict()}, checkpoint)
        checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
    monkeypatch.chdir(tmp_path)
    arguments = ["fit", "--data", "SyntheticImageDataModule", "--trainer.max_steps", "1", "--trainer.logger", "false"]
    with pytest.raises(SystemExit) as exit_:
        main([*arguments, "--trainer.enable_checkpointing", "false", "--ckpt_path", str(checkpoint)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err[-2000:]
    assert "bad.ckpt" in err.strip().splitlines()[-1] and "corrupted" in err.strip().splitlines()[-1], err[-2000:]


@pytest.mark.slow
def test_a_safetensors_file_whose_header_length_spells_the_zip_magic_is_safetensors(tmp_path: Path) -> None:
    """A 67 MB header (0x04034b50 bytes, a multiple of 8) starts the file with PK\\x03\\x04."""
    path = tmp_path / "big-header.safetensors"
    tensors = safetensors_file(path, 0x04034B50)
    assert path.read_bytes()[:4] == b"PK\x03\x04"
    assert_read_as_safetensors(path, tensors)
