"""Recognize what a model file is from its bytes alone, without unpickling anything.

Unpickling runs code chosen by whoever wrote the file, so everything here reads
archive listings, headers and pickle opcodes only (``pickletools.genops`` decodes
opcodes; it never resolves a global or calls anything). Layouts, as torch 2.x writes them:

- ``torch.save``: a zip archive ``<name>/data.pkl`` + ``<name>/data/<n>`` tensor records.
- legacy ``torch.save`` (``_use_new_zipfile_serialization=False``): successive pickles,
  the first holding torch's magic number ``0x1950a86a20f9469cfc6c``.
- TorchScript (``torch.jit.save``): a zip archive with ``<name>/code/`` and ``<name>/constants.pkl``.
- ``torch.export.save`` (``.pt2``): a zip archive with ``<name>/archive_format``.
- safetensors: an 8-byte little-endian header length, a JSON header, then the tensor bytes
  (https://github.com/huggingface/safetensors#format).
"""

from __future__ import annotations

import enum
import io
import json
import pickletools
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import ModelFileError

TORCH_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = 0x80
# Legacy torch.save writes magic number, protocol version and system info before the object.
LEGACY_PICKLES_BEFORE_OBJECT = 3
STRING_OPCODES = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
)
PUT_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
GET_OPCODES = frozenset({"GET", "BINGET", "LONG_BINGET"})


class FileFormat(enum.Enum):
    """What a model file is, by layout (what it holds is known only after weights-only loading)."""

    TORCH_ZIP = "torch.save file"
    TORCH_LEGACY = "legacy torch.save file"
    SAFETENSORS = "safetensors file"
    TORCHSCRIPT = "TorchScript archive"
    TORCH_EXPORT = "torch.export archive"


def detect_format(path: Path) -> FileFormat:
    """Return the file's format, or raise :class:`ModelFileError` saying what is wrong with it.

    Raises:
        ModelFileError: missing, a directory, empty, truncated, or not a PyTorch file.
    """
    if not path.exists():
        raise ModelFileError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise ModelFileError(f"{path} is a directory; pass the model file inside it")
    size = path.stat().st_size
    if size == 0:
        raise ModelFileError(f"{path} is empty (0 bytes); save the model again")
    with path.open("rb") as f:
        head = f.read(16)
    if head.startswith(ZIP_MAGIC):
        return _zip_format(path)
    if head[0] == PICKLE_PROTO:
        return _pickle_format(path)
    if _is_safetensors(path, head, size):
        return FileFormat.SAFETENSORS
    raise ModelFileError(
        f"{path} is not a PyTorch file (expected a torch.save file, a Lightning .ckpt or a .safetensors file)"
    )


def pickled_globals(path: Path, file_format: FileFormat) -> list[str]:
    """The ``module.name`` globals that unpickling the file's object would import, in order, once each."""
    if file_format is FileFormat.TORCH_ZIP:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if _is_record(n, "data.pkl"))
            return _globals(io.BytesIO(archive.read(name)))
    if file_format is FileFormat.TORCH_LEGACY:
        with path.open("rb") as f:
            for _ in range(LEGACY_PICKLES_BEFORE_OBJECT):
                _skip_pickle(f)
            return _globals(f)
    return []


def _zip_format(path: Path) -> FileFormat:
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path} is a truncated or corrupted zip archive; download or save it again")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise ModelFileError(f"{path} is a corrupted zip archive ({error}); download or save it again") from None
    if any(_is_record(n, "constants.pkl") for n in names) and any("/code/" in n for n in names):
        return FileFormat.TORCHSCRIPT
    if any(_is_record(n, "archive_format") for n in names):
        return FileFormat.TORCH_EXPORT
    if any(_is_record(n, "data.pkl") for n in names):
        return FileFormat.TORCH_ZIP
    raise ModelFileError(f"{path} is a zip archive but not a PyTorch file (it has no data.pkl record)")


def _is_record(name: str, record: str) -> bool:
    """torch archives put every record one folder deep: ``<archive name>/<record>``."""
    parts = name.split("/")
    return len(parts) == 2 and parts[1] == record


def _pickle_format(path: Path) -> FileFormat:
    with path.open("rb") as f:
        try:
            first = [arg for op, arg, _ in pickletools.genops(f) if op.name in ("LONG1", "LONG4", "INT")]
        except (ValueError, EOFError):
            raise ModelFileError(f"{path} is a truncated or corrupted pickle; download or save it again") from None
    if first != [TORCH_MAGIC_NUMBER]:
        raise ModelFileError(f"{path} is a Python pickle but not a torch.save file; save the model with torch.save")
    return FileFormat.TORCH_LEGACY


def _is_safetensors(path: Path, head: bytes, size: int) -> bool:
    if len(head) < 9 or head[8:9] != b"{":
        return False
    header_size = int.from_bytes(head[:8], "little")
    if 8 + header_size > size:
        raise ModelFileError(f"{path} is a truncated safetensors file; download or save it again")
    with path.open("rb") as f:
        f.seek(8)
        try:
            header = json.loads(f.read(header_size))
        except (ValueError, UnicodeDecodeError):
            return False
    try:
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return False
    if 8 + header_size + max(ends, default=0) > size:
        raise ModelFileError(f"{path} is a truncated safetensors file; download or save it again")
    return True


def _skip_pickle(stream: IO[bytes]) -> None:
    for _ in pickletools.genops(stream):
        pass


def _globals(stream: IO[bytes]) -> list[str]:
    """Follow opcodes to name every global, including STACK_GLOBAL's two strings (protocol 4+).

    A shadow stack of the strings pushed (and of the memo, for strings fetched back with
    GET) is all STACK_GLOBAL needs; anything else pushed is recorded as None.
    """
    found: dict[str, None] = {}
    pushed: list[object] = []
    memo: dict[object, object] = {}
    for op, arg, _ in _opcodes(stream):
        if op.name in STRING_OPCODES:
            pushed.append(arg)
        elif op.name in PUT_OPCODES:
            memo[arg] = pushed[-1] if pushed else None
        elif op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op.name in GET_OPCODES:
            pushed.append(memo.get(arg))
        elif op.name == "GLOBAL":
            found[str(arg).replace(" ", ".")] = None
            pushed.append(None)
        elif op.name == "STACK_GLOBAL":
            module, qualname = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
            found[f"{module}.{qualname}" if isinstance(module, str) and isinstance(qualname, str) else "<unknown>"] = (
                None
            )
            pushed.append(None)
        else:
            pushed.append(None)
    return list(found)


def _opcodes(stream: IO[bytes]) -> Iterator[tuple[pickletools.OpcodeInfo, object, object]]:
    try:
        yield from pickletools.genops(stream)
    except (ValueError, EOFError):
        return  # a damaged tail: the globals found so far are still worth naming
