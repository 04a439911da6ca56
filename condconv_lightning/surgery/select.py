"""Which Conv2d layers a conversion targets: selectors, excludes and filters.

Selectors follow what users of peft (``target_modules``) and timm (``list_models``)
expect. A selector is one of

- an exact dotted module name: a Conv2d selects itself, any other module every
  Conv2d beneath it (``"layer3"``);
- a glob over dotted names, with :func:`fnmatch.fnmatchcase` (``"layer3.*.conv2"``);
- a regular expression after ``re:``, matched against the whole name
  (``"re:layer[34]\\.\\d+\\.conv[12]"``).

A glob or regex that matches a container selects the convs beneath it too. Names
written with a leading ``module.`` or ``_orig_mod.`` (DataParallel/DDP,
``torch.compile``) resolve against an unwrapped model, and the other way round.
A selector that matches no convolution at all is a :class:`SelectorError`; one
that matches only layers that are already CondConv2d is not.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..condconv2d import CondConv2d
from ..wrappers import WRAPPER_PREFIXES
from .config import ConversionConfig

Selectors = str | Sequence[str]
REGEX_PREFIX = "re:"
GLOB_CHARS = frozenset("*?[")


class SelectorError(ValueError):
    """A layer selector that matches no convolution (or is malformed)."""


@dataclass(frozen=True)
class Candidate:
    """A convolution found in the model: its first dotted name, every name it has, the module."""

    name: str
    aliases: tuple[str, ...]
    module: nn.Module


def is_conv(module: nn.Module) -> bool:
    """True for every module a selector can target: any ``nn.Conv2d`` (subclasses too) or CondConv2d."""
    return isinstance(module, (nn.Conv2d, CondConv2d))


def list_convs(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every ``nn.Conv2d`` (subclasses included) and CondConv2d in ``model``, once each, in module order."""
    return [(c.name, c.module) for c in candidates(model)]


def as_selector_list(selectors: Selectors | None, argument: str) -> list[str]:
    """Normalize one selector or a sequence of them; the CLI splits ``"a,b"`` itself."""
    if selectors is None:
        return []
    items = [selectors] if isinstance(selectors, str) else list(selectors)
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{argument} must be a string or a sequence of strings, got an item {item!r}")
        if not item.strip():
            raise SelectorError(f"{argument} contains an empty selector; use '*' to select every Conv2d")
    return items


def resolve(model: nn.Module, selectors: Sequence[str], argument: str = "layers") -> dict[int, Candidate]:
    """Map ``id(conv) -> Candidate`` for every conv that one of ``selectors`` matches, in module order.

    Raises:
        SelectorError: a selector matches no convolution, is an unknown name, or is a bad regex.
        TypeError: a selector reaches into a TorchScript module, which cannot be changed.
    """
    found = candidates(model)
    names = _module_names(model)
    selected: set[int] = set()
    for selector in selectors:
        matched = _match(selector, names, argument)
        if not matched:
            raise SelectorError(_no_match_message(selector, names, argument))
        _refuse_torchscript(model, selector, matched)
        hits = {id(c.module) for c in found if any(_within(alias, m) for alias in c.aliases for m in matched)}
        if not hits:
            modules = ", ".join(f"{m} ({type(model.get_submodule(m)).__name__})" for m in sorted(matched)[:3])
            raise SelectorError(
                f"{argument} selector {selector!r} matches no Conv2d: it matches {modules} with no Conv2d beneath; "
                f"closest conv names: {closest_names(selector, [c.name for c in found])}"
            )
        selected |= hits
    return {id(c.module): c for c in found if id(c.module) in selected}


def filter_reason(conv: nn.Conv2d, config: ConversionConfig, input_hw: tuple[int, int] | None = None) -> str | None:
    """Why the shape filters of ``config`` leave ``conv`` alone, or None if they keep it.

    ``input_hw`` is the spatial size of the conv's input in a probing forward (None: not measured).
    """
    kernel = tuple(conv.kernel_size)
    if config.kernel_sizes is not None and kernel not in config.kernel_sizes:
        return f"kernel size {kernel} is not in kernel_sizes {list(config.kernel_sizes)}"
    if min(conv.in_channels, conv.out_channels) < config.min_channels:
        return f"{conv.in_channels} -> {conv.out_channels} channels is below min_channels={config.min_channels}"
    if not config.include_depthwise and is_depthwise(conv):
        return "depthwise (groups == in_channels) and include_depthwise=False"
    if not config.include_squeeze_excitation and input_hw == (1, 1):
        return "squeeze-and-excitation conv (1x1 input) and include_squeeze_excitation=False"
    return None


def is_depthwise(conv: nn.Module) -> bool:
    """A conv whose every group sees one input channel."""
    return conv.groups > 1 and conv.groups == conv.in_channels


def candidates(model: nn.Module) -> list[Candidate]:
    """Every conv of ``model`` once, with all the names it has (a shared conv has several), in module order."""
    aliases: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if is_conv(module):
            aliases.setdefault(id(module), []).append(name)
            modules[id(module)] = module
    return [Candidate(names[0], tuple(names), modules[key]) for key, names in aliases.items()]


def _module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules(remove_duplicate=False) if name]


def _match(selector: str, names: list[str], argument: str) -> list[str]:
    """Module names ``selector`` matches, trying it as written, unwrapped, then wrapped."""
    for variant in _variants(selector, names):
        matched = _match_exactly(variant, names, argument)
        if matched:
            return matched
    return []


def _variants(selector: str, names: list[str]) -> Iterator[str]:
    lead = REGEX_PREFIX if selector.startswith(REGEX_PREFIX) else ""
    body = selector[len(lead) :]
    prefixes = WRAPPER_PREFIXES + (tuple(re.escape(p) for p in WRAPPER_PREFIXES) if lead else ())
    stripped = body
    while stripped.startswith(prefixes):
        stripped = stripped[len(next(p for p in prefixes if stripped.startswith(p))) :]
    yield selector
    if stripped != body:
        yield lead + stripped
    for prefix in WRAPPER_PREFIXES:  # the model is a wrapper and the selector names the inner model
        if prefix[:-1] in names:
            yield lead + (re.escape(prefix) if lead else prefix) + stripped


def _match_exactly(selector: str, names: list[str], argument: str) -> list[str]:
    if selector.startswith(REGEX_PREFIX):
        try:
            pattern = re.compile(selector[len(REGEX_PREFIX) :])
        except re.error as error:
            raise SelectorError(
                f"{argument} selector {selector!r} is not a valid regular expression ({error})"
            ) from None
        return [n for n in names if pattern.fullmatch(n)]
    if GLOB_CHARS & set(selector):
        return [n for n in names if fnmatch.fnmatchcase(n, selector)]
    return [selector] if selector in names else []


def _within(name: str, ancestor: str) -> bool:
    return name == ancestor or name.startswith(ancestor + ".")


def _refuse_torchscript(model: nn.Module, selector: str, matched: list[str]) -> None:
    for name in matched:
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            owner = ".".join(parts[:depth])
            if isinstance(model.get_submodule(owner), torch.jit.ScriptModule):
                raise TypeError(
                    f"selector {selector!r} reaches into {owner!r}, a TorchScript module: its compiled code cannot be "
                    "changed by module surgery; convert the eager nn.Module, then script it again"
                )


def _no_match_message(selector: str, names: list[str], argument: str) -> str:
    return f"{argument} selector {selector!r} matches no module; closest names: {closest_names(selector, names)}"


def closest_names(selector: str, pool: list[str]) -> str:
    body = selector[len(REGEX_PREFIX) :] if selector.startswith(REGEX_PREFIX) else selector
    close = difflib.get_close_matches(body, pool, n=3, cutoff=0.0)
    return ", ".join(close) if close else "(none: the model has no such modules)"
