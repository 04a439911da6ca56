"""Safe file I/O shared by persistence helpers and the command line.

- Writes are atomic: a temporary file in the target folder, then ``os.replace``, so an
  error or an interrupt never leaves a partial file behind.
- Loading is weights-only: ``torch.load(weights_only=True)`` (the default since torch
  2.6, because unpickling runs arbitrary code) or safetensors. Prefixes added by
  wrappers (``module.`` from DataParallel/DDP, ``_orig_mod.`` from ``torch.compile``)
  are stripped.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Optional, Union

import torch
from torch import Tensor

PathLike = Union[str, os.PathLike]
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
SAFETENSORS_SUFFIXES: tuple[str, ...] = (".safetensors",)


@contextlib.contextmanager
def atomic_write(path: PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success rename it to ``path``.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        PermissionError: the folder is not writable.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (CLI: --force) to replace it")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"output folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"output folder {folder} is not writable; choose another output path")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; give the file the mode an ordinary open() would (0666 & ~umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def strip_wrapper_prefixes(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove leading ``module.`` / ``_orig_mod.`` (repeatedly, in any order) from every key."""
    stripped: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        stripped[key] = value
    return stripped


def save_state_dict(
    state_dict: Mapping[str, Tensor],
    path: PathLike,
    *,
    overwrite: bool = False,
    metadata: Optional[Mapping[str, str]] = None,
) -> Path:
    """Write tensors atomically: safetensors for a ``.safetensors`` path, else ``torch.save``.

    ``metadata`` (string pairs) goes into a safetensors header; other formats refuse it.
    """
    target = Path(path)
    if metadata is not None and target.suffix not in SAFETENSORS_SUFFIXES:
        raise ValueError(f"{target}: metadata is only stored in .safetensors files")
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    with atomic_write(target, overwrite=overwrite) as tmp:
        if target.suffix in SAFETENSORS_SUFFIXES:
            from safetensors.torch import save_file

            save_file(_unshare(tensors), str(tmp), metadata=dict(metadata) if metadata else None)
        else:
            torch.save(tensors, tmp)
    return target


def load_state_dict(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> dict[str, Tensor]:
    """Read a state dict weights-only (safetensors or torch) and strip wrapper prefixes.

    A Lightning checkpoint (a dict with a ``state_dict`` entry) yields that entry.
    """
    source = Path(path)
    if source.suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        loaded: object = load_file(str(source), device=str(map_location))
    else:
        loaded = torch.load(source, map_location=map_location, weights_only=True)
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ValueError(f"{source} does not hold a state dict (a mapping of names to tensors)")
    return strip_wrapper_prefixes(loaded)


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
