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
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from condconv_lightning.demos import resnet_tiny
from condconv_lightning.functional import save_tuning_cache
from condconv_lightning.io import OutputPathError, WriteError, atomic_write, save_state_dict
from condconv_lightning.surgery import convert, save_converted

CONVERT = shutil.which("condconv-convert")


def run_convert(*args: object, cwd: Path, limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    """The installed console script; ``limit_bytes`` caps the size of every file it writes
    (``RLIMIT_FSIZE``, with ``SIGXFSZ`` ignored: a write past it fails with ``EFBIG``, as on a full disk)."""
    assert CONVERT is not None, "the condconv-convert console script is not installed; run `pip install -e .`"
    env = {k: v for k, v in os.environ.items() if k != "CONDCONV_DEBUG"}
    return subprocess.run(
        [CONVERT, *map(str, args)],
        cwd=cwd,
        env={**env, "COLUMNS": "120"},
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=None if limit_bytes is None else lambda: _limit_file_size(limit_bytes),
    )


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
