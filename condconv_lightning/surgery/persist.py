"""Saving and loading converted models: weights plus their conversion spec, or a full module.

Weights files keep the spec with the tensors, in one file, so they cannot be separated:

- ``.safetensors``: the spec's JSON is stored in the file's header metadata under
  ``condconv_lightning.spec`` (safetensors allows string metadata), tensors as usual;
- any other suffix: ``torch.save({"format": ..., "spec": <JSON str>, "state_dict": {...}})``,
  which ``torch.load(weights_only=True)`` reads without running code (and which
  :func:`condconv_lightning.io.load_state_dict` reads as a state dict).

A full module (``as_module=True``) is ``torch.save(model)``: loading it unpickles,
which runs code from the file, so :func:`load_converted` does it only with
``trust_pickle=True``. All writes are atomic.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from ..condconv2d import CondConv2d
from ..formats import DetectedFile, FileFormat, detect_format
from ..io import (
    SAFETENSORS_SUFFIXES,
    PathLike,
    Verify,
    atomic_write,
    key_mismatches,
    load_state_dict,
    load_trusted_pickle,
    load_weights_only,
    save_module,
    save_state_dict,
    torch_save,
)
from ..messages import name_list
from ..wrappers import match_keys, strip, strip_keys
from .convert import apply_spec, describe
from .replace import modules_by_name, restore_modules
from .spec import ConversionSpec

FILE_FORMAT = "condconv_lightning.converted/1"
SPEC_KEY = "condconv_lightning.spec"


def save_converted(
    model: nn.Module,
    path: PathLike,
    spec: ConversionSpec | None = None,
    *,
    as_module: bool = False,
    overwrite: bool = False,
    verify: Verify | None = None,
) -> Path:
    """Write a converted model atomically; returns the path.

    Args:
        model: the converted model.
        path: target file; ``.safetensors`` needs the safetensors package.
        spec: the conversion's spec (``report.spec``); by default one describing every
            CondConv2d in ``model`` (:func:`~condconv_lightning.surgery.describe`).
        as_module: write the full pickled module instead of weights + spec.
        overwrite: replace an existing file.
        verify: called with the written file before it takes its name (e.g. load it back and
            compare outputs); what it raises propagates, and nothing is written.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: ``spec`` does not cover the model's CondConv2d layers.
    """
    target = Path(path)
    if as_module:
        if target.suffix in SAFETENSORS_SUFFIXES:
            raise ValueError(
                f"{target}: a full module cannot be stored as safetensors; use a .pt path or as_module=False"
            )
        return save_module(model, target, overwrite=overwrite, verify=verify)
    spec = spec if spec is not None else describe(model)
    _check_covers(spec, model)
    text = spec.to_json(indent=None)
    if target.suffix in SAFETENSORS_SUFFIXES:
        return save_state_dict(
            model.state_dict(), target, overwrite=overwrite, metadata={SPEC_KEY: text}, verify=verify
        )
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(target, overwrite=overwrite, verify=verify) as tmp:
        torch_save({"format": FILE_FORMAT, "spec": text, "state_dict": tensors}, tmp)
    return target


def load_converted(
    path: PathLike,
    model: nn.Module | None = None,
    *,
    trust_pickle: bool = False,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Load what :func:`save_converted` wrote.

    Weights + spec: the spec is applied to ``model`` (a fresh, unconverted instance of
    the architecture) and the weights are loaded strictly; ``model`` is returned.
    A full module: returned as unpickled (``model`` is not used), only if
    ``trust_pickle=True``.

    Raises:
        ValueError: a weights file without ``model``, a file without a spec, or a full
            module without ``trust_pickle=True``.
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist or is not a file")
    detected = detect_format(source)
    if detected.format is FileFormat.SAFETENSORS:
        spec = _spec_or_error(source, detected.metadata.get(SPEC_KEY))
        state = load_state_dict(detected, map_location)
    else:
        try:
            loaded = load_weights_only(detected, map_location)
        except pickle.UnpicklingError:
            return _load_module(detected, map_location, trust_pickle)
        spec = _spec_or_error(source, _torch_spec(loaded))
        state = strip_keys(loaded["state_dict"])
    if model is None:
        raise ValueError(
            f"{source} holds weights and a conversion spec; pass a fresh instance of its architecture as model"
        )
    return load_into(model, spec, state, source)


def load_into(model: nn.Module, spec: ConversionSpec, state: Mapping[str, torch.Tensor], source: object) -> nn.Module:
    """Apply ``spec`` to ``model`` and load ``state`` strictly; on any failure ``model`` is left as it was.

    The spec's expert counts are checked against the weights before any layer is built,
    so a spec cannot make the library allocate more than the weights it came with.

    Raises:
        ValueError: the spec does not match the weights.
    """
    check_against_weights(spec, state, source, model)
    before = modules_by_name(model)
    try:
        apply_spec(model, spec, upcycle=False)  # the weights replace the experts next: skip upcycling's draws
        load_state(model, state, source)
    except BaseException:
        restore_modules(model, before)
        raise
    return model


def load_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: object, *, strict: bool = True
) -> tuple[list[str], list[str]]:
    """``model.load_state_dict(state, strict=strict)`` with keys matched across wrapper prefixes, refusing in one
    line, before anything is copied, what it would refuse (``load_state_dict`` copies what fits before it raises
    on the rest). Returns the missing and the unexpected keys, which only ``strict=False`` lets pass.

    Raises:
        RuntimeError: see :func:`check_fits`.
    """
    expected = model.state_dict()
    state = match_keys(state, expected)
    check_fits(expected, state, source, strict=strict)
    keys = model.load_state_dict(state, strict=strict)
    return list(keys.missing_keys), list(keys.unexpected_keys)


def check_fits(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: object, *, strict: bool = True
) -> None:
    """Raise, naming the first few, unless ``state`` has exactly the keys of ``expected`` (a model's state dict)
    with its tensors' shapes (with ``strict=False``: unless the keys they share have the same shapes).

    Raises:
        RuntimeError: missing or unexpected keys (strict only), or a size mismatch (as ``load_state_dict`` would).
    """
    missing, unexpected, reshaped = key_mismatches(expected, state)
    problems = {
        "missing keys": missing if strict else [],
        "unexpected keys": unexpected if strict else [],
        "size mismatch for": [
            f"{key} ({list(state[key].shape)} in the file, {list(expected[key].shape)} in the model)"
            for key in reshaped
        ],
    }
    found = [f"{what} {name_list(keys)}" for what, keys in problems.items() if keys]
    if found:
        raise RuntimeError(f"{source}: the weights do not fit the model: {'; '.join(found)}")


def check_against_weights(
    spec: ConversionSpec, state: Mapping[str, torch.Tensor], source: object, model: nn.Module
) -> None:
    """Each spec layer's ``weight`` must be in ``state`` as ``[num_experts, P]``, P being the weights per
    expert of that layer of ``model`` (a spec may not make a layer larger than the weights it came with)."""
    stripped = strip_keys(state)
    for name, options in spec.layers.items():
        weight = stripped.get(f"{strip(name)}.weight")
        layer = _submodule_or_none(model, name)
        size = None if layer is None else _weights_per_expert(layer)
        if (
            weight is None
            or weight.dim() != 2
            or weight.shape[0] != options.num_experts
            or (size is not None and weight.shape[1] != size)
        ):
            found = "no such tensor" if weight is None else f"a tensor of shape {list(weight.shape)}"
            raise ValueError(
                f"{source}: the conversion spec gives layer {name!r} {options.num_experts} experts, but the weights "
                f"hold {found} for it (expected [{options.num_experts}, {size or 'P'}]); the spec and weights do "
                "not belong together"
            )


def _submodule_or_none(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:  # apply_spec names the missing layer
        return None


def _weights_per_expert(layer: nn.Module) -> int | None:
    """P of a conv about to be converted, or of a CondConv2d (``weight`` is then ``[K, P]``)."""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    return weight.shape[1] if isinstance(layer, CondConv2d) else weight.numel()


def read_spec(path: PathLike | DetectedFile) -> ConversionSpec:
    """The conversion spec stored in a weights file :func:`save_converted` wrote."""
    detected = path if isinstance(path, DetectedFile) else detect_format(path)
    if detected.format is FileFormat.SAFETENSORS:
        return _spec_or_error(detected.path, detected.metadata.get(SPEC_KEY))
    return _spec_or_error(detected.path, _torch_spec(load_weights_only(detected)))


def _load_module(detected: DetectedFile, map_location: str | torch.device, trust_pickle: bool) -> nn.Module:
    source = detected.path
    if not trust_pickle:
        raise ValueError(
            f"{source} is a full pickled module: loading it runs code from the file; pass trust_pickle=True "
            "only if you trust its origin (or save weights + spec with as_module=False)"
        )
    module = load_trusted_pickle(detected, map_location)
    if not isinstance(module, nn.Module):
        raise ValueError(f"{source} holds a {type(module).__name__}, not an nn.Module")
    return module


def _torch_spec(loaded: object) -> str | None:
    if isinstance(loaded, dict) and loaded.get("format") == FILE_FORMAT:
        return loaded.get("spec")
    return None


def _spec_or_error(source: Path, text: str | None) -> ConversionSpec:
    if text is None:
        raise ValueError(
            f"{source} holds no conversion spec (it was not written by save_converted); convert a fresh model with "
            "convert() using the original selectors, then load the weights with load_state_dict"
        )
    return ConversionSpec.from_json(text)


def _check_covers(spec: ConversionSpec, model: nn.Module) -> None:
    recorded = set(describe(model).layers)
    missing = sorted(recorded - set(spec.layers))
    if missing:
        raise ValueError(
            f"the spec does not cover the CondConv2d layers {', '.join(missing[:3])}; pass spec=None to describe "
            "every converted layer of the model (or merge the reports' specs)"
        )
