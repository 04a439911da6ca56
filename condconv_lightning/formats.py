"""What a model file is, from its bytes alone: detected once, into the small result every reader takes.

Unpickling runs code chosen by whoever wrote the file, so detection reads archive listings,
headers and pickle opcodes only (``pickletools.genops`` decodes opcodes; it never resolves a
global or calls anything), and never more than the file holds: every length the file
declares (a safetensors header's, a pickled string's, a zip record's) is checked against the
bytes that are there before anything is read or allocated. :func:`detect_format` returns a
:class:`DetectedFile`: the format, the size, and for safetensors the parsed header; the
readers (:func:`condconv_lightning.io.load_state_dict`, :func:`~condconv_lightning.io.load_weights_only`,
:func:`~condconv_lightning.surgery.load_converted`, :func:`~condconv_lightning.loading.load_model`,
:func:`pickled_globals`) take that result, so the format is decided in one place.

Layouts, as torch 2.x writes them:

- ``torch.save``: a zip archive ``<name>/data.pkl`` + ``<name>/data/<n>`` tensor records.
- legacy ``torch.save`` (``_use_new_zipfile_serialization=False``): successive pickles,
  the first holding torch's magic number ``0x1950a86a20f9469cfc6c``.
- TorchScript (``torch.jit.save``): a zip archive with ``<name>/code/`` and ``<name>/constants.pkl``.
- ``torch.export.save`` (``.pt2``): a zip archive with ``<name>/archive_format``.
- safetensors: an 8-byte little-endian header length, a JSON header, then the tensor bytes
  (https://github.com/huggingface/safetensors#format). It is recognized by that header
  before anything else is looked at: a header length of 128 modulo 256 starts the file
  with the byte of pickle's PROTO opcode, and one of 0x04034b50 bytes with the zip magic.
"""

from __future__ import annotations

import enum
import io
import json
import os
import pickletools
import stat
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any

from .messages import printable

TORCH_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = 0x80
# Legacy torch.save writes magic number, protocol version and system info before the object,
# and the keys of the storages after it; the storages' raw bytes follow.
LEGACY_PICKLES_BEFORE_OBJECT = 3
LEGACY_PICKLES = 5
MAX_SAFETENSORS_HEADER = 100_000_000
"""The longest header safetensors itself reads: a longer declared length is no safetensors file."""
MAX_INFLATION_RATIO = 20
"""A compressed zip record may inflate to at most this many times its stored size (beyond 1 MiB)."""
STRING_OPCODES = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
)
PUT_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
GET_OPCODES = frozenset({"GET", "BINGET", "LONG_BINGET"})
SPECIAL_FILES = {
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "FIFO (named pipe)",
    stat.S_IFSOCK: "socket",
}


class ModelFileError(ValueError):
    """A model file (or the architecture named for it) that cannot be used, stated in one line saying what to do.

    The message is :func:`~condconv_lightning.messages.printable`: names from the file print as text.
    ``facts`` (optional) carry structured details, e.g. the failed check's numbers, for
    programs that report errors as JSON.
    """

    def __init__(self, message: str, *, facts: dict[str, Any] | None = None) -> None:
        super().__init__(printable(message))
        self.facts = facts


class UnsafeFileError(ModelFileError):
    """A file that is refused before anything in it is read (a zip bomb)."""


class FileFormat(enum.Enum):
    """What a model file is, by layout (what it holds is known only after weights-only loading)."""

    TORCH_ZIP = "torch.save file"
    TORCH_LEGACY = "legacy torch.save file"
    SAFETENSORS = "safetensors file"
    TORCHSCRIPT = "TorchScript archive"
    TORCH_EXPORT = "torch.export archive"


@dataclass(frozen=True)
class DetectedFile:
    """A model file as :func:`detect_format` found it: a regular file of ``size`` bytes in ``format``, its
    declared lengths checked against that size; ``header`` is a safetensors file's parsed JSON header."""

    path: Path
    format: FileFormat
    size: int
    header: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), compare=False)

    @property
    def metadata(self) -> Mapping[str, str]:
        """A safetensors file's ``__metadata__`` (string pairs); empty for other formats."""
        return self.header.get("__metadata__") or {}


def detect_format(path: str | os.PathLike) -> DetectedFile:
    """What ``path`` is, or raise :class:`ModelFileError` saying what is wrong with it.

    Raises:
        ModelFileError: missing, a directory or other non-regular file (a FIFO would block), empty,
            truncated, declaring more bytes than it holds, or not a PyTorch file.
        UnsafeFileError: a zip archive whose compressed records inflate like a zip bomb.
    """
    path = Path(path)
    with _open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ModelFileError(f"{path} is empty (0 bytes); save the model again")
        head = f.read(16)
        header = _safetensors_header(path, f, head, size)
        if header is not None:
            return DetectedFile(path, FileFormat.SAFETENSORS, size, header)
        if head.startswith(ZIP_MAGIC):
            return DetectedFile(path, _zip_format(path, f), size)
        if head[0] == PICKLE_PROTO:
            f.seek(0)
            return DetectedFile(path, _pickle_format(path, f, size), size)
    raise ModelFileError(
        f"{path} is not a PyTorch file (expected a torch.save file, a Lightning .ckpt or a .safetensors file)"
    )


def pickled_globals(detected: DetectedFile) -> list[str]:
    """The ``module.name`` globals that unpickling the file's object would import, in order, once each."""
    if detected.format is FileFormat.TORCH_ZIP:
        with zipfile.ZipFile(detected.path) as archive:
            name = next(n for n in archive.namelist() if _is_record(n, "data.pkl"))
            record = archive.read(name)  # whole, so that its CRC is checked; its size was checked at detection
        return _globals(BoundedReader(io.BytesIO(record), len(record)))
    if detected.format is FileFormat.TORCH_LEGACY:
        with detected.path.open("rb") as f:
            stream = BoundedReader(f, detected.size)
            for _ in range(LEGACY_PICKLES_BEFORE_OBJECT):
                _skip_pickle(stream)
            return _globals(stream)
    return []


class BoundedReader:
    """A binary stream that refuses to read past its last ``limit`` bytes: a length a file declares
    (a pickled string of 2**62 bytes) is checked against what remains before anything is allocated.

    Raises:
        ValueError: a read asks for more bytes than remain.
    """

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self.stream = stream
        self.remaining = limit

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self.remaining
        if size > self.remaining:
            raise ValueError(f"a length of {size} bytes where {self.remaining} remain")
        data = self.stream.read(size)
        self.remaining -= len(data)
        return data

    def readline(self, size: int | None = -1) -> bytes:
        limit = self.remaining if size is None or size < 0 else min(size, self.remaining)
        line = self.stream.readline(limit)
        self.remaining -= len(line)
        return line

    def tell(self) -> int:
        return self.stream.tell()


def check_not_zip_bomb(path: str | os.PathLike | IO[bytes]) -> None:
    """Refuse a zip archive whose compressed records, one or all together, inflate more than
    :data:`MAX_INFLATION_RATIO`-fold.

    A file object is left at the position it had.
    """
    position = path.tell() if hasattr(path, "tell") else None
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                _check_records(path, archive.infolist())
    finally:
        if position is not None:
            path.seek(position)  # type: ignore[union-attr]


def _open_regular(path: Path) -> IO[bytes]:
    """``path`` opened for reading if it is a regular file (a FIFO or a device would block or have effects)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file; check the path") from None
    except OSError as error:
        raise ModelFileError(f"cannot read {path} ({error.strerror}); check the path") from None
    if stat.S_ISDIR(mode):
        raise ModelFileError(f"{path} is a directory; pass the model file inside it")
    if not stat.S_ISREG(mode):
        kind = SPECIAL_FILES.get(stat.S_IFMT(mode), "special file")
        raise ModelFileError(f"{path} is a {kind}, not a regular file; pass a model file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # never blocks if a FIFO took its place
        f = os.fdopen(fd, "rb")
    except OSError as error:
        raise ModelFileError(f"cannot read {path} ({error.strerror}); check the path") from None
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise ModelFileError(f"{path} is not a regular file; pass a model file")
    return f


def _zip_format(path: Path, f: IO[bytes]) -> FileFormat:
    f.seek(0)
    if not zipfile.is_zipfile(f):
        raise ModelFileError(f"{path} is a truncated or corrupted zip archive; download or save it again")
    try:
        with zipfile.ZipFile(f) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise ModelFileError(f"{path} is a corrupted zip archive ({error}); download or save it again") from None
    _check_records(path, records)
    names = [info.filename for info in records]
    if any(_is_record(n, "constants.pkl") for n in names) and any("/code/" in n for n in names):
        return FileFormat.TORCHSCRIPT
    if any(_is_record(n, "archive_format") for n in names):
        return FileFormat.TORCH_EXPORT
    if any(_is_record(n, "data.pkl") for n in names):
        return FileFormat.TORCH_ZIP
    raise ModelFileError(f"{path} is a zip archive but not a PyTorch file (it has no data.pkl record)")


def _check_records(path: object, records: list[zipfile.ZipInfo]) -> None:
    """Each compressed record, and all of them together (many records of just under the limit add up)."""
    compressed = [info for info in records if info.compress_type != zipfile.ZIP_STORED]
    sizes = [(f"record {info.filename} inflates", info.compress_size, info.file_size) for info in compressed]
    total = (sum(info.compress_size for info in compressed), sum(info.file_size for info in compressed))
    for what, packed, inflated in (*sizes, (f"its {len(compressed)} compressed records inflate", *total)):
        if inflated > 2**20 and inflated > MAX_INFLATION_RATIO * max(packed, 1):
            raise UnsafeFileError(
                f"{path}: {what} from {packed} to {inflated} bytes; torch.save never compresses, so this looks "
                "like a zip bomb; save the model again with torch.save"
            )


def _is_record(name: str, record: str) -> bool:
    """torch archives put every record one folder deep: ``<archive name>/<record>``."""
    parts = name.split("/")
    return len(parts) == 2 and parts[1] == record


def _safetensors_header(path: Path, f: IO[bytes], head: bytes, size: int) -> Mapping[str, Any] | None:
    """The parsed header if the file starts as a safetensors file does (a header length safetensors
    accepts, then ``{``), else None; a file that starts so but is cut short or malformed is an error."""
    header_size = int.from_bytes(head[:8], "little")
    if len(head) < 9 or head[8:9] != b"{" or header_size > MAX_SAFETENSORS_HEADER:
        return None
    if 8 + header_size > size:
        raise ModelFileError(f"{path} is a truncated safetensors file; download or save it again")
    f.seek(8)
    try:
        header = json.loads(f.read(header_size), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as error:  # RecursionError: nesting deeper than Python's stack
        if head[0] == PICKLE_PROTO or head.startswith(ZIP_MAGIC):  # no safetensors file after all
            return None
        raise _corrupted_safetensors(path, f"its header is not valid JSON: {type(error).__name__}") from None
    if not isinstance(header, dict):
        raise _corrupted_safetensors(path, "its header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupted_safetensors(path, "its __metadata__ must map strings to strings")
    ends = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise _corrupted_safetensors(path, f"tensor {key!r:.80} has no valid data_offsets")
        ends.append(offsets[1])
    if 8 + header_size + max(ends, default=0) > size:
        raise ModelFileError(f"{path} is a truncated safetensors file; download or save it again")
    return MappingProxyType(header)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique: a repeated key would be read one way here and another elsewhere."""
    found = dict(pairs)
    if len(found) != len(pairs):
        raise ValueError("a key repeats")
    return found


def _corrupted_safetensors(path: Path, reason: str) -> ModelFileError:
    return ModelFileError(f"cannot read {path} as a safetensors file ({reason}); it is corrupted")


def _pickle_format(path: Path, f: IO[bytes], size: int) -> FileFormat:
    """A legacy torch.save file, its pickles read within the file's bytes: torch's own reader would
    allocate whatever length a pickled string declares."""
    stream = BoundedReader(f, size)
    try:
        first = [arg for op, arg, _ in pickletools.genops(stream) if op.name in ("LONG1", "LONG4", "INT")]
        if first != [TORCH_MAGIC_NUMBER]:
            raise ModelFileError(f"{path} is a Python pickle but not a torch.save file; save the model with torch.save")
        for _ in range(LEGACY_PICKLES_BEFORE_OBJECT - 1):
            _skip_pickle(stream)
        declared = _storage_bytes(stream)
        _skip_pickle(stream)  # the storages' keys
    except (ValueError, EOFError, RecursionError, IndexError, KeyError) as error:
        if isinstance(error, ModelFileError):
            raise
        raise ModelFileError(f"{path} is a truncated or corrupted pickle; download or save it again") from None
    if declared > size:
        raise ModelFileError(
            f"{path} declares {declared} bytes of tensors but holds {size} bytes; it is truncated or corrupted"
        )
    return FileFormat.TORCH_LEGACY


INT_OPCODES = frozenset({"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"})
BYTES_OPCODES = frozenset({"SHORT_BINBYTES", "BINBYTES", "BINBYTES8"})
ELEMENT_SIZES = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "ComplexFloat": 8}
ELEMENT_SIZES |= {"ComplexDouble": 16, "Char": 1, "Byte": 1, "Bool": 1}
MARK = object()


def _storage_bytes(stream: BoundedReader) -> int:
    """The bytes of the storages a legacy torch.save object pickle declares (each once): torch allocates
    them, at the sizes the pickle declares, before it reads them.

    The pickle's stack is followed from the opcodes' documented stack effects, with the values
    needed to read a persistent id (``('storage', <class>, key, location, numel, ...)``) kept.
    """
    stack: list[object] = []
    memo: dict[object, object] = {}
    storages: dict[object, int] = {}
    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name in INT_OPCODES or name in STRING_OPCODES or name in BYTES_OPCODES:
            stack.append(arg)
        elif name == "DUP":
            stack.append(stack[-1])
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name == "GLOBAL":
            stack.append(str(arg))
        elif name in PUT_OPCODES or name == "MEMOIZE":
            memo[arg if name != "MEMOIZE" else len(memo)] = stack[-1]
        elif name in GET_OPCODES:
            stack.append(memo[arg])
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            count = int(name[-1])
            items = tuple(stack[-count:])
            del stack[-count:]
            stack.append(items)
        elif name == "BINPERSID":
            pid = stack.pop()  # torch reads a list as it reads a tuple, and the name as text or bytes
            if isinstance(pid, (tuple, list)) and len(pid) >= 5 and pid[0] in ("storage", b"storage"):
                kind = str(pid[1]).rpartition(" ")[2].removesuffix("Storage")
                numel = pid[4] if isinstance(pid[4], int) else 0
                storages[str(pid[2])] = max(numel, 0) * ELEMENT_SIZES.get(kind, 1)
            stack.append(None)
        else:
            before, after = op.stack_before, op.stack_after
            if pickletools.markobject in before:
                items = []
                while (item := stack.pop()) is not MARK:
                    items.append(item)
                items.reverse()
                if name == "APPENDS" and stack and isinstance(stack[-1], list):
                    stack[-1].extend(items)
                    continue
                del stack[len(stack) - before.index(pickletools.markobject) :]
                produced: list[object] = [None] * len(after)
                if name in ("TUPLE", "LIST"):
                    produced = [tuple(items) if name == "TUPLE" else items]
            else:
                if name == "APPEND" and len(stack) >= 2 and isinstance(stack[-2], list):
                    stack[-2].append(stack.pop())
                    continue
                del stack[len(stack) - len(before) :]
                produced = [MARK] if name == "MARK" else [None] * len(after)
                if name == "EMPTY_TUPLE":
                    produced = [()]
            stack.extend(produced)
    return sum(storages.values())


def _skip_pickle(stream: BoundedReader) -> None:
    for _ in pickletools.genops(stream):
        pass


def _globals(stream: BoundedReader) -> list[str]:
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


def _opcodes(stream: BoundedReader) -> Iterator[tuple[pickletools.OpcodeInfo, object, object]]:
    try:
        yield from pickletools.genops(stream)
    except (ValueError, EOFError):
        return  # a damaged tail: the globals found so far are still worth naming
