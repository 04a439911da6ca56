"""Safe file I/O shared by persistence helpers and the command line.

- Writes are atomic: a temporary file in the target folder, then one atomic step puts
  it in place, so an error, an interrupt or ``SIGTERM`` never leaves a partial file.
  Without ``overwrite`` that step is a hard link (``link(2)`` fails if the name
  exists), so of two concurrent writers exactly one wins and the other gets
  :class:`FileExistsError`; an existing name (a dangling symlink too) is never
  replaced or followed. With it, only a regular file or a symlink (the link, not what it
  points to) is replaced: a device, FIFO, socket or folder never is. Temporary files are
  named ``.<name>.<pid>.<random>.condconv-tmp``, the name cut short (plus a hash of it)
  where the file system's name length limit needs it; a later write to the same path
  removes those whose process is gone (a ``SIGKILL``).
- A failed write (a full disk, a file size limit, an I/O error, found at ``fsync`` at the
  latest) is one :class:`WriteError` naming the output; the temporary file is removed, so
  nothing was written and a file being replaced is left as it was.
- A writer may check what it wrote before the file takes its name (``verify``: load it back,
  run it): a file that fails the check is removed like a failed write, so no output is ever
  one that was not checked.
- ``torch.save`` output is byte-identical for identical objects (:func:`torch_save`).
- Loading is weights-only through one function (:func:`load_weights_only`); trusted
  pickles load through :func:`load_trusted_pickle` only. Both, and :func:`load_state_dict`,
  take a file as :func:`~condconv_lightning.formats.detect_format` found it (a path is
  detected first): its format decided once from its bytes, its declared lengths checked
  against its size, zip bombs (compressed records that inflate far beyond their size;
  ``torch.save`` never compresses) refused. Wrapper prefixes of state dict keys
  (``module.``, ``_orig_mod.``) are stripped (:mod:`condconv_lightning.wrappers`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import stat
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO

import torch
from torch import Tensor

from .formats import (
    DetectedFile,
    FileFormat,
    ModelFileError,
    check_not_zip_bomb,
    detect_format,
)
from .formats import (
    UnsafeFileError as UnsafeFileError,  # raised by the loaders below; callers catch it from here
)
from .messages import printable
from .wrappers import strip_keys

PathLike = str | os.PathLike
Verify = Callable[[Path], None]
"""Checks a written file (given its temporary path) before it takes its name; raises if it is wrong."""
SAFETENSORS_SUFFIXES: tuple[str, ...] = (".safetensors",)
TEMP_SUFFIX = ".condconv-tmp"
DEFAULT_NAME_MAX = 255
TEMP_NAME_OVERHEAD = len(f"..{2**32}.{'0' * 8}{TEMP_SUFFIX}")
"""Bytes a temporary name adds to its tag: dots, a process id (up to 10 digits), 8 hex digits, the suffix."""


@contextlib.contextmanager
def atomic_write(path: PathLike, *, overwrite: bool = False, verify: Verify | None = None) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success move it to ``path`` in one atomic step.

    ``overwrite`` replaces a regular file or a symlink (the link itself, never what it points to);
    a directory, device, FIFO or socket at ``path`` is never replaced. The file is synced to disk
    before it takes the name, so a full disk found late (at ``fsync``) still leaves nothing.
    ``verify`` is then called with the temporary path; what it raises propagates as it is, and
    nothing is written.

    Raises:
        FileExistsError: ``path`` exists (or another writer created it meanwhile) and
            ``overwrite`` is False.
        OutputPathError, FileNotFoundError, PermissionError: see :func:`check_writable`.
        WriteError: writing failed (a full disk, a file size limit, an I/O error); nothing was written.
    """
    target = check_writable(path, overwrite=overwrite)
    _remove_stale_temporaries(target)
    tmp = target.parent / _temporary_name(target)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    try:
        try:
            yield tmp
            _sync(tmp)  # while the file is still ours alone to read (mode 0600)
        except Exception as error:  # interrupts (BaseException) pass as they are
            failure = _os_error_in(error)
            if failure is None:
                raise
            raise WriteError(target, failure) from error
        if verify is not None:
            verify(tmp)  # likewise
        try:
            # writers (safetensors among them) may create the file with their own mode: give it open()'s
            os.chmod(tmp, 0o666 & ~_umask())
        except OSError as error:
            raise WriteError(target, error) from error
        if overwrite:
            _check_replaceable(target)  # again: the work before this may have taken minutes
            os.replace(tmp, target)
        else:
            _link_exclusively(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def check_writable(path: PathLike, *, overwrite: bool = False) -> Path:
    """``path`` if a file can be written there now: the checks :func:`atomic_write` makes first.

    Raises:
        OutputPathError: the name is longer than the file system allows, or ``path`` is a device,
            FIFO or socket (never replaced, ``overwrite`` or not).
        IsADirectoryError: ``path`` is a folder.
        FileExistsError: ``path`` exists (a symlink too, dangling or not) and ``overwrite`` is False.
        FileNotFoundError, PermissionError: the folder is missing or not writable.
    """
    target = Path(path)
    folder = target.parent
    name_max = _name_max(folder)
    if len(os.fsencode(target.name)) > name_max:
        raise OutputPathError(
            f"the output name {target.name[:40]}... is {len(os.fsencode(target.name))} bytes long; this file "
            f"system allows {name_max}: choose a shorter name"
        )
    exists = _check_replaceable(target)
    if exists and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (CLI: --force) to replace it")
    if not folder.is_dir():
        raise FileNotFoundError(f"output folder {folder} does not exist; create it first")
    # a real probe, with the temporary name a write will use: access(2) answers yes for root on file
    # systems that refuse writes (sysfs), and says nothing about the name's length
    probe = folder / _temporary_name(target)
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as error:
        raise PermissionError(error.errno, f"output folder {folder} is not writable ({error.strerror})") from None
    probe.unlink()
    return target


class OutputPathError(ValueError):
    """A path that can never be an output: a device, FIFO or socket, or a name too long for its file system."""


class WriteError(OSError):
    """Writing an output failed (a full disk, a file size limit, an I/O error); the target was left as it was.

    ``errno`` is the failure's; ``path`` the output.
    """

    def __init__(self, path: Path, failure: OSError) -> None:
        reason = failure.strerror or type(failure).__name__
        hint = WRITE_FAILURE_HINTS.get(failure.errno or 0, "check the device, or write elsewhere")
        super().__init__(f"cannot write {path} ({reason}); nothing was written: {hint}")
        self.errno = failure.errno
        self.path = path


WRITE_FAILURE_HINTS = {
    errno.ENOSPC: "free some space, or write elsewhere",
    errno.EDQUOT: "free some space (the disk quota is reached), or write elsewhere",
    errno.EFBIG: "the file is larger than this file system or the process's file size limit (ulimit -f) allows",
}
SPECIAL_FILES = {
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "FIFO (named pipe)",
    stat.S_IFSOCK: "socket",
}


def _check_replaceable(target: Path) -> bool:
    """Whether ``target`` exists; raise if it is something no output may replace (a folder, a device,
    a FIFO, a socket). A symlink is replaceable whatever it points to: the link is replaced, not its target."""
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{target} is a directory; pass a file path")
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        kind = SPECIAL_FILES.get(stat.S_IFMT(mode), "special file")
        raise OutputPathError(
            f"{target} is a {kind}, not a regular file; outputs replace only regular files and symlinks: "
            "choose another path"
        )
    return True


def _name_max(folder: Path) -> int:
    """The longest file name, in bytes, ``folder``'s file system allows (255 where it does not say)."""
    try:
        return os.pathconf(folder if str(folder) else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        return DEFAULT_NAME_MAX


def _temporary_name(target: Path) -> str:
    """``.<tag>.<pid>.<random>.condconv-tmp``, the tag being :func:`_temporary_tag`."""
    return f".{_temporary_tag(target)}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"


def _temporary_tag(target: Path) -> str:
    """``target``'s name, or, where the temporary name would then be too long for the file system, the
    name cut short plus ``~`` and 8 hex digits of its hash: the same tag for the same target, so
    :func:`_remove_stale_temporaries` recognizes the temporaries of earlier writes either way."""
    room = _name_max(target.parent) - TEMP_NAME_OVERHEAD
    name = target.name
    if len(os.fsencode(name)) <= room:
        return name
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:8]
    while len(os.fsencode(name)) > room - len(digest) - 1:
        name = name[:-1]
    return f"{name}~{digest}"


def _sync(path: Path) -> None:
    """``fsync`` the file: a write error the file system reports only then (a full disk) is found here."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # a file system without fsync
            raise
    finally:
        os.close(fd)


def _os_error_in(error: BaseException) -> OSError | None:
    """The OSError that caused ``error`` (it, or one in its chain): torch's zip writer reports a failed write
    as a RuntimeError raised while the OSError is handled. None when an interrupt is in the chain."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        if not isinstance(current, Exception):
            return None
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _link_exclusively(tmp: Path, target: Path) -> None:
    """Give ``tmp``'s file the name ``target`` unless that name exists, atomically."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise FileExistsError(
            f"{target} already exists (another writer created it); pass overwrite=True (CLI: --force) to replace it"
        ) from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        # a filesystem without hard links: reserve the name exclusively, then move onto it
        try:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            raise FileExistsError(
                f"{target} already exists; pass overwrite=True (CLI: --force) to replace it"
            ) from None
        os.replace(tmp, target)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _remove_stale_temporaries(target: Path) -> None:
    """Delete temporary files of earlier writes to ``target`` whose writing process no longer exists."""
    tag = re.escape(_temporary_tag(target))
    pattern = re.compile(rf"^\.{tag}\.(\d+)\.[0-9a-f]+{re.escape(TEMP_SUFFIX)}$")
    removed = []
    folder = target.parent if str(target.parent) else Path(".")
    for entry in folder.iterdir():
        match = pattern.match(entry.name)
        if match and not _process_exists(int(match.group(1))):
            entry.unlink(missing_ok=True)
            removed.append(entry.name)
    if removed:
        names = printable(", ".join(removed))
        warnings.warn(f"removed {len(removed)} temporary file(s) left by an interrupted write: {names}", stacklevel=2)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OverflowError:  # no process has such a number
        return False
    return True


def torch_save(obj: object, path: Path) -> None:
    """``torch.save`` through a file object, so the archive's record names (and the bytes) do not depend on ``path``."""
    with open(path, "wb") as handle:
        torch.save(obj, handle)


def save_module(
    module: torch.nn.Module, path: PathLike, *, overwrite: bool = False, verify: Verify | None = None
) -> Path:
    """``torch.save(module)`` atomically (:func:`atomic_write`); loading it back unpickles, which runs code."""
    target = Path(path)
    with atomic_write(target, overwrite=overwrite, verify=verify) as tmp:
        torch_save(module, tmp)
    return target


def load_weights_only(
    source: PathLike | DetectedFile | IO[bytes], map_location: str | torch.device = "cpu", *, mmap: bool = False
) -> object:
    """``torch.load(weights_only=True)``: tensors, containers and plain values; never runs code from the file.

    A path is detected first (:func:`~condconv_lightning.formats.detect_format`: a regular file whose
    declared lengths fit in it, no zip bomb); a file object is checked for zip bombs. ``mmap=True``
    maps a ``torch.save`` zip file's tensors instead of reading them, for callers that need only its
    small entries.

    Raises:
        ModelFileError: the file is missing, not a regular file, truncated, or not a PyTorch file.
        UnsafeFileError: a zip record would inflate far beyond its stored size (a zip bomb).
        pickle.UnpicklingError: the file holds other Python objects (see :func:`load_trusted_pickle`).
    """
    if hasattr(source, "read"):
        check_not_zip_bomb(source)  # type: ignore[arg-type]
        return torch.load(source, map_location=map_location, weights_only=True)  # type: ignore[arg-type]
    detected = _detected(source)  # type: ignore[arg-type]
    if mmap and detected.format is FileFormat.TORCH_ZIP:
        return torch.load(detected.path, map_location=map_location, weights_only=True, mmap=True)
    with _opened(detected) as f:
        return torch.load(f, map_location=map_location, weights_only=True)


def load_trusted_pickle(source: PathLike | DetectedFile, map_location: str | torch.device = "cpu") -> object:
    """``torch.load(weights_only=False)``: unpickling runs code from the file; only for files the caller trusts."""
    with _opened(_detected(source)) as f:
        return torch.load(f, map_location=map_location, weights_only=False)


def _detected(source: PathLike | DetectedFile) -> DetectedFile:
    return source if isinstance(source, DetectedFile) else detect_format(source)


@contextlib.contextmanager
def _opened(detected: DetectedFile) -> Iterator[IO[bytes]]:
    """The file open for reading: ``torch.load`` given a path ending in ``.safetensors`` reads it as
    safetensors whatever it holds, and the format was decided from the bytes."""
    with open(detected.path, "rb") as f:
        yield f


def save_state_dict(
    state_dict: Mapping[str, Tensor],
    path: PathLike,
    *,
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
    verify: Verify | None = None,
) -> Path:
    """Write tensors atomically: safetensors for a ``.safetensors`` path, else ``torch.save``.

    ``metadata`` (string pairs) goes into a safetensors header; other formats refuse it.
    ``verify`` checks the written file before it takes its name (:func:`atomic_write`).
    """
    target = Path(path)
    if metadata is not None and target.suffix not in SAFETENSORS_SUFFIXES:
        raise ValueError(f"{target}: metadata is only stored in .safetensors files")
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    with atomic_write(target, overwrite=overwrite, verify=verify) as tmp:
        if target.suffix in SAFETENSORS_SUFFIXES:
            from safetensors.torch import save_file

            with writing_safetensors():
                save_file(_unshare(tensors), str(tmp), metadata=dict(metadata) if metadata else None)
        else:
            torch_save(tensors, tmp)
    return target


@contextlib.contextmanager
def writing_safetensors() -> Iterator[None]:
    """safetensors' error for a failed write (``... (os error 28)``) as the OSError it reports."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as error:
        found = re.search(r"\(os error (\d+)\)", str(error))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code)) from error


@contextlib.contextmanager
def reading_safetensors(path: PathLike) -> Iterator[None]:
    """safetensors' own errors (a crafted header, overlapping tensors) as one ValueError naming ``path``."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot read {path} as a safetensors file ({reason}); it is corrupted") from None


def load_state_dict(source: PathLike | DetectedFile, map_location: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Read a state dict weights-only (safetensors or torch, told apart by the bytes) and strip wrapper prefixes.

    A Lightning checkpoint (a dict with a ``state_dict`` entry) yields that entry.

    Raises:
        ModelFileError: the file is unusable, or holds no state dict.
    """
    detected = _detected(source)
    if detected.format is FileFormat.SAFETENSORS:
        from safetensors.torch import load_file

        with reading_safetensors(detected.path):
            loaded: object = load_file(str(detected.path), device=str(map_location))
    else:
        loaded = load_weights_only(detected, map_location)
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ModelFileError(f"{detected.path} does not hold a state dict (a mapping of names to tensors)")
    return strip_keys(loaded)


def key_mismatches(
    expected: Mapping[str, object], state: Mapping[str, object]
) -> tuple[list[str], list[str], list[str]]:
    """Keys ``state`` lacks, keys ``expected`` lacks, and shared keys whose tensors differ in shape: what a
    strict ``load_state_dict`` would report, found before it has copied anything."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    reshaped = [
        key
        for key, tensor in expected.items()
        if isinstance(tensor, Tensor) and isinstance(other := state.get(key), Tensor) and other.shape != tensor.shape
    ]
    return missing, unexpected, reshaped


def _unshare(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """safetensors refuses tensors that share memory (tied weights): give each its own copy."""
    seen: set[int] = set()
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        ptr = value.untyped_storage().data_ptr() if value.numel() else -1
        out[key] = value.clone() if ptr in seen else value
        if ptr != -1:
            seen.add(ptr)
    return out
